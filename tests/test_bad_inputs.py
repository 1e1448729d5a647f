"""The bad-input corpus (tests/bad_inputs/cases.yaml): every malformed input through its real entry
point exits non-zero with a message naming the file, the line, the field and what is allowed, and
writes nothing. Most cases call the entry point's ``main(argv)`` in this process, with model loading
and ``ray.init`` made to fail loudly (inputs must be refused before either); the cases marked
``subprocess`` run as ``python -m ...`` to prove the command-line wiring."""

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import feature_rows, save_tiny_base, write_jsonl

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "bad_inputs"
MANIFEST = yaml.safe_load((CORPUS / "cases.yaml").read_text())
CASES = MANIFEST["cases"]
VAL_BOOLQ = [{"id": "b1", "question": "is the barn red", "passage": "The barn is red.", "answer": True},
             {"id": "b2", "question": "is the river wide", "passage": "The river is narrow.", "answer": "no"}]
VAL_MEDQA = [{"id": "m1", "question": "which drug lowers blood sugar", "answer": "B",
              "options": {"A": "aspirin", "B": "insulin", "C": "heparin", "D": "penicillin"}}]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model directory, an adapter saved on it, good tagged and validation rows."""
    from conftok.modeling import build_model, save_adapter

    root = tmp_path_factory.mktemp("bad_input_assets")
    save_tiny_base(root / "base")
    model, tokenizer = build_model(str(root / "base"), backend="hf", bf16=False, gradient_checkpointing=False,
                                   lora_r=2, lora_alpha=4, device="cpu")
    save_adapter(model, tokenizer, root / "adapter")
    return {"dir": str(CORPUS), "model": str(root / "base"), "adapter": str(root / "adapter"),
            "train": write_jsonl(root / "train.jsonl", feature_rows(8, seed=1)),
            "val_boolq": write_jsonl(root / "boolq.jsonl", VAL_BOOLQ),
            "val_medqa": write_jsonl(root / "medqa.jsonl", VAL_MEDQA)}


def case_argv(case: dict, assets: dict, out: Path) -> list[str]:
    values = {**assets, "out": str(out)}
    return [arg.format(**values) for arg in MANIFEST["entry_points"][case["entry"]] + case["args"]]


@pytest.fixture
def refuse_models_and_ray(monkeypatch):
    """Loading weights or starting Ray during a bad-input case is a failure in itself."""
    import transformers

    import ray_jobs.common

    def refuse(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} before the bad input was refused")
        return fail

    monkeypatch.setattr(ray_jobs.common, "init_ray", refuse("ray.init"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse("a model was loaded"))


def run_in_process(entry: str, argv: list[str]) -> tuple[int, str]:
    """``ENTRY.main(argv)``'s exit code (argparse's SystemExit included) and stderr."""
    module = importlib.import_module(entry)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = module.main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def run_subprocess(entry: str, argv: list[str], tmp_path: Path) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-m", entry, *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    return done.returncode, done.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_with_its_place(name, assets, tmp_path, refuse_models_and_ray):
    case = CASES[name]
    out = tmp_path / "out"
    out.mkdir()
    argv = case_argv(case, assets, out)
    if case.get("subprocess"):
        code, message = run_subprocess(case["entry"], argv, tmp_path)
        # runpy warns when `python -m X` names a module that `import conftok` has already run.
        assert "found in sys.modules" not in message, message
    else:
        code, message = run_in_process(case["entry"], argv)
    assert code not in (0, None), f"{name}: exited 0\n{message}"
    assert "Traceback" not in message, f"{name}: a traceback instead of a message\n{message}"
    for pattern in case["expect"]:
        assert re.search(pattern, message), f"{name}: no match for {pattern!r} in\n{message}"
    assert not any(out.iterdir()), f"{name}: wrote {sorted(p.name for p in out.iterdir())}"


def test_every_case_names_a_known_entry_point_and_file():
    for name, case in CASES.items():
        assert case["entry"] in MANIFEST["entry_points"], name
        assert set(case) <= {"entry", "args", "expect", "subprocess"}, name
        for arg in case["args"]:
            if arg.startswith("{dir}/") and "no_such_file" not in arg:
                assert (CORPUS / arg.split("/", 1)[1].split("=")[-1]).exists(), f"{name}: {arg}"
    assert len(CASES) >= 25


def test_byte_level_files_are_intact():
    """The BOM and the Latin-1 byte are what those cases are about: an editor or a checkout that
    rewrites them would make the cases pass for another reason."""
    assert (CORPUS / "tagged" / "bom.jsonl").read_bytes().startswith(b"\xef\xbb\xbf{")
    assert (CORPUS / "validation" / "boolq_bom.jsonl").read_bytes().startswith(b"\xef\xbb\xbf{")
    assert b"caf\xe9 open" in (CORPUS / "tagged" / "not_utf8.jsonl").read_bytes()


def test_blank_lines_are_skipped_not_errors(tmp_path):
    """Blank and whitespace-only lines anywhere in tagged and raw JSON lines are skipped."""
    from conftok.data import read_tagged_rows
    from conftok.domains import resolve_domains
    from conftok.evaluate import load_rows

    good = json.dumps({"question": "Is the sky blue?", "tagged_response": "Yes <C_READ>", "dataset": "boolq"})
    path = tmp_path / "tagged.jsonl"
    path.write_text(f"\n{good}\n   \n\t\n{good}\n\n")
    assert [row.line for row in read_tagged_rows(path)] == [2, 5]
    raw = tmp_path / "boolq.jsonl"
    raw.write_text("\n" + "\n \n".join(json.dumps(r) for r in VAL_BOOLQ) + "\n\n")
    assert load_rows(raw, domain=resolve_domains().for_dataset("boolq")) == VAL_BOOLQ


def test_good_inputs_pass_the_checks(assets, tmp_path, refuse_models_and_ray):
    """The entry points' checks accept the good assets: the training job gets as far as ray.init."""
    argv = case_argv({"entry": "ray_jobs.train", "args": []}, assets, tmp_path / "out")
    with pytest.raises(AssertionError, match="ray.init before"):
        run_in_process("ray_jobs.train", argv)
    assert not (tmp_path / "out").exists()
    code, _ = run_in_process("ray_jobs.cluster", [str(ROOT / "cluster.yaml")])
    assert code == 0
    code, _ = run_in_process("conftok.domains", [str(ROOT / "domains" / "read_med_math.yaml"), "--model_name",
                                                 assets["model"]])
    assert code == 0


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attention is installed here")
def test_padding_free_without_flash_attention_is_refused_before_ray_where_the_worker_runs_here(
        assets, tmp_path, monkeypatch, refuse_models_and_ray):
    """A local Ray's worker runs in this Python: without flash-attention it failed each of its restarts, after Ray
    had started. On a cluster (an address given) the workers' nodes decide, and the job goes on to ray.init."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    argv = case_argv({"entry": "ray_jobs.train", "args": ["--padding_free"]}, assets, tmp_path / "out")
    code, message = run_in_process("ray_jobs.train", argv)
    assert code == 2 and "padding_free=True needs flash-attention 2" in message, message
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"name": "pf", "train": {"model_name": assets["model"], "train_data": assets["train"],
                                                            "padding_free": True},
                                     "search": {"lora_r": {"choice": [2]}}, "num_trials": 1}))
    code, message = run_in_process("ray_jobs.tune", ["--space", str(space), "--storage_path", str(tmp_path / "out")])
    assert code == 2 and "padding_free=True needs flash-attention 2" in message, message
    assert not (tmp_path / "out").exists()
    with pytest.raises(AssertionError, match="ray.init before"):
        run_in_process("ray_jobs.train", argv + ["--address", "ray://head:10001"])
