"""Train the confidence token in a Ray Train TorchTrainer (one worker, one GPU or the CPUs).

    python -m ray_jobs.train --model_name Qwen/Qwen2.5-7B-Instruct \\
        --train_data tagged/qwen/qwen_all_tagged.jsonl --output_dir ./checkpoints/qwen_confidence

    ray job submit --working-dir . -- python -m ray_jobs.train --model_name ... --train_data ...

Every validation is reported with its checkpoint (``ray.train.report``); a worker that dies is
restarted (``--max_failures``) and resumes from the last reported checkpoint; a loss or gradient
norm that is not finite ends the run at once (a restart from the same checkpoint meets it again).
The seed's output tree (checkpoint-N/, best_accuracy/, best_calibration/, final/, logs/) is written under
``--output_dir``; Ray keeps the last reported checkpoint under ``--storage_path/NAME``. On a local
(or mounted) storage path Ray's checkpoint is hard links to the run's own files, not a copy: one
checkpoint's bytes on disk for both trees; once the run is finished both drop the optimizer state.
Remote storage (s3://) gets Ray's upload, and the whole tree follows it: the worker mirrors
``--output_dir`` to ``--storage_path/NAME/output_dir`` after every validation (:mod:`ray_jobs.mirror`),
a worker restarted on another node takes it back, and the job fetches it into ``--output_dir`` on its
own node at the end: nothing stays only on the disk of a GPU node the autoscaler ends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from conftok import metrics as M
from conftok.config import TrainConfig

# Fault injection for recovery tests: set both in the driver's environment and the worker exits
# hard once Ray has taken the report of that step's checkpoint, once per marker file.
FAULT_ENV = "CONFTOK_FAULT_AFTER_STEP"
FAULT_MARKER_ENV = "CONFTOK_FAULT_MARKER"
# The controller takes a report from the worker's queue when it polls the workers (every 2 s in
# Ray 2.60): a worker that exits at once can take its last report, or two, with it.
FAULT_GRACE_S = 6.0
# With FAULT_WIPE_ENV set too, the dying worker deletes its output_dir first: its node is gone with its disk.
FAULT_WIPE_ENV = "CONFTOK_FAULT_WIPE_OUTPUT"
# With FAULT_KILL_BUILDER_ENV set too, the dying worker first kills the process that built its trainer (a
# search's trial actor, which owns the Train controller): the node that held both is gone.
FAULT_KILL_BUILDER_ENV = "CONFTOK_FAULT_KILL_BUILDER"
# For tests of remote storage on one machine: the worker writes its output_dir under this folder (the path
# appended to it), where the driver does not look, as a cluster's GPU node writes on its own disk.
NODE_DISK_ENV = "CONFTOK_NODE_DISK"
# Divergence injection for tests: the first trainer built while this file does not exist yet
# creates it (writing the run's name) and trains at FAULT_DIVERGE_LR with no warmup: its first step
# makes the weights huge and the next loss is NaN (conftok.train's check), as for any learning rate
# far too high. One trial of a search, whichever is built first. Keep a validation from coming
# between (eval_steps >= 2): on those weights it fails first, on NaN confidences (a ValueError).
FAULT_DIVERGE_ENV = "CONFTOK_FAULT_DIVERGE_MARKER"
FAULT_DIVERGE_LR = 1e30

# conftok.train raises FloatingPointError on a loss or gradient norm that is not finite. Ray Train
# retries any error of the training function (Train V2 has no non-retryable errors) from the last
# checkpoint, max_failures times, where the same weights meet the same batches: the same error,
# after a worker restart each (11-13 s here). The worker writes the error to OUTPUT_DIR/DIVERGED_FILE
# and ends the run normally; the caller raises it (raise_if_diverged).
DIVERGED_FILE = "diverged.json"


def train_func(config: dict[str, Any]) -> None:
    """Ray Train worker: rebuild the config, resume from Ray's checkpoint if any, run the core loop."""
    import ray.train
    import torch

    from conftok.checkpoint import drop_trainer_state
    from conftok.train import train
    from ray_jobs.common import scalar_metrics
    from ray_jobs.mirror import MIRROR_DIR, RunMirror, is_remote

    cfg = TrainConfig.from_dict(config["train"])
    if config.get("torch_threads"):
        torch.set_num_threads(config["torch_threads"])
    fault_step = int(config.get("fault", {}).get("after_step", 0))
    fault_marker = Path(config.get("fault", {}).get("marker", "/nonexistent"))

    if config.get("node_disk"):  # tests: this worker's disk is not the driver's, as on a cluster's GPU node
        cfg = TrainConfig(**{**cfg.to_dict(), "output_dir": config["node_disk"] + str(Path(cfg.output_dir).resolve())})
    storage = ray.train.get_context().get_storage()
    remote = is_remote(storage.storage_filesystem)
    upload = None if remote else link_into_storage  # None: Ray copies
    # Remote storage: the run's tree follows every validation there (ray_jobs.mirror), so that nothing is lost
    # with this node's disk; a local storage path shares the tree's files (link_into_storage).
    mirror = RunMirror(cfg.output_dir, storage.storage_filesystem,
                       f"{storage.experiment_fs_path}/{MIRROR_DIR}") if remote else None

    def report(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        if mirror is not None:  # before the report: ASHA can end the trial as soon as it has it
            mirror.try_push()
        ray.train.report(scalar_metrics(metrics), checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
                         checkpoint_dir_name=checkpoint_dir.name, checkpoint_upload_fn=upload)
        if fault_step and metrics["step"] >= fault_step and not fault_marker.exists():
            fault_marker.write_text(str(metrics["step"]))
            if config["fault"].get("wipe"):  # the node goes, and its disk with it
                shutil.rmtree(cfg.output_dir, ignore_errors=True)
            time.sleep(FAULT_GRACE_S)
            if config["fault"].get("kill_pid"):
                os.kill(config["fault"]["kill_pid"], signal.SIGKILL)
            os._exit(1)  # a dying worker, not a Python exception

    # The run's last validation is reported once final/ is written (and pushed): ASHA may stop the trial at any
    # report, a rung at the last validation included, and Tune then ends this worker at once.
    last_report: list[tuple[dict[str, Any], Path]] = []

    def on_validation(metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        if metrics[M.VALIDATION] >= metrics[M.VALIDATIONS_PLANNED]:
            last_report.append((metrics, checkpoint_dir))
        else:
            report(metrics, checkpoint_dir)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint and mirror is not None:  # restarted, perhaps on another node or one with an older tree:
        mirror.try_fetch()  # storage's is the one, at least as new as the checkpoint (pushed before its report)
    diverged = Path(cfg.output_dir) / DIVERGED_FILE
    diverged.unlink(missing_ok=True)  # from an earlier run into this output_dir
    with checkpoint.as_directory() if checkpoint else nullcontext() as resume_from:
        if resume_from:
            print(f"Resuming from Ray checkpoint {resume_from}", flush=True)
        try:
            train(cfg, on_validation=on_validation, resume_from=resume_from)
        except FloatingPointError as e:
            diverged.parent.mkdir(parents=True, exist_ok=True)
            diverged.write_text(json.dumps({"error": str(e)}))
            print(f"Training stopped: {e}", flush=True)
        else:
            for metrics, checkpoint_dir in last_report:  # report() pushes the tree, final/ with it, first
                report(metrics, checkpoint_dir)
            last = ray.train.get_checkpoint()
            if upload is not None and cfg.save_total_limit is not None and last is not None:
                # Finished: Ray's last checkpoint drops its optimizer state, as the run's own did
                # (they share the files: neither name alone frees the bytes). s3:// keeps Ray's copy whole.
                drop_trainer_state(last.path)
    if mirror is not None:  # final/ and final_metrics.json, or the error a diverged run stopped on: no later push
        mirror.try_push(attempts=3)


def raise_if_diverged(output_dir: str | Path, storage: tuple[object, str] | None = None) -> None:
    """Raise the non-finite loss or gradient a run in ``output_dir`` stopped on (see DIVERGED_FILE). ``storage``:
    ``(filesystem, Train run path)`` of a remote storage, whose mirror of the tree is the one read."""
    from ray_jobs.mirror import read_run_file

    text = read_run_file(output_dir, DIVERGED_FILE, storage)
    if text is not None:
        raise FloatingPointError(json.loads(text)["error"])


def link_into_storage(checkpoint, checkpoint_dir_name: str):
    """Ray's checkpoint as hard links to the run's checkpoint files (``ray.train.report``'s
    ``checkpoint_upload_fn``): Ray's copy and the run's tree share the bytes on disk, and each side
    deletes its own names (Ray: ``num_to_keep``; the run: ``save_total_limit``). Files are copied
    where the storage is another filesystem."""
    import ray.train

    from conftok.checkpoint import link_tree

    storage = ray.train.get_context().get_storage()
    target = link_tree(checkpoint.path, Path(storage.experiment_fs_path) / checkpoint_dir_name)
    return ray.train.Checkpoint(path=str(target), filesystem=storage.storage_filesystem)


def build_trainer(cfg: TrainConfig, *, name: str, storage_path: str, num_gpus: float, cpus_per_worker: float,
                  max_failures: int = 3, callbacks: list | None = None, storage_filesystem=None):
    """A one-worker TorchTrainer for ``cfg``: the V2 pattern, usable alone or inside a Tune trial.
    ``storage_filesystem``: a ``pyarrow.fs`` filesystem for ``storage_path`` (Ray's ``RunConfig``), else the one its
    URI names."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ray_jobs.common import torch_threads

    if os.environ.get(FAULT_DIVERGE_ENV) and _claim(os.environ[FAULT_DIVERGE_ENV], name):
        cfg = TrainConfig(**{**cfg.to_dict(), "learning_rate": FAULT_DIVERGE_LR, "warmup_ratio": 0.0})
    loop_config = {"train": cfg.to_dict(), "torch_threads": torch_threads(cpus_per_worker)}
    if os.environ.get(FAULT_ENV):
        loop_config["fault"] = {"after_step": int(os.environ[FAULT_ENV]), "marker": os.environ[FAULT_MARKER_ENV],
                                "wipe": bool(os.environ.get(FAULT_WIPE_ENV)),
                                "kill_pid": os.getpid() if os.environ.get(FAULT_KILL_BUILDER_ENV) else None}
    if os.environ.get(NODE_DISK_ENV):
        loop_config["node_disk"] = os.environ[NODE_DISK_ENV]
    return TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, use_gpu=num_gpus > 0,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": num_gpus} if num_gpus else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_filesystem, callbacks=callbacks or [],
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            # The last checkpoint is all a restarted worker needs; the run's tree keeps best_*/ and final/.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )


def _claim(marker: str, name: str) -> bool:
    """Create ``marker`` holding ``name``; False when it exists (another run claimed it)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(name)
    return True


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its paths taken from where the job was started (the Ray worker runs elsewhere):
    ``train_data`` and ``output_dir``, and a local model, validation source, domains file or reference cache
    (:func:`~ray_jobs.common.local_paths_made_absolute`)."""
    from ray_jobs.common import local_paths_made_absolute

    paths = local_paths_made_absolute(cfg.to_dict())
    paths.update({key: str(Path(getattr(cfg, key)).resolve()) for key in ("train_data", "output_dir")})
    return TrainConfig(**{**cfg.to_dict(), **paths})


def check_stored_run(cfg: TrainConfig, storage: str, name: str, remote: tuple[Any, str] | None = None) -> None:
    """Raise :class:`~conftok.config.ConfigError` when Ray's storage holds a run ``name`` (which Ray Train resumes
    from its last checkpoint) written under settings that shape a run other than ``cfg``'s. ``remote``:
    ``(filesystem, path)`` of ``storage`` where it is remote (s3://): its checkpoint's ``conftok.json`` is read
    there, before Ray starts, not by a worker that would fail every one of its restarts on it."""
    import re

    import pyarrow.fs

    from conftok.config import ConfigError
    from conftok.modeling import METADATA_FILE

    if remote is not None:
        filesystem, base = remote
    elif "://" in storage:
        filesystem, base = pyarrow.fs.FileSystem.from_uri(storage)
    else:
        filesystem, base = pyarrow.fs.LocalFileSystem(), str(Path(storage).expanduser().resolve())
    run = f"{base.rstrip('/')}/{name}"
    steps = {int(info.base_name.split("-")[1]): info.path
             for info in filesystem.get_file_info(pyarrow.fs.FileSelector(run, allow_not_found=True))
             if info.type == pyarrow.fs.FileType.Directory and re.fullmatch(r"checkpoint-\d+", info.base_name)}
    if not steps:
        return
    try:
        with filesystem.open_input_stream(f"{steps[max(steps)]}/{METADATA_FILE}") as f:
            meta = json.loads(f.read().decode())
    except FileNotFoundError:  # a checkpoint of an older conftok: not checked
        return
    saved = meta.get("config")
    conflicts = cfg.resume_conflicts(saved, meta.get("inputs")) if isinstance(saved, dict) else []
    if conflicts:
        shown = f"{storage.rstrip('/')}/{name}" if "://" in storage else run
        raise ConfigError(f"Ray would resume run {name!r} from {shown}/checkpoint-{max(steps)}, written by a run with "
                          f"other settings ({'; '.join(conflicts)}): give another --output_dir or --name, or delete "
                          f"{shown} to start over")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ray_jobs.common import (ResourceError, autoscaling_gpus, check_padding_free_here, check_resources,
                                 config_from_args, default_cpus_per_worker, init_ray, largest_node_cpus)

    from conftok.inputs import InputError
    from conftok.preflight import check_train_inputs
    from ray_jobs.mirror import fetch_run_tree, remote_storage

    try:  # every input checked before Ray starts or anything is written
        cfg = config_from_args(args)
        check_train_inputs(cfg)
        check_padding_free_here(cfg.padding_free, args.address)
        if cfg.hf_repo:
            from ray_jobs.hub import push_problem

            if problem := push_problem(cfg.hf_repo):
                raise InputError(problem)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = with_absolute_paths(cfg)
    output_dir = Path(cfg.output_dir)
    name = args.name or output_dir.name
    storage = args.storage_path or str(output_dir.parent / "ray_results")
    if "://" not in storage:  # Ray's RunConfig refuses a relative path (pyarrow), once Ray has started
        storage = str(Path(storage).expanduser().resolve())
    try:  # Ray resumes a run of this name it finds in storage: refuse one started under other settings
        remote = remote_storage(storage)
        check_stored_run(cfg, storage, name, remote)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # storage out of reach, or no such scheme: Ray would fail on it too
        print(f"error: storage {storage}: {e}", file=sys.stderr)
        return 2
    resources = init_ray(args.address)
    per_node_gpus, _ = autoscaling_gpus()
    num_gpus = args.num_gpus if args.num_gpus is not None else (1.0 if resources.get("GPU") or per_node_gpus else 0.0)
    cpus = args.cpus_per_worker or default_cpus_per_worker(resources, num_gpus, largest_node_cpus())
    try:
        check_resources(num_gpus, cpus, resources, autoscaling_gpus=per_node_gpus)
    except ResourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Ray Train: 1 worker, {num_gpus:g} GPU, {cpus:g} CPU; run {name!r} in {storage}", flush=True)
    trainer = build_trainer(cfg, name=name, storage_path=remote[1] if remote else storage, num_gpus=num_gpus,
                            cpus_per_worker=cpus, max_failures=args.max_failures,
                            storage_filesystem=remote[0] if remote else None)
    from ray.train import TrainingFailedError

    try:  # Train V2 raises the run's error itself once max_failures is spent (OOM, a lost node); never returns it
        result = trainer.fit()
    except TrainingFailedError as e:
        print(f"error: training failed: {e}", file=sys.stderr)
        return 1
    finally:
        if remote:  # the worker's node wrote the tree on its own disk and mirrored it: bring it here, failed or not
            fetch_run_tree(output_dir, remote, name)
    run = (remote[0], f"{remote[1]}/{name}") if remote else None  # diverged.json as the worker left it, in storage
    try:
        raise_if_diverged(output_dir, run)
    except FloatingPointError as e:
        print(f"error: training stopped: {e}", file=sys.stderr)
        return 1
    print(f"Final metrics: {result.metrics}\nAdapter: {output_dir / 'final'}")
    if cfg.hf_repo:
        from ray_jobs.hub import push_adapter

        try:
            url = push_adapter(output_dir / "final", cfg.hf_repo, metrics=result.metrics)
        except Exception as e:  # noqa: BLE001 - the run is done and kept: say so, in one line
            print(f"error: push to {cfg.hf_repo} failed ({type(e).__name__}: {e}); the adapter is in "
                  f"{output_dir / 'final'}: push it with `huggingface-cli upload {cfg.hf_repo} {output_dir / 'final'}`",
                  file=sys.stderr)
            return 1
        print(f"Pushed to {url}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from ray_jobs.common import add_config_flags

    add_config_flags(parser)
    ray_group = parser.add_argument_group("Ray")
    ray_group.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    ray_group.add_argument("--num_gpus", type=float, default=None,
                           help="GPUs for the worker (default: 1 when the cluster has or can add GPUs, else 0)")
    ray_group.add_argument("--cpus_per_worker", type=float, default=None,
                           help="CPUs for the worker (default: all but a sliver on a CPU cluster, 8 with a GPU)")
    ray_group.add_argument("--max_failures", type=int, default=3, help="worker restarts, each from the last checkpoint")
    ray_group.add_argument("--name", default=None, help="Ray run name (default: the output_dir's name)")
    ray_group.add_argument("--storage_path", default=None,
                           help="Ray storage for checkpoints, local or s3:// (default: OUTPUT_DIR/../ray_results)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
