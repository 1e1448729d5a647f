"""The trainer state of a ``checkpoint-N/`` directory, written and read without pickle.

Two files beside the adapter:

    trainer_state.json          loop counters, best-so-far figures, history, the scheduler, the
                                optimizer's hyperparameters, numpy's and Python's random states
    trainer_state.safetensors   every tensor: the optimizer's moments and steps, the CPU random
                                state and one CUDA random state per device

Each tensor's place in the JSON holds ``{"__tensor__": name}`` (its key in the safetensors
file), so nothing is unpickled on load: a checkpoint from elsewhere cannot run code. The CUDA
states matter for an exact resume on a GPU: LoRA dropout draws from the CUDA generator there.

:func:`link_tree` gives a checkpoint's files a second name (``best_*/``, ``final/``, Ray's copy in
its storage) without a second copy on disk.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["TRAINER_STATE_FILE", "TRAINER_TENSORS_FILE", "TRAINER_STATE_FILES", "save_trainer_state",
           "load_trainer_state", "get_rng_state", "set_rng_state", "link_tree", "drop_trainer_state", "remove_leftovers",
           "in_progress"]

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"
TRAINER_TENSORS_FILE = "trainer_state.safetensors"
TRAINER_STATE_FILES = (TRAINER_STATE_FILE, TRAINER_TENSORS_FILE)
_TENSOR = "__tensor__"
_INT_KEYS = "__int_keys__"  # the optimizer's state is keyed by parameter index; JSON keys are strings


def get_rng_state() -> dict[str, Any]:
    """Python's, numpy's, the CPU's and (once CUDA is in use) every CUDA device's random state."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    # Reading the CUDA states would start CUDA in a CPU-only run; before it starts, its generators
    # have drawn nothing (and a resumed run seeds them again through torch.manual_seed).
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()  # one uint8 tensor per device
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned; warns where the CUDA states cannot all be set."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if not cuda:
        return
    if not torch.cuda.is_available():
        logger.warning("the checkpoint holds %d CUDA random state(s) but CUDA is not available here: "
                       "dropout draws will differ from an uninterrupted run", len(cuda))
        return
    count = torch.cuda.device_count()
    if len(cuda) != count:
        logger.warning("the checkpoint holds %d CUDA random state(s), this machine has %d device(s): "
                       "restoring the first %d", len(cuda), count, min(len(cuda), count))
    for index, device_state in enumerate(cuda[:count]):
        torch.cuda.set_rng_state(device_state, index)


def _pack(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON-ready values, its tensors moved into ``tensors`` under dotted names."""
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: name}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _pack(v, f"{name}.{k}", tensors) for k, v in obj.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {_INT_KEYS: {str(k): _pack(v, f"{name}.{k}", tensors) for k, v in obj.items()}}
        raise TypeError(f"{name}: dict keys must be all str or all int to be saved without pickle, "
                        f"got {sorted({type(k).__name__ for k in obj})}")
    if isinstance(obj, (list, tuple)):
        return [_pack(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(f"{name}: a {type(obj).__name__} cannot be saved without pickle "
                    "(only tensors, numbers, strings, None, lists and dicts)")


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_INT_KEYS}:
            return {int(k): _unpack(v, tensors) for k, v in obj[_INT_KEYS].items()}
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


def save_trainer_state(path: str | os.PathLike, *, optimizer: torch.optim.Optimizer, scheduler,
                       state: dict[str, Any]) -> None:
    """Write the optimizer, the scheduler, the loop ``state`` and the random states into ``path``.

    Each file goes to a temporary name first and replaces its target in one rename; the tensors
    are written before the JSON, so a JSON file on disk always has its tensors beside it.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    plain = _pack({"state": state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "rng": get_rng_state()}, "trainer", tensors)
    tmp = path / f".{TRAINER_TENSORS_FILE}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / TRAINER_TENSORS_FILE)
    tmp = path / f".{TRAINER_STATE_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(plain))  # NaN/inf figures (an empty domain's AUROC) round-trip in Python's JSON
    os.replace(tmp, path / TRAINER_STATE_FILE)


def load_trainer_state(path: str | os.PathLike, *, optimizer: torch.optim.Optimizer, scheduler) -> dict[str, Any]:
    """Restore the optimizer, the scheduler and the random states from ``path``; return the loop state."""
    from safetensors.torch import load_file

    path = Path(path)
    missing = [name for name in TRAINER_STATE_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot resume from {path}: no {' or '.join(missing)} (not a checkpoint-N "
                                "directory written by conftok.train)")
    tensors = load_file(str(path / TRAINER_TENSORS_FILE), device="cpu")
    saved = _unpack(json.loads((path / TRAINER_STATE_FILE).read_text()), tensors)
    for group, current in zip(saved["optimizer"]["param_groups"], optimizer.param_groups):
        for key, value in current.items():  # JSON has no tuples: AdamW's betas come back as one
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
    optimizer.load_state_dict(saved["optimizer"])  # moves the moments to each parameter's device
    scheduler.load_state_dict(saved["scheduler"])
    set_rng_state(saved["rng"])
    return saved["state"]


def drop_trainer_state(path: str | os.PathLike) -> None:
    """Delete ``path``'s trainer state (the optimizer's moments: twice the adapter), keeping the rest.

    For the last checkpoint of a finished run: nothing is left to resume."""
    for name in (TRAINER_STATE_FILE, TRAINER_TENSORS_FILE):  # the JSON first: it names the tensors
        (Path(path) / name).unlink(missing_ok=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem (EXDEV), or one without hard links: a real copy
        shutil.copy2(src, dst)


def link_tree(src: str | os.PathLike, dst: str | os.PathLike, *, skip: Iterable[str] = ()) -> Path:
    """Replace ``dst`` with the files of ``src`` (names in ``skip`` left out) as hard links, in one rename.

    A link costs no space: the bytes stay on disk once, however many directories name them, and
    go when the last name is deleted. Where a link cannot be made (``dst`` on another filesystem)
    the file is copied. Sharing is safe because conftok never rewrites a file in place: every write
    goes to a new file renamed over the old one (``save_adapter``, ``save_trainer_state``). A reader
    who edits a file of such a directory in place edits it everywhere; copy the directory first
    (``cp -r`` makes independent files).
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-{os.getpid()}-", dir=dst.parent))
    try:
        os.rmdir(tmp)  # copytree creates it
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*skip), copy_function=_link_or_copy)
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        if dst.exists():
            os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# What a write in progress is named (every one in a run's tree carries its process's id): a checkpoint's staging
# directory, a directory moved aside to be replaced, a temporary file or directory.
_IN_PROGRESS = re.compile(r"^\.(?P<name>.+)\.(?P<kind>staging|old|tmp)-(?P<pid>\d+)(?:-\w+)?$")


def in_progress(name: str) -> bool:
    """Whether a file or directory name is that of a write in progress (or one a killed process left)."""
    return _IN_PROGRESS.match(name) is not None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Delete what a process killed in the middle of a write left in ``directory``: its hidden staging, moved-aside
    and temporary entries (``.checkpoint-8.staging-4711``: half a checkpoint, ~0.5 GB for a 7B's LoRA and
    optimizer state, or hard links that keep deleted checkpoints' bytes on disk). Only entries of processes no
    longer running on this machine go; returns them. For a directory one run writes (its output_dir): a process
    on another machine sharing the directory would look dead here."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in sorted(directory.iterdir()):
        match = _IN_PROGRESS.match(entry.name)
        if match is None or int(match["pid"]) == os.getpid() or _running(int(match["pid"])):
            continue
        target = directory / match["name"]
        if match["kind"] == "old" and not target.exists() and not target.is_symlink():
            # Killed between moving a directory aside and renaming its replacement in (link_tree,
            # replace_directory): the old one is all there is of it (a best_*/ or a checkpoint); put it back.
            os.replace(entry, target)
            logger.warning("restored %s from %s, left by an interrupted replacement", target, entry.name)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        logger.warning("removed %d entr%s left by an interrupted write in %s: %s", len(removed),
                       "y" if len(removed) == 1 else "ies", directory, ", ".join(p.name for p in removed))
    return removed
