"""A run's output tree kept in Ray's storage when that storage is remote (s3://, gs://).

On a cluster the Train worker writes ``--output_dir`` on its GPU node's disk, and Ray's storage gets
only the last reported checkpoint (``num_to_keep=1``). The node's disk is not the driver's, and the
autoscaler ends an idle GPU node (``cluster.yaml``: 10 minutes) with it: the run's TensorBoard logs,
``best_*/``, ``final/``, every ``validation.json`` and a diverged run's error would go with it, a
worker restarted on another node would resume without them, and the search's results and report on
the head would have nothing to read. So the worker mirrors its tree into storage after every
validation and at its end, a restarted worker takes back what its disk lacks, and the driver fetches
the trees it reports on::

    STORAGE/NAME/output_dir/                the run's tree: logs/, best_*/, final/, checkpoint-N/validation.json
    STORAGE/NAME/output_dir/mirror.json     each file's size and SHA-256: what the tree holds, written last

Left out: ``checkpoint-N/``'s adapter and trainer state (Ray's checkpoint beside it is the last one,
all a resume needs), the stored KL reference (``cache/``: remade from the base model) and writes in
progress. A file already in storage with the same bytes (``best_calibration/`` often shares
``best_accuracy/``'s adapter; ``final/`` the last checkpoint's) is copied there by the storage itself
(a server-side copy on S3), not uploaded again; fetched, such files are hard links to one copy, as
the worker's were. A file that does not match ``mirror.json`` (a worker that died while uploading)
is not fetched, nor is the rest of its directory: a ``best_accuracy/`` whose adapter and
validation.json came from two steps would lie. On a local or shared storage path nothing is
mirrored: Ray's checkpoint is links to the run's files and every node sees the tree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from conftok.checkpoint import TRAINER_STATE_FILES, in_progress
from conftok.train import FINAL_METRICS_FILE, VALIDATION_FILE

__all__ = ["MANIFEST", "MIRROR_DIR", "RunMirror", "fetch_run_tree", "fetch_trial_trees", "is_mirrored", "is_record",
           "is_remote", "read_run_file", "remote_storage"]

logger = logging.getLogger(__name__)

MIRROR_DIR = "output_dir"  # under the Train run's folder in storage, beside Ray's checkpoint-N/
MANIFEST = "mirror.json"
_CHUNK = 8 << 20  # bytes per read and write: a 7B's LoRA adapter (~160 MB fp32) in 20 pieces


def is_remote(filesystem) -> bool:
    """Whether a ``pyarrow.fs`` filesystem is somewhere other than this node's disk (S3, GCS, ...)."""
    return filesystem.type_name != "local"


def remote_storage(storage_path: str) -> tuple[object, str] | None:
    """``(filesystem, path)`` of a remote Ray storage path (``s3://bucket/experiments`` -> an ``S3FileSystem`` and
    ``bucket/experiments``, the form Ray's ``RunConfig(storage_filesystem=, storage_path=)`` takes); None for a
    path on this node's disk (a plain path, ``file://``)."""
    if "://" not in storage_path:
        return None
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(storage_path)
    return (filesystem, path.rstrip("/")) if is_remote(filesystem) else None


def is_mirrored(rel: str) -> bool:
    """Whether a file of the run's tree (its path relative to output_dir) goes to storage."""
    parts = PurePosixPath(rel).parts
    if any(in_progress(part) for part in parts) or parts[0] == "cache" or parts[-1] == MANIFEST:
        return False
    return not (parts[0].startswith("checkpoint-") and len(parts) > 1 and parts[-1] != VALIDATION_FILE)


def is_record(rel: str) -> bool:
    """Whether a mirrored file is one of the run's records (logs, metrics, validations), not an adapter's weights or
    tokenizer: what the search's results and report read for every trial."""
    parts = PurePosixPath(rel).parts
    return len(parts) == 1 or parts[0] == "logs" or parts[-1] in (VALIDATION_FILE, FINAL_METRICS_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class RunMirror:
    """The tree under ``local`` and its copy at ``remote`` (a path on ``filesystem``).

    :meth:`push` makes the copy equal to the tree (on the node that trains); :meth:`fetch` brings files of the
    copy into the tree (on a node that lacks them). Holds what it last pushed so that a push hashes and sends only
    what changed since.
    """

    def __init__(self, local: str | os.PathLike, filesystem, remote: str):
        self.local, self.fs, self.remote = Path(local), filesystem, remote.rstrip("/")
        self._hashed: dict[tuple[int, int, int, int], str] = {}  # (device, inode, size, mtime) -> sha256
        self._stored: dict[str, dict] | None = None  # the manifest in storage, as last read or written

    def manifest(self) -> dict[str, dict] | None:
        """``{rel: {"size", "sha256"}}`` from storage, or None where nothing was mirrored yet."""
        import pyarrow.fs

        path = f"{self.remote}/{MANIFEST}"
        if self.fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())["files"]

    def _local_files(self) -> dict[str, tuple[Path, int, str]]:
        """``{rel: (path, size, sha256)}`` of the tree's mirrored files; hashes only files not seen before."""
        files = {}
        for path in sorted(self.local.rglob("*")) if self.local.is_dir() else []:
            rel = path.relative_to(self.local).as_posix()
            if path.is_symlink() or not path.is_file() or not is_mirrored(rel):
                continue
            st = path.stat()
            # conftok never rewrites a file in place, and best_*/ and final/ are hard links: one hash per file on disk
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if key not in self._hashed:
                self._hashed[key] = _sha256(path)
            files[rel] = (path, st.st_size, self._hashed[key])
        return files

    def push(self) -> int:
        """Make storage hold the tree: upload new and changed files, then ``mirror.json``, then delete what the tree
        no longer has. Returns the bytes uploaded."""
        if self._stored is None:
            self._stored = self.manifest() or {}
        files = self._local_files()
        holder = {entry["sha256"]: rel for rel, entry in self._stored.items()}  # bytes already in storage, by hash
        uploaded = 0
        for rel, (path, size, sha) in files.items():
            if self._stored.get(rel, {}).get("sha256") == sha:
                continue
            target = f"{self.remote}/{rel}"
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            if sha in holder:
                self.fs.copy_file(f"{self.remote}/{holder[sha]}", target)  # server-side on S3: no upload
            else:
                with open(path, "rb") as src, self.fs.open_output_stream(target) as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                uploaded += size
            for old in [h for h, r in holder.items() if r == rel]:  # the bytes it held are gone from there
                del holder[old]
            holder[sha] = rel
            self._stored[rel] = {"size": size, "sha256": sha}
        stale = sorted(set(self._stored) - set(files))
        self._stored = {rel: {"size": size, "sha256": sha} for rel, (_, size, sha) in files.items()}
        with self.fs.open_output_stream(f"{self.remote}/{MANIFEST}") as f:
            f.write(json.dumps({"files": self._stored}, indent=1).encode())
        for rel in stale:  # after the manifest: a reader never finds a listed file missing
            try:
                self.fs.delete_file(f"{self.remote}/{rel}")
            except FileNotFoundError:
                pass
        return uploaded

    def fetch(self, select: Callable[[str], bool] | None = None, *, replace: bool = False) -> list[str]:
        """Bring the copy's files (those ``select`` keeps) into the tree; returns those written.

        A file the tree has already is kept (``replace=False``: a restarted worker's own files are as new as the
        copy's or newer) or, with ``replace``, replaced where its bytes differ. A file whose bytes do not match
        the manifest is not fetched, and neither is the rest of its directory (logged).
        """
        manifest = self.manifest()
        if not manifest:
            return []
        groups: dict[str, list[str]] = {}
        for rel in sorted(manifest):
            if select is None or select(rel):
                groups.setdefault(str(PurePosixPath(rel).parent), []).append(rel)
        have: dict[str, Path] = {}  # sha256 -> a local file with those bytes: further names are hard links to it
        written = []
        for directory, rels in groups.items():
            staged, ok = [], True
            for rel in rels:
                entry, path = manifest[rel], self.local / rel
                if path.is_file() and (not replace or (path.stat().st_size == entry["size"]
                                                       and _sha256(path) == entry["sha256"])):
                    have.setdefault(entry["sha256"], path)
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                if entry["sha256"] in have and _link(have[entry["sha256"]], tmp):
                    pass
                else:
                    with self.fs.open_input_stream(f"{self.remote}/{rel}") as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)
                    if _sha256(tmp) != entry["sha256"]:
                        tmp.unlink()
                        ok = False
                        break
                staged.append((tmp, path, entry["sha256"]))
            if not ok:
                for tmp, _, _ in staged:
                    tmp.unlink(missing_ok=True)
                logger.warning("%s/%s: not fetched: its files do not match %s (a worker that died while uploading "
                               "them)", self.remote, directory, MANIFEST)
                continue
            for tmp, path, sha in staged:
                os.replace(tmp, path)
                have.setdefault(sha, path)
                written.append(path.relative_to(self.local).as_posix())
        return written


def _link(src: Path, dst: Path) -> bool:
    try:
        os.link(src, dst)
    except OSError:
        return False
    return True


def read_run_file(output_dir: str | os.PathLike, rel: str, storage: tuple[object, str] | None) -> str | None:
    """The text of ``output_dir/rel``, or where this node lacks it, of its mirror in ``storage`` (``(filesystem,
    Train run path)``, or None for local storage); None where neither has it."""
    path = Path(output_dir) / rel
    if path.is_file():
        return path.read_text()
    if storage is None:
        return None
    import pyarrow.fs

    filesystem, run = storage
    remote = f"{run.rstrip('/')}/{MIRROR_DIR}/{rel}"
    if filesystem.get_file_info(remote).type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_stream(remote) as f:
        return f.read().decode()


def fetch_run_tree(output_dir: Path, storage: tuple[object, str], name: str) -> list[str]:
    """Make ``output_dir`` on this node hold the tree that run ``name`` mirrored into remote ``storage``
    (``(filesystem, path)``, see :mod:`ray_jobs.mirror`); returns the files written. A storage error is printed,
    not raised: the run's own outcome is what the job reports."""
    mirror = RunMirror(output_dir, storage[0], f"{storage[1]}/{name}/{MIRROR_DIR}")
    try:
        fetched = mirror.fetch(replace=True)
    except OSError as e:
        print(f"warning: the run's tree was not fetched from {mirror.remote}: {e}", file=sys.stderr)
        return []
    print(f"Run tree: {len(fetched)} file(s) fetched from {mirror.remote} into {output_dir}", flush=True)
    return fetched


def fetch_trial_trees(rows: list[dict[str, Any]], best: dict[str, Any] | None, trials_dir: Path, filesystem,
                      train_storage: str) -> int:
    """Bring a search's trial trees from remote storage (``train_storage/TRIAL/output_dir`` on ``filesystem``) to
    ``trials_dir/TRIAL`` on this node: every trial's records (logs, validations, final metrics: what the results
    and report read) and the best trial's adapters. The trials trained on GPU nodes' disks, which the autoscaler
    ends. Where the best trial's tree has no adapter of its reported step (ASHA stopped it), Ray's copy of that
    checkpoint is fetched too. A storage error is printed, not raised. Returns the number of files written."""
    from ray_jobs.results import best_adapter

    fetched = 0
    try:
        for row in rows:
            run = f"{train_storage}/{row['trial']}"
            mirror = RunMirror(trials_dir / row["trial"], filesystem, f"{run}/{MIRROR_DIR}")
            fetched += len(mirror.fetch(None if row is best else is_record, replace=True))
            if row is best and row.get("checkpoint") and best_adapter(trials_dir / row["trial"], row) == Path(
                    row["checkpoint"]):  # no adapter of its reported step in its tree: Ray's copy of that checkpoint
                fetched += _fetch_checkpoint(filesystem, row["checkpoint"], trials_dir / row["trial"])
    except OSError as e:
        print(f"warning: trial trees not fetched from {train_storage}: {e}", file=sys.stderr)
    print(f"Trial trees: {fetched} file(s) fetched from {train_storage} into {trials_dir}", flush=True)
    return fetched


def _fetch_checkpoint(filesystem, checkpoint: str, trial_dir: Path) -> int:
    """Ray's copy of a checkpoint (``.../checkpoint-N`` on ``filesystem``) into ``trial_dir/checkpoint-N``, its
    trainer state (the optimizer's moments: twice the adapter) left out. Returns the files written."""
    import pyarrow.fs

    selector = pyarrow.fs.FileSelector(checkpoint, recursive=True, allow_not_found=True)
    target = trial_dir / checkpoint.rstrip("/").rsplit("/", 1)[-1]
    written = 0
    for info in filesystem.get_file_info(selector):
        rel = PurePosixPath(info.path).relative_to(checkpoint.rstrip("/"))
        if info.type != pyarrow.fs.FileType.File or rel.name in TRAINER_STATE_FILES:
            continue
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with filesystem.open_input_stream(info.path) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        os.replace(tmp, path)
        written += 1
    return written
