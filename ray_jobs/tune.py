"""Search LoRA rank, alpha and learning rate with Ray Tune + Optuna; each trial a TorchTrainer.

    python -m ray_jobs.tune                                   # the embedded demo (search_spaces/demo.yaml)
    python -m ray_jobs.tune --space search_spaces/qwen7b.yaml --storage_path s3://bucket/experiments
    python -m ray_jobs.tune --space search_spaces/demo.yaml --resume     # continue an interrupted search

    ray job submit --working-dir . -- python -m ray_jobs.tune --space search_spaces/demo.yaml \\
        --storage_path /tmp/conftok-experiments

Each trial is a Tune function that builds and fits a one-worker TorchTrainer named by the trial
id (Train V2; ``TuneReportCallback`` forwards every validation). Optuna's TPE sampler keeps its
study in ``EXPERIMENT/study.db`` (SQLite; ``optuna-dashboard sqlite:///EXPERIMENT/study.db``).
Objective ``score`` = accuracy - lambda * calibration error, with ASHA stopping weak trials;
``pareto`` searches (accuracy max, calibration error min) without ASHA. At the end: a table of
trials, the best trial (or the Pareto front), the best adapter's path, and results.csv/.json.
With remote storage (s3://) each trial's tree is mirrored there as it trains, on whichever GPU node,
and fetched into ``--local_dir`` at the end (:mod:`ray_jobs.mirror`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from conftok import metrics as M
from conftok.config import TrainConfig
from ray_jobs.mirror import (SEARCH_DIR, RunMirror, fetch_trial_trees, is_search_record, remote_storage,
                             storage_uri)
from ray_jobs.results import TABLE_PARAMS, best_adapter, best_trial, format_table, pareto_front, write_results
from ray_jobs.space import DEFAULT_MAX_T, EMBEDDED_MODEL, SearchSpace, load_space

DEFAULT_SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "demo.yaml"
# Where a search's study lives (its --local_dir): Tune's saved Optuna searcher holds that path, so --resume checks it;
# and the hashes of the space's sections that shape every trial (space_hashes), which --resume checks too.
SEARCH_FILE = "search.json"
# The Tune trial actor's own CPU: it only waits on the TorchTrainer inside, which takes the real resources.
TRIAL_ACTOR_CPUS = 0.01


def trial_fn(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: a TorchTrainer named by the trial id, fitted to the end. Started again by
    ``--resume``, a trial whose run had finished reports it again, and one that diverged raises again."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_jobs.recovery import replay_finished_run
    from ray_jobs.train import build_trainer, raise_if_diverged

    trial_id = ray.tune.get_context().get_trial_id()
    output_dir = Path(setup["trials_dir"]) / trial_id
    run = f"{setup['train_storage']}/{trial_id}"
    # Remote storage: this node may not be the one that trained the trial; its tree is mirrored there.
    storage = (setup["train_filesystem"], run) if setup["train_filesystem"] is not None else None
    if replay_finished_run(output_dir, run, storage):
        return
    raise_if_diverged(output_dir, storage)  # the same weights and batches would diverge again
    space: SearchSpace = setup["space"]
    values = {**space.sample_to_config(config), **setup["fixed"], "output_dir": str(output_dir), "progress": False}
    if values.get("reference_cache", "auto") == "auto":
        # One stored KL reference for every trial: the same rows and base model (trials vary LoRA and the rate).
        values["reference_cache"] = str(Path(setup["trials_dir"]) / "cache")
    # Tune restarts the trial on any failure (its Train worker's, or this actor's with the node that held it), so
    # the Train run inside retries nothing: a new TorchTrainer of the same name resumes from the run's last checkpoint.
    trainer = build_trainer(
        TrainConfig(**values), name=trial_id, storage_path=setup["train_storage"], num_gpus=setup["gpus_per_trial"],
        cpus_per_worker=setup["cpus_per_trial"], max_failures=0, callbacks=[TuneReportCallback()],
        storage_filesystem=setup["train_filesystem"],
    )
    trainer.fit()
    raise_if_diverged(output_dir, storage)  # the trial ends in ERROR with the loss's step, not retried


def build_tuner(space: SearchSpace, *, fixed: dict[str, Any], local_dir: Path, storage_path: str, concurrency: int,
                gpus_per_trial: float, cpus_per_trial: float, remote: tuple[Any, str] | None = None):
    """The Tuner: Optuna TPE (study in ``local_dir/study.db``), ASHA on the score unless Pareto,
    trials as ``trial_fn`` with 0.01 CPU each (the TorchTrainer inside takes the real resources), each restarted
    up to the space's ``max_failures`` times, whatever died: its Train worker, or the trial's actor (a node lost
    with both; the Train controller is the actor's). The restart resumes the run from its last checkpoint.
    ``remote``: ``(filesystem, path)`` of ``storage_path`` where it is remote storage (:func:`trials_storage`)."""
    import optuna
    from ray import tune

    from ray_jobs.recovery import PushSearchRecords, ResumableOptunaSearch

    local_dir.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{local_dir / 'study.db'}")
    sampler = optuna.samplers.TPESampler(seed=space.seed)
    if space.objective == "pareto":
        searcher = ResumableOptunaSearch(metric=[M.VAL_ACCURACY, M.VAL_CALIBRATION_ERROR], mode=["max", "min"],
                                sampler=sampler, storage=storage, study_name=space.name)
        tune_config = tune.TuneConfig(search_alg=searcher, num_samples=space.num_trials,
                                      max_concurrent_trials=concurrency)
    else:
        searcher = ResumableOptunaSearch(metric=M.VAL_SCORE, mode="max", sampler=sampler, storage=storage,
                                study_name=space.name)
        tune_config = tune.TuneConfig(search_alg=searcher, scheduler=build_scheduler(space), metric=M.VAL_SCORE,
                                      mode="max", num_samples=space.num_trials, max_concurrent_trials=concurrency)
    setup = {"space": space, "fixed": fixed, "trials_dir": str(local_dir / "trials"),
             **trials_storage(storage_path, local_dir.name, remote),
             "gpus_per_trial": gpus_per_trial, "cpus_per_trial": cpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(trial_fn, setup=setup), {"CPU": TRIAL_ACTOR_CPUS})
    param_space = space.param_space()
    callbacks = [PushSearchRecords(search_records(local_dir, remote))] if remote is not None else []
    run_config = tune.RunConfig(name=local_dir.name, storage_path=storage_path, callbacks=callbacks,
                                failure_config=tune.FailureConfig(max_failures=space.max_failures))
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config), trainable


def build_scheduler(space: SearchSpace):
    """ASHA on the score (``scheduler: {type: asha}``), else None. Rungs count the run's validations, not Tune's
    iterations (they restart with a resumed trial). ``stop_last_trials=False``: Ray's default stops every trial at
    its report of validation ``max_t`` (the spaces' last), and Tune then ends the trial's actor while the worker
    still links final/, writes final_metrics.json and, on s3://, pushes its tree; the planned validations end a run."""
    if space.scheduler.get("type", "asha") != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=M.VALIDATION, max_t=space.scheduler.get("max_t", DEFAULT_MAX_T),
                         grace_period=space.scheduler.get("grace_period", 1),
                         reduction_factor=space.scheduler.get("reduction_factor", 2), stop_last_trials=False)


def search_records(local_dir: Path, remote: tuple[Any, str]):
    """The mirror of a search's own records (``study.db``, ``results.*``, ``report/``) in remote storage:
    ``STORAGE/NAME/search/``."""
    return RunMirror(local_dir, remote[0], f"{remote[1]}/{local_dir.name}/{SEARCH_DIR}", mirrored=is_search_record)


def trials_storage(storage_path: str, name: str, remote: tuple[Any, str] | None) -> dict[str, Any]:
    """Where the trials' Train runs keep their checkpoints (and, on remote storage, their mirrored trees):
    ``STORAGE/NAME/train/TRIAL``. ``train_storage`` is a path on ``train_filesystem`` where that is given (remote
    storage: ``bucket/experiments/...``), else a path as Ray takes it."""
    if remote is not None:
        return {"train_storage": f"{remote[1]}/{name}/train", "train_filesystem": remote[0]}
    return {"train_storage": f"{storage_path.rstrip('/')}/{name}/train", "train_filesystem": None}


def collect_results(result_grid, space: SearchSpace, trials_dir: Path) -> list[dict[str, Any]]:
    from ray_jobs.recovery import error_reason

    rows = []
    for result in result_grid:
        train = space.sample_to_config(result.config or {})
        m = result.metrics or {}
        trial_id = m.get("trial_id") or (Path(result.path).name if result.path else "?")
        row = {"trial": trial_id, **{p: train.get(p) for p in TABLE_PARAMS}}
        row.update({
            "accuracy": m.get(M.VAL_ACCURACY), "calibration_error": m.get(M.VAL_CALIBRATION_ERROR),
            "score": m.get(M.VAL_SCORE), "validations": _count(m.get(M.VALIDATION, m.get("training_iteration"))),
            "step": m.get(M.STEP),
            "status": "ERROR" if result.error else ("TERMINATED" if _finished(m, trials_dir, trial_id) else "STOPPED"),
            "error": error_reason(result.error),
            "checkpoint": m.get("checkpoint_path") or (result.checkpoint.path if result.checkpoint else None),
            "time_s": running_time(result),
        })
        for key, value in m.items():
            if key.startswith("val/") and key.count("/") == 2:
                row[key] = value
        rows.append(row)
    return rows


def running_time(result) -> float | None:
    """Seconds a trial ran, summed over its attempts: Tune's ``time_total_s`` and ``training_iteration`` start again
    in each (a restart after a failure, a ``--resume``), so its last result holds the last attempt's time alone. An
    attempt counts up to its last report (a dead one's time after it is not known)."""
    frame = result.metrics_dataframe
    if frame is None or not {"time_total_s", "training_iteration"} <= set(getattr(frame, "columns", ())):
        return (result.metrics or {}).get("time_total_s")
    total = last = 0.0
    previous = 0
    for seconds, iteration in frame[["time_total_s", "training_iteration"]].dropna().itertuples(index=False):
        if iteration <= previous:  # a new attempt: its iterations count from 1 again
            total += last
        last, previous = float(seconds), iteration
    return total + last


def _count(value) -> int | None:
    """A count reported through Ray as a float (every metric is one): 2.0 -> 2."""
    return None if value is None else int(value)


def _finished(metrics: dict[str, Any], trials_dir: Path, trial_id: str) -> bool:
    """A trial that trained to the end reported its last planned validation (ASHA-stopped ones did not), and wrote
    final/ (on the node it ran on: on a cluster without a shared filesystem the driver cannot see it)."""
    planned, done = metrics.get(M.VALIDATIONS_PLANNED), metrics.get(M.VALIDATION)
    if planned is not None and done is not None:
        return done >= planned
    return (trials_dir / trial_id / "final" / "adapter_model.safetensors").is_file()


def prepare_fixed(space: SearchSpace, experiment_dir: Path) -> dict[str, Any]:
    """Fields every trial shares that the driver decides: the embedded model and demo data, and local paths made
    absolute (a trial runs in a directory of its own)."""
    fixed: dict[str, Any] = {}
    if space.demo is not None or space.train.get("model_name") == EMBEDDED_MODEL:
        from conftok.demo import prepare_demo, print_tagging_summary

        demo = prepare_demo(experiment_dir / "demo", **(space.demo or {}))
        print(f"Demo data tagged by SmolLM2-135M-Instruct ({demo.summary['tagged']} rows) -> {demo.tagged}")
        print_tagging_summary(demo.summary)
        fixed = {"model_name": str(demo.model_dir), "train_data": str(demo.tagged), "val_sources": demo.val_sources}
    from ray_jobs.common import local_paths_made_absolute

    fixed.update(local_paths_made_absolute({**space.train, **fixed}))  # a trial runs in a directory of its own
    return fixed


def check_resume_local_dir(local_dir: Path) -> str | None:
    """Why ``--resume`` cannot go on with the search whose records are in ``local_dir``, or None: Tune restores its
    Optuna searcher with the study's path of the first run (``SEARCH_FILE`` records it), and a study found
    elsewhere would not be the one it writes to (a relative ``--local_dir`` under a job's working directory moves
    with every new cluster)."""
    record = local_dir / SEARCH_FILE
    started_in = json.loads(record.read_text())["local_dir"] if record.is_file() else str(local_dir)
    if started_in == str(local_dir):
        return None
    return (f"search {local_dir.name!r} was started with its study in {started_in} ({record}), and Tune restores its "
            f"Optuna searcher with that path: resume with --local_dir {Path(started_in).parent}")


def space_hashes(space: SearchSpace) -> dict[str, str]:
    """A hash of each section of ``space`` that shapes every trial's run: ``train`` (the fixed fields), ``objective``
    (with its lambda) and ``scheduler``. Recorded in ``SEARCH_FILE`` when a search starts; ``--resume`` compares."""
    sections = {"train": space.train, "objective": {"type": space.objective, "lambda": space.score_lambda},
                "scheduler": space.scheduler}
    return {key: hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
            for key, value in sections.items()}


def check_resume_space(local_dir: Path, space: SearchSpace) -> str | None:
    """Why ``--resume`` cannot go on with ``space``, or None. Tune restores its searcher and parameter space from its
    own pickles, but every trial gets the current file's ``train`` section: an edited file would mix two training
    configurations in one study (and a trial resumed from a checkpoint would fail later, in its worker). A search
    whose ``SEARCH_FILE`` records no hashes (started before they were recorded) is not checked."""
    record = local_dir / SEARCH_FILE
    search = json.loads(record.read_text()) if record.is_file() else {}
    trials = search.get("num_trials")
    if trials is not None and trials != space.num_trials:  # Tune restores the count it was given at the start
        return (f"search {local_dir.name!r} started with {trials} trials ({record}), and Tune resumes a search with "
                f"the trial count it started with; this run asks for {space.num_trials} (--num_trials or the space's "
                f"num_trials), which the resumed search would never reach: resume with {trials}, or start a new "
                f"search with another --name")
    started = search.get("space_hashes")
    if not started:
        return None
    changed = [key for key, value in space_hashes(space).items() if started.get(key) != value]
    if not changed:
        return None
    return (f"{space.path}: {', '.join(changed)} changed since search {local_dir.name!r} started (its hashes are in "
            f"{record}), and a resumed search's trials would train under other settings than its first ones: "
            f"restore the file, or start a new search with another --name")


def warn_if_asha_cuts_trials(space: SearchSpace, n_rows: int) -> int | None:
    """Print a warning when ASHA's ``max_t`` (validations) is below what each trial makes on the space's ``n_rows``
    training rows: ASHA places its rungs up to ``max_t`` only, so the later part of every run is never compared.
    Returns that count."""
    if space.scheduler.get("type", "asha") != "asha":
        return None
    from conftok.train import planned_validations

    cfg = TrainConfig(**space.train)  # the searched fields (rank, alpha, rate) do not change the count
    planned = planned_validations(n_rows, cfg)
    max_t = space.scheduler.get("max_t", DEFAULT_MAX_T)
    if max_t < planned:
        print(f"warning: {space.path}: scheduler.max_t is {max_t}, but each trial validates {planned} times on "
              f"{cfg.train_data} (every {cfg.eval_steps} steps and at each epoch's end): ASHA places its rungs up to "
              f"validation {max_t} only, and compares no trial after it. Set max_t >= {planned}.", file=sys.stderr)
    return planned


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ray_jobs.common import (ResourceError, autoscaling_gpus, check_padding_free_here, check_resources,
                                 default_cpus_per_worker, init_ray, largest_node_cpus)

    from conftok.inputs import InputError, InputFileMissing

    try:  # the space and the inputs its trials share, checked before Ray starts or anything is written
        space = load_space(args.space)
        check_padding_free_here(space.train.get("padding_free"), args.address)
        if space.demo is None and space.train.get("model_name") != EMBEDDED_MODEL:
            from conftok.preflight import check_train_inputs

            try:
                warn_if_asha_cuts_trials(space, check_train_inputs(TrainConfig(**space.train)))
            except InputFileMissing as e:  # on a cluster: a path of the laptop's, or one the job's copy left out
                data = str(space.train.get("train_data"))
                if data not in str(e):
                    raise
                where = "" if Path(data).is_absolute() else f", read from {Path.cwd()}"
                raise InputError(f"{space.path}: train.train_data {data!r}{where}: {e}") from e
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.num_trials is not None:
        if args.num_trials < 1:
            print(f"error: --num_trials must be at least 1, got {args.num_trials}", file=sys.stderr)
            return 2
        space.num_trials = args.num_trials
    name = args.name or space.name
    remote = "://" in args.storage_path
    # Ray keeps experiment state and checkpoints in storage (local or s3://); the Optuna study,
    # per-trial output trees and results files need a local directory.
    local_dir = (Path(args.local_dir) if remote else Path(args.storage_path).expanduser()).resolve() / name
    experiment_path = f"{args.storage_path.rstrip('/')}/{name}" if remote else str(local_dir)
    try:  # (filesystem, path) of s3:// and the like: trees are mirrored there
        storage = remote_storage(args.storage_path)
    except (OSError, ValueError) as e:
        print(f"error: storage {args.storage_path}: {e}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    resources = init_ray(args.address)
    per_node_gpus, max_gpus = autoscaling_gpus()
    has_gpus = bool(resources.get("GPU") or per_node_gpus)
    gpus = space.gpus_per_trial
    if gpus == "auto":
        gpus = 1.0 if has_gpus else 0.0
    if args.cpu or (gpus and not has_gpus and args.allow_cpu):
        gpus = 0.0
    if space.cpus_per_trial and gpus:
        cpus = space.cpus_per_trial
    else:
        cpus = default_cpus_per_worker(resources, gpus, largest_node_cpus())
    try:
        check_resources(gpus, cpus + TRIAL_ACTOR_CPUS, resources, autoscaling_gpus=per_node_gpus,
                        cpu_hint="pass --cpu (or --allow_cpu) to run the trials on CPUs",
                        fewer_cpus_hint="lower the space's resources.cpus_per_trial")
    except ResourceError as e:
        print(f"error: {e} (search space {space.path}: resources.gpus_per_trial={space.gpus_per_trial})",
              file=sys.stderr)
        return 2
    total_gpus = max(resources.get("GPU", 0.0), max_gpus)
    concurrency = (max(1, int(total_gpus // gpus)) if gpus
                   else max(1, int(resources.get("CPU", 1) // (cpus + TRIAL_ACTOR_CPUS))))
    print(f"Search {space.name!r}: {space.num_trials} trials, objective {space.objective}"
          f"{f' (lambda={space.score_lambda:g})' if space.objective == 'score' else ''}, up to {concurrency} at once, "
          f"{gpus:g} GPU + {cpus:g} CPU per trial\nExperiment: {experiment_path}", flush=True)

    from ray import tune

    if args.resume:
        if not tune.Tuner.can_restore(experiment_path):
            print(f"error: nothing to resume in {experiment_path}", file=sys.stderr)
            return 2
        if storage is not None and not (local_dir / "study.db").is_file():  # another head, or a new KubeRay pod
            restored = search_records(local_dir, storage).fetch()
            print(f"Search records: {len(restored)} file(s) fetched from storage into {local_dir}", flush=True)
        problem = check_resume_local_dir(local_dir) or check_resume_space(local_dir, space)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    else:
        local_dir.mkdir(parents=True, exist_ok=True)
        (local_dir / SEARCH_FILE).write_text(json.dumps({"local_dir": str(local_dir), "space": str(space.path),
                                                         "storage_path": args.storage_path,
                                                         "space_hashes": space_hashes(space),
                                                         "num_trials": space.num_trials}, indent=1))
    fixed = prepare_fixed(space, local_dir)
    tuner, trainable = build_tuner(space, fixed=fixed, local_dir=local_dir, storage_path=args.storage_path if remote
                                   else str(local_dir.parent), concurrency=concurrency, gpus_per_trial=gpus,
                                   cpus_per_trial=cpus, remote=storage)
    if args.resume:
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    result_grid = tuner.fit()
    # Ctrl+C (SIGINT) makes Tune stop gracefully and return from fit(): the search is then unfinished,
    # and writing results.json / the report would present it as done.
    finished = result_grid.num_terminated + result_grid.num_errors
    if len(result_grid) < space.num_trials or finished < len(result_grid):
        resume = " ".join(["python -m ray_jobs.tune", *(argv if argv is not None else sys.argv[1:])])
        print(f"\nSearch interrupted: {finished} of {space.num_trials} trials finished; state saved in "
              f"{experiment_path}. Continue with:\n  {resume if args.resume else resume + ' --resume'}", file=sys.stderr)
        return 130

    rows = collect_results(result_grid, space, local_dir / "trials")
    if storage is not None:  # the trials trained on other nodes' disks
        setup = trials_storage(args.storage_path, name, storage)
        fetch_trial_trees(rows, best_trial(rows), local_dir / "trials", setup["train_filesystem"],
                          setup["train_storage"])
        for row in rows:  # Ray's checkpoint paths lack the scheme ("bucket/..."): written and printed as URIs
            row["checkpoint"] = row["checkpoint"] and storage_uri(args.storage_path, row["checkpoint"])
    summary: dict[str, Any] = {"space": str(space.path), "objective": space.objective, "lambda": space.score_lambda,
                               "experiment": experiment_path, "local_dir": str(local_dir),
                               "wall_s": round(time.perf_counter() - started, 1),
                               "calibration": {"beta": space.train.get("calib_beta", TrainConfig.calib_beta),
                                               "p": space.train.get("calib_p_norm", TrainConfig.calib_p_norm)}}
    print("\n" + format_table(rows))
    from ray_jobs.recovery import fail_orphaned_trials

    orphans = fail_orphaned_trials(local_dir / "study.db", space.name)
    if orphans:
        summary["optuna_orphans_failed"] = orphans
        print(f"\nOptuna trial(s) {', '.join(f'#{n}' for n in orphans)} marked FAIL: asked for by a driver that was "
              "killed before Tune saved them; no Tune trial ran them")
    if space.objective == "pareto":
        front = pareto_front(rows)
        summary["pareto_front"] = [r["trial"] for r in front]
        print("\nPareto front (accuracy max, calibration error min):")
        for r in front:
            print(f"  {r['trial']}: accuracy {r['accuracy']:.4f}, CE {r['calibration_error']:.4f} -> {r['checkpoint']}")
    best = best_trial(rows)
    if best:
        summary["best_trial"] = best["trial"]
        summary["best_adapter"] = str(best_adapter(local_dir / "trials" / best["trial"], best))
        if not Path(summary["best_adapter"], "adapter_model.safetensors").is_file():
            print(f"warning: trial {best['trial']}'s adapter of its reported step {_count(best.get('step'))} is not "
                  f"on this node (neither in {local_dir / 'trials' / best['trial']} nor Ray's checkpoint in storage)",
                  file=sys.stderr)
        summary["best_checkpoint"] = best["checkpoint"]
        print(f"\nBest trial {best['trial']}: score {best['score']:.4f} (accuracy {best['accuracy']:.4f}, "
              f"CE {best['calibration_error']:.4f}); lora_r={best['lora_r']}, lora_alpha={best['lora_alpha']}, "
              f"learning_rate={best['learning_rate']:.3g}")
        print(f"Best adapter: {summary['best_adapter']}")
    write_results(local_dir, rows, summary)
    print(f"Results: {local_dir / 'results.csv'}, {local_dir / 'results.json'} "
          f"({summary['wall_s']:.0f} s)")
    try:  # the report is a view of results already written: a failure here must not fail the search
        from ray_jobs.report import build_report

        print(f"Report: {build_report(local_dir)}")
    except Exception as e:
        print(f"warning: no report ({type(e).__name__}: {e}); retry with `python -m ray_jobs.report {local_dir}`",
              file=sys.stderr)
    if storage is not None:  # this head's disk may go with the cluster (KubeRay tears it down): storage keeps them
        records = search_records(local_dir, storage)
        records.try_push()
        print(f"Search records (study, results, report): {records.remote}; fetch them with "
              f"`python -m ray_jobs.mirror {args.storage_path.rstrip('/')}/{name} DIR --search`")
    return 0 if best or any(r["status"] != "ERROR" for r in rows) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.tune", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default=str(DEFAULT_SPACE), help="search-space YAML (default: the embedded demo)")
    parser.add_argument("--storage_path", default=os.environ.get("CONFTOK_EXPERIMENTS", "experiments"),
                        help="where experiments live (local dir or s3://; default: ./experiments or $CONFTOK_EXPERIMENTS)")
    parser.add_argument("--name", default=None, help="experiment name (default: the space's name)")
    parser.add_argument("--local_dir", default="experiments",
                        help="with remote storage: local folder for the study, trial outputs and results")
    parser.add_argument("--resume", action="store_true", help="restore an interrupted experiment (Tuner.restore)")
    parser.add_argument("--num_trials", type=int, default=None,
                        help="override the space's num_trials (a new search: --resume keeps the count it started with)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    parser.add_argument("--cpu", action="store_true", help="run trials on CPUs even where GPUs exist")
    parser.add_argument("--allow_cpu", action="store_true",
                        help="fall back to CPUs when the space asks for GPUs the cluster lacks (else: fail at once)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
