"""A run's output tree kept in Ray's storage when that storage is remote (s3://, gs://).

    python -m ray_jobs.mirror s3://bucket/conftok/demo/train/0e5d2877 ./trial   # a trial's tree, by hand
    python -m ray_jobs.mirror s3://bucket/conftok/demo ./demo --search          # a search's study, results, report

On a cluster the Train worker writes ``--output_dir`` on its GPU node's disk, and Ray's storage gets
only the last reported checkpoint (``num_to_keep=1``). The node's disk is not the driver's, and the
autoscaler ends an idle GPU node (``cluster.yaml``: 10 minutes) with it: the run's TensorBoard logs,
``best_*/``, ``final/``, every ``validation.json`` and a diverged run's error would go with it, a
worker restarted on another node would resume without them, and the search's results and report on
the head would have nothing to read. So the worker mirrors its tree into storage at every
validation (before it reports it: ASHA may end the trial as soon as it has) and at its end, a
restarted worker takes the tree back, and the driver fetches the trees it reports on::

    STORAGE/NAME/output_dir/mirror.json         the tree: each file's path, size and SHA-256
    STORAGE/NAME/output_dir/objects/SHA256      the bytes, once per content

``mirror.json`` is the one commit point: a push uploads the contents storage lacks, then replaces
``mirror.json`` (one PUT on S3: whole or not at all), then deletes the contents it no longer names.
A worker killed in the middle of a push (ASHA, a lost node) leaves the previous tree whole, never a
``best_accuracy/`` whose adapter and validation.json came from two steps. One object per content:
``best_calibration/`` sharing ``best_accuracy/``'s adapter, or ``final/`` the last checkpoint's, costs
no upload; fetched, such files are hard links to one copy, as the worker's were. Every fetched file is
checked against its SHA-256. The objects are not browsable as a tree: ``python -m ray_jobs.mirror``
fetches one (the jobs do it themselves at their end).

Left out: ``checkpoint-N/``'s adapter and trainer state (Ray's checkpoint beside it is the last one,
all a resume needs), the stored KL reference (``cache/``: remade from the base model) and writes in
progress. On a local or shared storage path nothing is mirrored: Ray's checkpoint is links to the
run's files and every node sees the tree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from conftok.checkpoint import TRAINER_STATE_FILES, in_progress
from conftok.train import FINAL_METRICS_FILE, VALIDATION_FILE

__all__ = ["MANIFEST", "MIRROR_DIR", "OBJECTS", "SEARCH_DIR", "RunMirror", "fetch_run_tree", "fetch_trial_trees",
           "is_mirrored", "is_record", "is_remote", "is_search_record", "read_run_file", "remote_storage"]

logger = logging.getLogger(__name__)

MIRROR_DIR = "output_dir"  # under the Train run's folder in storage, beside Ray's checkpoint-N/
SEARCH_DIR = "search"  # under a search's folder in storage, beside Tune's experiment state
MANIFEST = "mirror.json"
OBJECTS = "objects"
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


def storage_uri(storage_path: str, path: str) -> str:
    """A path on a remote storage's filesystem (``bucket/experiments/...``, as Ray's checkpoints give it) as a URI
    of that storage's scheme (``s3://bucket/experiments/...``: what ``aws s3`` and ``pyarrow`` take); a path on
    this node's disk as it is."""
    scheme = storage_path.split("://", 1)[0] if "://" in storage_path else ""
    return f"{scheme}://{path}" if scheme and scheme != "file" and "://" not in path else path


def is_mirrored(rel: str) -> bool:
    """Whether a file of the run's tree (its path relative to output_dir) goes to storage."""
    parts = PurePosixPath(rel).parts
    if any(in_progress(part) for part in parts) or parts[0] == "cache" or parts[-1] == MANIFEST:
        return False
    return not (parts[0].startswith("checkpoint-") and len(parts) > 1 and parts[-1] != VALIDATION_FILE)


def is_search_record(rel: str) -> bool:
    """Whether a file of a search's ``--local_dir`` goes to storage (``STORAGE/SEARCH/search/``): the Optuna study,
    ``results.*`` and the report. Not ``trials/`` (each trial mirrors its own tree) nor ``demo/`` (remade)."""
    parts = PurePosixPath(rel).parts
    return not any(in_progress(part) for part in parts) and (len(parts) == 1 or parts[0] == "report")


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
    """The tree under ``local`` (the files ``mirrored`` keeps: a run's, by default) and its copy at ``remote`` (a
    path on ``filesystem``).

    :meth:`push` makes the copy equal to the tree (on the node that trains); :meth:`fetch` makes the tree hold the
    copy's files (on a node that lacks them, or holds older ones). Remembers what it last pushed so that a push
    hashes and sends only what changed since.
    """

    def __init__(self, local: str | os.PathLike, filesystem, remote: str,
                 mirrored: Callable[[str], bool] = is_mirrored):
        self.local, self.fs, self.remote = Path(local), filesystem, remote.rstrip("/")
        self.mirrored = mirrored  # which files of the tree (paths relative to it) the copy holds
        self._hashed: dict[tuple[int, int, int, int], str] = {}  # (device, inode, size, mtime) -> sha256
        self._stored: dict[str, int] | None = None  # the objects in storage (sha256 -> size), as last listed

    def manifest(self) -> dict[str, dict] | None:
        """``{rel: {"size", "sha256"}}`` from storage, or None where nothing was mirrored yet."""
        import pyarrow.fs

        path = f"{self.remote}/{MANIFEST}"
        if self.fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())["files"]

    def read(self, rel: str) -> bytes | None:
        """The bytes of one file of the copy, or None where the copy has no such file."""
        entry = (self.manifest() or {}).get(rel)
        if entry is None:
            return None
        with self.fs.open_input_stream(self._object(entry["sha256"])) as f:
            return f.read()

    def _object(self, sha: str) -> str:
        return f"{self.remote}/{OBJECTS}/{sha}"

    def _objects(self) -> dict[str, int]:
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(f"{self.remote}/{OBJECTS}", allow_not_found=True)
        return {info.base_name: info.size for info in self.fs.get_file_info(selector)
                if info.type == pyarrow.fs.FileType.File}

    def _local_files(self) -> dict[str, tuple[Path, int, str]]:
        """``{rel: (path, size, sha256)}`` of the tree's mirrored files; hashes only files not seen before."""
        files = {}
        for path in sorted(self.local.rglob("*")) if self.local.is_dir() else []:
            rel = path.relative_to(self.local).as_posix()
            if path.is_symlink() or not path.is_file() or not self.mirrored(rel):
                continue
            st = path.stat()
            # conftok never rewrites a file in place, and best_*/ and final/ are hard links: one hash per file on disk
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if key not in self._hashed:
                self._hashed[key] = _sha256(path)
            files[rel] = (path, st.st_size, self._hashed[key])
        return files

    def push(self) -> int:
        """Make storage hold the tree: upload the contents it lacks, replace ``mirror.json``, then delete the contents
        no file names any more. Returns the bytes uploaded."""
        if not self.local.is_dir():  # never an empty mirror.json over a tree that is elsewhere
            raise FileNotFoundError(f"{self.local}: no such directory to mirror to {self.remote}")
        try:
            if self._stored is None:
                self._stored = self._objects()
            files = self._local_files()
            uploaded = 0
            for path, size, sha in {sha: (path, size, sha) for path, size, sha in files.values()}.values():
                if self._stored.get(sha) == size:  # a partial object (a killed upload elsewhere) has another size
                    continue
                self.fs.create_dir(f"{self.remote}/{OBJECTS}", recursive=True)
                with open(path, "rb") as src, self.fs.open_output_stream(self._object(sha)) as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                self._stored[sha] = size
                uploaded += size
            manifest = {rel: {"size": size, "sha256": sha} for rel, (_, size, sha) in files.items()}
            with self.fs.open_output_stream(f"{self.remote}/{MANIFEST}") as f:
                f.write(json.dumps({"files": manifest}, indent=1).encode())
            named = {entry["sha256"] for entry in manifest.values()}
            for sha in [sha for sha in self._stored if sha not in named]:  # after the manifest: never one it names
                try:
                    self.fs.delete_file(self._object(sha))
                except FileNotFoundError:
                    pass
                del self._stored[sha]
        except BaseException:
            self._stored = None  # list storage again next time
            raise
        return uploaded

    def try_push(self, attempts: int = 1) -> bool:
        """:meth:`push`, a storage error printed, not raised (in a worker: Ray's checkpoint is safe, and the next push
        sends what this one missed); tried ``attempts`` times, 2 s, 4 s, ... apart. Whether it went."""
        for attempt in range(1, attempts + 1):
            try:
                self.push()
                return True
            except (OSError, ValueError, KeyError) as e:
                print(f"warning: the tree not mirrored to {self.remote} (attempt {attempt} of {attempts}): {e}",
                      flush=True)
                if attempt < attempts:
                    time.sleep(2.0 * attempt)
        return False

    def try_fetch(self) -> list[str]:
        """:meth:`fetch` of everything, a storage error printed, not raised (a worker can resume without the tree)."""
        try:
            written = self.fetch()
        except (OSError, ValueError, KeyError) as e:
            print(f"warning: the tree not fetched from {self.remote}: {e}", flush=True)
            return []
        print(f"Restored {len(written)} file(s) of the run's tree from {self.remote}", flush=True)
        return written

    def fetch(self, select: Callable[[str], bool] | None = None, *, prune: bool = False,
              keep_newer: bool = False) -> list[str]:
        """Make the tree hold the copy's files (those ``select`` keeps); returns those written.

        A file whose bytes already match is left alone; any other is replaced. With ``prune``, files the copy
        would hold (selected, mirrored) but does not are deleted: a ``diverged.json`` of an earlier run into the
        same directory must not outlive it. With ``keep_newer`` (a driver on the node that trained, whose last push
        failed), a file written or linked after the copy's ``mirror.json`` is neither replaced nor deleted. A
        content that fails its SHA-256 check or is missing is not written (logged); the rest is.
        """
        manifest = self.manifest()
        if manifest is None:
            return []
        since = self.fs.get_file_info(f"{self.remote}/{MANIFEST}").mtime.timestamp() if keep_newer else math.inf

        def newer(path: Path) -> bool:  # ctime: a hard link made later (final/ -> checkpoint-N) counts as new
            return path.stat().st_ctime > since

        chosen = {rel: entry for rel, entry in manifest.items() if select is None or select(rel)}
        have: dict[str, Path] = {}  # sha256 -> a local file checked to hold those bytes: other names link to it
        written, missing = [], []
        for rel, entry in sorted(chosen.items()):
            path, sha = self.local / rel, entry["sha256"]
            if path.is_file() and not path.is_symlink() and path.stat().st_size == entry["size"] and \
                    _sha256(path) == sha:
                have.setdefault(sha, path)
                continue
            if path.is_file() and newer(path):
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            try:
                if not (sha in have and _link(have[sha], tmp)):
                    _download(self.fs, self._object(sha), tmp)
                    if _sha256(tmp) != sha:
                        missing.append(rel)
                        continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                os.replace(tmp, path)
            except FileNotFoundError:
                missing.append(rel)
                continue
            finally:
                tmp.unlink(missing_ok=True)
            have.setdefault(sha, path)
            written.append(rel)
        if missing:
            logger.warning("%s: %d file(s) not fetched, their bytes missing or damaged in storage: %s", self.remote,
                           len(missing), ", ".join(missing[:5]))
        if prune:
            for path in sorted(self.local.rglob("*")) if self.local.is_dir() else []:
                rel = path.relative_to(self.local).as_posix()
                if path.is_file() and rel not in manifest and self.mirrored(rel) and (select is None or select(rel)) \
                        and not newer(path):
                    path.unlink()
        return written


def _download(filesystem, source: str, target: Path) -> None:
    """One file of ``filesystem`` to ``target`` on this disk, in pieces of ``_CHUNK`` bytes."""
    with filesystem.open_input_stream(source) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


def _link(src: Path, dst: Path) -> bool:
    try:
        os.link(src, dst)
    except OSError:
        return False
    return True


def read_run_file(output_dir: str | os.PathLike, rel: str, storage: tuple[object, str] | None) -> str | None:
    """The text of a file of a run's tree, None where the tree has no such file. ``storage``: ``(filesystem, Train
    run path)`` of a remote storage, whose mirror of the tree is the one read (this node's copy of it may be stale,
    or missing: it trained elsewhere) unless it cannot be reached; None: ``output_dir/rel``, on this node."""
    if storage is not None:
        try:
            data = RunMirror(output_dir, storage[0], f"{storage[1].rstrip('/')}/{MIRROR_DIR}").read(rel)
            return None if data is None else data.decode()
        except (OSError, ValueError, KeyError) as e:
            logger.warning("%s: the run's mirror could not be read (%s); reading %s", storage[1], e, output_dir)
    path = Path(output_dir) / rel
    return path.read_text() if path.is_file() else None


def fetch_run_tree(output_dir: Path, storage: tuple[object, str], name: str) -> list[str]:
    """Make ``output_dir`` on this node hold the tree that run ``name`` mirrored into remote ``storage``
    (``(filesystem, path)``); returns the files written. A storage error is printed, not raised: the run's own
    outcome is what the job reports."""
    mirror = RunMirror(output_dir, storage[0], f"{storage[1]}/{name}/{MIRROR_DIR}")
    try:
        fetched = mirror.fetch(prune=True, keep_newer=True)
    except (OSError, ValueError, KeyError) as e:  # pyarrow's errors are OSError or ValueError (ArrowInvalid)
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
    for row in rows:
        run, trial_dir = f"{train_storage}/{row['trial']}", trials_dir / row["trial"]
        try:
            mirror = RunMirror(trial_dir, filesystem, f"{run}/{MIRROR_DIR}")
            fetched += len(mirror.fetch(None if row is best else is_record, prune=True, keep_newer=True))
            if row is best and row.get("checkpoint") and best_adapter(trial_dir, row) == Path(row["checkpoint"]):
                fetched += _fetch_checkpoint(filesystem, row["checkpoint"], trial_dir)  # none of its step in its tree
        except (OSError, ValueError, KeyError) as e:
            print(f"warning: trial {row['trial']}'s tree not fetched from {run}: {e}", file=sys.stderr)
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
        try:
            _download(filesystem, info.path, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    storage = remote_storage(args.run)
    if storage is None:
        print(f"error: {args.run} is not remote storage (s3://, gs://): a run there keeps its tree in its output_dir",
              file=sys.stderr)
        return 2
    folder, mirrored = (SEARCH_DIR, is_search_record) if args.search else (MIRROR_DIR, is_mirrored)
    mirror = RunMirror(args.output_dir, storage[0], f"{storage[1]}/{folder}", mirrored=mirrored)
    if mirror.manifest() is None:
        print(f"error: nothing mirrored in {args.run} ({folder}/{MANIFEST} not found)", file=sys.stderr)
        return 1
    written = mirror.fetch(is_record if args.records_only else None)
    print(f"{len(written)} file(s) fetched from {args.run} into {args.output_dir}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ray_jobs.mirror",
        description="Fetch a run's tree that its Ray worker mirrored into remote storage, or a search's records.")
    parser.add_argument("run", help="the run in storage: STORAGE/NAME for ray_jobs.train, STORAGE/SEARCH/train/TRIAL "
                                    "for a search's trial (s3://bucket/conftok/demo/train/0e5d2877), STORAGE/SEARCH "
                                    "with --search")
    parser.add_argument("output_dir", help="where the files go (files already there with the same bytes are kept)")
    parser.add_argument("--search", action="store_true",
                        help="RUN is a search: fetch its Optuna study, results.csv/.json and report")
    parser.add_argument("--records_only", action="store_true",
                        help="logs, validations and metrics only: no adapters or tokenizers")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
