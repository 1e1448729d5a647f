"""No pickle, no remote code: what conftok reads from disk runs no code.

A static pass over the sources (every ``torch.load`` with ``weights_only=True``, no pickle module,
no ``trust_remote_code=True``, every ``from_pretrained`` told ``trust_remote_code``), then the
load paths fed a live pickle payload (a file that creates a marker when unpickled): adapters,
base models and checkpoints refuse it, and loading a real adapter or resuming a checkpoint runs
with every unpickler disabled."""

import ast
import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import feature_rows, make_model, make_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for folder in ("conftok", "ray_jobs", "bench") for p in (ROOT / folder).rglob("*.py"))
PACKAGE_SOURCES = [p for p in SOURCES if p.relative_to(ROOT).parts[0] in ("conftok", "ray_jobs")]
VAL = {"boolq": [{"id": f"b{i}", "question": f"is code {w} red", "passage": "The barn is red.", "answer": i % 2 == 0}
               for i, w in enumerate(["alpha", "beta"] * 2)],
       "medqa": [{"id": f"m{i}", "question": f"code {w}: which drug", "answer": "ABCD"[i],
                  "options": {"A": "aspirin", "B": "insulin", "C": "heparin", "D": "penicillin"}}
                 for i, w in enumerate(["alpha", "beta"] * 2)]}
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    """``torch.load`` for ``torch.load(...)``'s func; '' for anything not a plain dotted name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def pickle_loads_in(path: Path) -> list[str]:
    """Every place in ``path`` that could unpickle: a pickle-family import, ``torch.load`` without
    ``weights_only=True``, ``np.load(allow_pickle=True)``, ``read_pickle``, ``trust_remote_code=True``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module.split(".")[0]]
        found += [f"{path.name}:{node.lineno}: imports {n}" for n in names if n in PICKLE_MODULES]
    for call in _calls(tree):
        name = _dotted(call.func)
        where = f"{path.name}:{call.lineno}: {name or 'call'}"
        torch_load = name.endswith("torch.load") or name == "load"  # `load` alone: `from torch import load`
        if torch_load and not _is_true(_keyword(call, "weights_only")):
            found.append(f"{where} without weights_only=True")
        if name in ("np.load", "numpy.load") and _is_true(_keyword(call, "allow_pickle")):
            found.append(f"{where}(allow_pickle=True)")
        if name.split(".")[-1] == "read_pickle":
            found.append(where)
        if _is_true(_keyword(call, "trust_remote_code")):
            found.append(f"{where}(trust_remote_code=True)")
    return found


class TestSources:
    def test_sources_are_found(self):
        names = {p.relative_to(ROOT).as_posix() for p in SOURCES}
        assert {"conftok/checkpoint.py", "conftok/modeling.py", "ray_jobs/train.py", "bench/gpu.py"} <= names

    def test_no_pickle_based_load_anywhere(self):
        found = [hit for path in SOURCES for hit in pickle_loads_in(path)]
        assert not found, "pickle-based loads:\n" + "\n".join(found)

    def test_the_scan_finds_what_it_looks_for(self, tmp_path):
        bad = tmp_path / "bad.py"
        bad.write_text("import pickle\nimport torch, numpy as np\n"
                       "a = torch.load('x.pt')\nb = torch.load('x.pt', weights_only=False)\n"
                       "c = torch.load('x.pt', weights_only=True)\nd = np.load('x.npy', allow_pickle=True)\n"
                       "e = M.from_pretrained('r', trust_remote_code=True)\n")
        hits = pickle_loads_in(bad)
        assert len(hits) == 5, hits
        assert [h.split(":")[1] for h in hits] == ["1", "3", "4", "6", "7"]

    def test_every_from_pretrained_is_told_trust_remote_code(self):
        """transformers' and unsloth's loaders are always passed ``trust_remote_code`` explicitly (the
        config's flag or False); PEFT's ``PeftModel.from_pretrained`` runs no repo code and takes none."""
        missing = []
        for path in PACKAGE_SOURCES:
            for call in _calls(ast.parse(path.read_text())):
                name = _dotted(call.func)
                if name.endswith(".from_pretrained") and not name.startswith("PeftModel"):
                    if _keyword(call, "trust_remote_code") is None:
                        missing.append(f"{path.relative_to(ROOT)}:{call.lineno}: {name}")
        assert not missing, "from_pretrained without trust_remote_code:\n" + "\n".join(missing)


class Payload:
    """Unpickling this object creates ``marker``: the stand-in for a malicious file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def payload(tmp_path):
    marker = tmp_path / "unpickled"
    data = pickle.dumps(Payload(marker))
    pickle.loads(data).close()  # the payload is live: unpickling it does create the marker
    assert marker.is_file()
    marker.unlink()
    return marker, data


@pytest.fixture
def adapter(tmp_path):
    from conftok.modeling import build_model, save_adapter

    tokenizer = make_tokenizer()
    base = make_model(len(tokenizer), seed=0)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model, tokenizer = build_model(str(tmp_path / "base"), backend="hf", bf16=False, gradient_checkpointing=False,
                                   lora_r=4, lora_alpha=8, device="cpu")
    return save_adapter(model, tokenizer, tmp_path / "adapter"), tmp_path / "base"


def disable_unpickling(monkeypatch) -> None:
    """From here on (until the test ends) every unpickler raises."""
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)


class TestLoadPaths:
    def test_adapter_as_pickle_is_refused(self, adapter, payload):
        """PEFT falls back to ``adapter_model.bin`` (torch.load) when there is no safetensors file;
        load_adapter refuses before PEFT is asked."""
        from conftok.modeling import load_adapter

        adapter_dir, _ = adapter
        marker, data = payload
        (adapter_dir / "adapter_model.safetensors").unlink()
        (adapter_dir / "adapter_model.bin").write_bytes(data)
        refused = r"no adapter_model\.safetensors \(found \['adapter_model\.bin'\]\)"
        with pytest.raises(FileNotFoundError, match=refused):
            load_adapter(adapter_dir, device="cpu")
        assert not marker.exists()

    def test_adapter_loads_with_every_unpickler_disabled(self, adapter, payload, monkeypatch):
        """A pickle beside the safetensors file is never read: the adapter loads from safetensors."""
        from conftok.modeling import load_adapter

        adapter_dir, _ = adapter
        marker, data = payload
        (adapter_dir / "adapter_model.bin").write_bytes(data)
        (adapter_dir / "training_args.bin").write_bytes(data)
        disable_unpickling(monkeypatch)
        model, tokenizer, domains = load_adapter(adapter_dir, device="cpu")
        assert any("lora_A" in name for name, _ in model.named_parameters())
        assert not marker.exists()

    def test_base_model_as_pickle_is_refused(self, adapter, payload):
        """A base model directory with only ``pytorch_model.bin`` is not unpickled (use_safetensors)."""
        from conftok.modeling import build_model

        _, base = adapter
        marker, data = payload
        (base / "model.safetensors").unlink()
        (base / "pytorch_model.bin").write_bytes(data)
        with pytest.raises(OSError, match="safetensors"):
            build_model(str(base), backend="hf", bf16=False, gradient_checkpointing=False, device="cpu")
        assert not marker.exists()

    def test_checkpoint_of_pickles_is_refused(self, tmp_path, payload):
        """A checkpoint in the transformers Trainer's layout (optimizer.pt, scheduler.pt,
        rng_state.pth: pickles) is not a conftok checkpoint and is not read."""
        from conftok.checkpoint import load_trainer_state

        marker, data = payload
        ckpt = tmp_path / "checkpoint-3"
        ckpt.mkdir()
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
            (ckpt / name).write_bytes(data if not name.endswith(".json") else b'{"global_step": 3}')
        param = torch.nn.Parameter(torch.zeros(2))
        optimizer = torch.optim.AdamW([param])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        with pytest.raises(FileNotFoundError, match=r"no trainer_state\.safetensors"):
            load_trainer_state(ckpt, optimizer=optimizer, scheduler=scheduler)
        assert not marker.exists()

    def test_resume_with_every_unpickler_disabled(self, tmp_path, monkeypatch):
        """Training, then resuming from the checkpoint it wrote, never unpickles anything."""
        from conftok import TrainConfig, train

        tokenizer = make_tokenizer()
        cfg = TrainConfig(model_name="in-process", train_data=write_jsonl(tmp_path / "t.jsonl", feature_rows(16)),
                          output_dir=str(tmp_path / "run"), backend="hf", batch_size=4, max_steps=3, eval_steps=2,
                          bf16=False, gradient_checkpointing=False, calib_beta=2, eval_batch_size=4, max_new_tokens=2,
                          progress=False, lora_r=4, lora_alpha=8, save_total_limit=None)  # checkpoint-2 kept whole
        seen = []
        train(cfg, model=make_model(len(tokenizer)), tokenizer=tokenizer, val_sets=VAL,
              on_validation=lambda m, d: seen.append(m["step"]) if m["step"] < 2 else None)
        disable_unpickling(monkeypatch)
        tokenizer = make_tokenizer()
        result = train(cfg, model=make_model(len(tokenizer)), tokenizer=tokenizer, val_sets=VAL,
                       resume_from=tmp_path / "run" / "checkpoint-2", on_validation=lambda m, d: seen.append(m["step"]))
        assert result.global_step == 3 and seen == [3]


class TestTrustRemoteCode:
    def test_off_by_default_everywhere(self):
        import inspect

        from conftok import TrainConfig
        from conftok.export import export_merged
        from conftok.modeling import build_model, load_adapter, load_tokenizer

        assert TrainConfig().trust_remote_code is False
        for fn in (build_model, load_adapter, load_tokenizer, export_merged):
            assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn.__name__

    def test_repo_code_does_not_run_by_default(self, adapter, tmp_path):
        """A model directory whose config names its own code (``auto_map``) loads with transformers'
        class; the shipped module is never imported."""
        from conftok.modeling import build_model

        _, base = adapter
        marker = tmp_path / "repo_code_ran"
        (base / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                               "from transformers import LlamaForCausalLM as EvilForCausalLM\n")
        config = json.loads((base / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
        (base / "config.json").write_text(json.dumps(config))
        model, _ = build_model(str(base), backend="hf", bf16=False, gradient_checkpointing=False, device="cpu")
        assert type(model.get_base_model()).__name__ == "LlamaForCausalLM"
        assert not marker.exists()

    def test_flag_reaches_every_loader(self, adapter, monkeypatch):
        """build_model and load_adapter hand the flag to the model's and the tokenizer's loaders."""
        import transformers

        seen = []
        for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
            original = cls.from_pretrained.__func__

            def spy(klass, *args, _original=original, **kwargs):
                seen.append((klass.__name__, kwargs.get("trust_remote_code")))
                return _original(klass, *args, **kwargs)

            monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
        from conftok.modeling import build_model, load_adapter

        adapter_dir, base = adapter
        build_model(str(base), backend="hf", bf16=False, gradient_checkpointing=False, device="cpu",
                    trust_remote_code=True)
        load_adapter(adapter_dir, device="cpu", trust_remote_code=True)
        load_adapter(adapter_dir, device="cpu")
        assert seen == [("AutoTokenizer", True), ("AutoModelForCausalLM", True)] * 2 + [
            ("AutoTokenizer", False), ("AutoModelForCausalLM", False)], seen

    @pytest.mark.parametrize("module, argv", [
        ("ray_jobs.evaluate", ["--adapter", "a", "--data", "boolq=v.jsonl"]),
        ("ray_jobs.export", ["--adapter", "a", "--out", "o"]),
        ("ray_jobs.tag", ["--model_name", "m", "--data", "boolq=v.jsonl", "--out", "o.jsonl"]),
        ("ray_jobs.train", ["--model_name", "m", "--train_data", "t.jsonl"]),
    ])
    def test_cli_flag(self, module, argv):
        import importlib

        pytest.importorskip("ray")
        parse_args = importlib.import_module(module).parse_args
        assert parse_args(argv).trust_remote_code is False
        assert parse_args(argv + ["--trust_remote_code"]).trust_remote_code is True

    @pytest.mark.parametrize("flag", [[], ["--trust_remote_code"]])
    def test_tagging_cli_flag(self, monkeypatch, flag):
        """conftok.tagging's own CLI (no Ray) has the flag too, and hands it to the loader."""
        import importlib

        import conftok.tagging as tagging

        class Loaded(Exception):
            pass

        def load_tokenizer(name, *, trust_remote_code):
            raise Loaded(trust_remote_code)

        # `conftok.evaluate` the attribute is the function; the modules come from importlib.
        monkeypatch.setattr(importlib.import_module("conftok.evaluate"), "load_rows", lambda *args, **kwargs: [])
        monkeypatch.setattr(importlib.import_module("conftok.modeling"), "load_tokenizer", load_tokenizer)
        with pytest.raises(Loaded) as loaded:
            tagging.main(["--model_name", "m", "--data", "boolq=v.jsonl", "--out", "o", *flag])
        assert loaded.value.args == (bool(flag),)
