"""How a search comes through its failures: a driver killed outright, a trial whose loss diverged.

Below ``ray_jobs.tune``, which calls these; what was measured with Ray 2.60 and Optuna 5.0:

- Tune saves its experiment state (trials, searcher) at most every 10 s, not when a trial ends. A
  driver killed (SIGKILL, a lost node) after a trial finished but before the next save leaves that
  trial unfinished in the saved state, and ``--resume`` starts it again: ``trial_fn`` then reports
  its recorded validations (:func:`replay_finished_run`) instead of training it a second time. A
  trial Tune had saved as finished is not started again.
- ``OptunaSearch`` asks Optuna for a trial (a RUNNING row in ``study.db``) when Tune creates one.
  Restored, it keeps its map of Tune trial to Optuna trial, so a trial that Tune resumes completes
  its own row. A finished trial that reports again after a restore ended every ``--resume`` with
  Optuna's ``UpdateFinishedTrialError`` (:class:`ResumableOptunaSearch`). A trial asked for after
  the last save is unknown to the restored search: its row stayed RUNNING while ``--resume`` asked
  for a new one, with the same parameters (:func:`fail_orphaned_trials`).
- The local Ray that a driver started goes down with it: SIGKILL to the driver's process group left
  none of its processes 3 s later.
- A trial whose loss is not finite ends at once with the error (``ray_jobs.train.DIVERGED_FILE``):
  Ray Train would retry it from the same checkpoint, where it diverges again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import optuna
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from conftok import metrics as M

__all__ = ["PushSearchRecords", "ResumableOptunaSearch", "error_reason", "fail_orphaned_trials", "replay_finished_run"]

logger = logging.getLogger(__name__)

FINAL_METRICS = Path("final") / "final_metrics.json"  # written by conftok.train once the last step is done


def replay_finished_run(output_dir: Path, ray_run_dir: str, storage: tuple[object, str] | None = None) -> bool:
    """Report to Tune again every validation of a trial's run that had finished; True if there was one.

    ``output_dir/final/final_metrics.json`` holds the run's validations in order, the metrics it
    reported the first time (``checkpoint_path`` as ``TuneReportCallback`` set it, under
    ``ray_run_dir``; Ray keeps the last one). ``storage``: ``(filesystem, ray_run_dir)`` of a remote
    storage, whose mirror of the tree is read where this node lacks it (:mod:`ray_jobs.mirror`).
    Training again would cost a whole run, and would not even report: Ray Train restores a run of
    the same name from its last checkpoint, where ``conftok.train`` has no step left to train or validate.
    Unless Ray has no checkpoint of the last step (the worker died between writing ``final_metrics.json`` and
    reporting its last validation, which comes after it): Ray restores the one before, the run trains its last
    steps again and reports them, and False is returned.
    """
    import ray.tune
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from ray_jobs.common import scalar_metrics

    from ray_jobs.mirror import read_run_file

    text = read_run_file(output_dir, FINAL_METRICS.as_posix(), storage)
    if text is None:
        return False
    history = json.loads(text)["history"]
    last = f"{ray_run_dir.rstrip('/')}/checkpoint-{int(history[-1][M.STEP])}" if history else None
    if last is None or not _exists(last, storage):
        return False
    print(f"Trial {output_dir.name} finished before the search was stopped: reporting its {len(history)} "
          f"validation(s) from its {FINAL_METRICS} again, not training it again", flush=True)
    for number, metrics in enumerate(history, 1):
        checkpoint = f"{ray_run_dir.rstrip('/')}/checkpoint-{int(metrics[M.STEP])}"
        ray.tune.report({M.VALIDATION: number, **scalar_metrics(metrics), CHECKPOINT_PATH_KEY: checkpoint})
    return True


def _exists(path: str, storage: tuple[object, str] | None) -> bool:
    """Whether a directory of a Ray run is there: on remote ``storage`` (``(filesystem, run path)``), else on disk."""
    if storage is None:
        return Path(path).is_dir()
    import pyarrow.fs

    return storage[0].get_file_info(path).type != pyarrow.fs.FileType.NotFound


class PushSearchRecords(Callback):
    """With remote storage, push the search's records (the Optuna study above all) there whenever ``study.db``
    changes (``mirror``: a :class:`ray_jobs.mirror.RunMirror` of ``--local_dir``): a head that dies, or a KubeRay
    head pod torn down with its cluster, takes nothing ``--resume`` needs. Optuna writes a row when a trial is
    asked for, not only when one ends, and Tune's saved searcher names that row: the study in storage must be
    as new. Runs at the end of each step of the driver's Tune loop, the thread Optuna writes from (the SQLite
    file is whole between its transactions); a ``stat`` when nothing changed. A storage error is printed."""

    def __init__(self, mirror, study_db: str = "study.db"):
        self.mirror, self.study_db = mirror, study_db
        self._pushed: tuple[int, int] | None = None  # (size, mtime) of the study last pushed

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        try:
            st = (self.mirror.local / self.study_db).stat()
        except FileNotFoundError:
            return
        if (st.st_size, st.st_mtime_ns) != self._pushed and self.mirror.try_push():
            self._pushed = (st.st_size, st.st_mtime_ns)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.on_step_end(iteration, trials)


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that lets a trial Optuna has closed report again.

    A driver killed after Optuna was told a trial's result but before Tune saved the trial as
    finished: ``--resume`` starts the trial again and it reports again. ``OptunaSearch`` writes each
    result to the Optuna trial as an intermediate value, Optuna refuses that for a finished trial
    (``UpdateFinishedTrialError``), and Tune lets the error end the whole search, at every resume.
    Here the repeated values are dropped; the trial's second completion is already only logged by
    ``OptunaSearch.on_trial_complete``. Pickled with the Tuner: keep its module path.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Optuna's step: the run's validation number; Tune's training_iteration restarts at 1 in a trial that
        # --resume started again (its run goes on from its checkpoint), and Optuna drops a step it has seen.
        if M.VALIDATION in result:
            result = {**result, "training_iteration": int(result[M.VALIDATION])}
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            logger.info("trial %s reported again after its Optuna trial had finished; not recorded twice", trial_id)
        except KeyError as e:  # its Optuna row is not in study.db (a study restored older than Tune's searcher)
            logger.warning("trial %s: its Optuna trial is missing from the study (%s); this result is not recorded "
                           "there", trial_id, e)


def fail_orphaned_trials(study_db: Path, study_name: str) -> list[int]:
    """Mark FAIL the Optuna trials still RUNNING once every Tune trial has ended; their numbers.

    Such a row was asked for by a driver killed before Tune saved the trial: no Tune trial will
    ever complete it, and left RUNNING it would read as a trial in progress (optuna-dashboard,
    ``load_study``). Optuna cannot delete a trial; FAIL is its state for one whose process died.
    Call it only after a search that finished: after an interrupted one, ``--resume`` may still
    complete a RUNNING row.
    """
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=study_name, storage=optuna.storages.RDBStorage(f"sqlite:///{study_db}"))
    orphans = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for number in orphans:
        study.tell(number, state=TrialState.FAIL)
    return orphans


def error_reason(error: BaseException | None) -> str | None:
    """One line for a trial's error: the exception the trial raised and its message's last line.

    Tune hands back the trial's exception wrapped (``RayTaskError``, whose text is the remote
    traceback); its ``cause`` is the exception the trial raised.
    """
    if error is None:
        return None
    cause = getattr(error, "cause", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else '(no message)'}"
