"""A search comes through its failures (its own Ray, in subprocesses, like a user at a terminal):
the driver killed outright and resumed, and a trial whose loss goes NaN."""

import collections
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_ray_jobs import ROOT, assets, write_space  # noqa: F401  (module fixture)

pytest.importorskip("ray")


def job_env(ray_tmp: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each job starts its own Ray
    return {**env, "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": ray_tmp, **extra}


def tune_statuses(exp) -> dict[str, str]:
    """Trial id -> status as Tune last saved it (the newest experiment_state-*.json)."""
    states = sorted(glob.glob(str(exp / "experiment_state-*.json")))
    if not states:
        return {}
    try:
        data = json.loads(Path(states[-1]).read_text())
    except (OSError, ValueError):  # caught while Tune rewrites it
        return {}
    return {t["trial_id"]: t["status"] for t in (json.loads(state) for state, _ in data["trial_data"])}


def files_of(path) -> dict[str, int]:
    """Every file under ``path`` with its modification time in ns."""
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


def processes_of(ray_tmp: str) -> list[int]:
    """Our processes: those whose environment holds this test's RAY_TMPDIR (Ray's renamed ones too)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"RAY_TMPDIR={ray_tmp}".encode() in f.read().split(b"\0"):
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def clean_up(ray_tmp: str) -> None:
    for pid in processes_of(ray_tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(ray_tmp, ignore_errors=True)


def load_trials(exp, name):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{exp / 'study.db'}").trials


class TestTuneFailures:
    def test_killed_driver_resumes_without_running_finished_trials_again(self, assets, tmp_path):
        """SIGKILL to the driver's process group once Tune has saved a finished trial; --resume
        leaves that trial's files untouched, runs the rest, and study.db holds each trial once."""
        space = write_space(tmp_path / "killed.yaml", assets, trials=3, max_steps=2, eval_steps=1)
        exp = tmp_path / "exp" / "killed"
        cmd = [sys.executable, "-m", "ray_jobs.tune", "--space", str(space), "--storage_path", str(tmp_path / "exp")]
        ray_tmp = tempfile.mkdtemp(prefix="/tmp/ctk")  # Ray's socket paths must stay short
        env = job_env(ray_tmp)
        try:
            with open(tmp_path / "killed.log", "w") as log:
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            deadline, first = time.time() + 300, None
            while first is None and time.time() < deadline and proc.poll() is None:
                saved = tune_statuses(exp)
                first = next((p.parent.parent.name for p in exp.glob("trials/*/final/final_metrics.json")
                              if saved.get(p.parent.parent.name) == "TERMINATED"), None)
                time.sleep(0.5)
            assert first, "no trial finished and saved by Tune\n" + (tmp_path / "killed.log").read_text()[-3000:]
            before = files_of(exp / "trials" / first)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            assert not (exp / "results.json").exists()
            deadline = time.time() + 30  # the local Ray it started goes down with it (measured: within 3 s)
            while processes_of(ray_tmp) and time.time() < deadline:
                time.sleep(1)
            out = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        finally:
            clean_up(ray_tmp)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

        # The finished trial was neither trained nor replayed again: Tune had it as TERMINATED.
        assert files_of(exp / "trials" / first) == before
        assert f"Trial {first} finished before" not in out.stdout + out.stderr
        results = json.loads((exp / "results.json").read_text())
        trials = {t["trial"]: t for t in results["trials"]}
        assert len(trials) == 3 and first in trials
        assert all(t["status"] in ("TERMINATED", "STOPPED") and t["error"] is None for t in trials.values())
        final = json.loads((exp / "trials" / first / "final" / "final_metrics.json").read_text())
        assert trials[first]["score"] == pytest.approx(final["history"][-1]["val/score"])
        assert all(trial in out.stdout for trial in trials)  # the printed table lists every trial

        # study.db: one COMPLETE trial per Tune trial, with its score; a trial the killed driver had
        # asked Optuna for but Tune had not saved is FAIL and named in results.json; none RUNNING.
        by_state = collections.defaultdict(list)
        for t in load_trials(exp, "killed"):
            by_state[t.state.name].append(t)
        assert set(by_state) <= {"COMPLETE", "FAIL"}, dict(by_state)
        scores = sorted(t["score"] for t in trials.values())
        assert sorted(t.value for t in by_state["COMPLETE"]) == pytest.approx(scores)
        assert [t.number for t in by_state["FAIL"]] == results.get("optuna_orphans_failed", [])

    def test_a_diverging_trial_fails_alone_with_its_reason(self, assets, tmp_path):
        """One trial's loss goes NaN (a learning rate of 1e30 through the test hook): it ends in ERROR
        at once, with the step, in results.json/.csv, the printed table and the report; the other
        trial finishes and is the best; Optuna has it FAIL."""
        from ray_jobs.train import FAULT_DIVERGE_ENV

        # eval_steps 2: the NaN is met by the loss at step 2, not by a validation after step 1
        space = write_space(tmp_path / "nan.yaml", assets, trials=2, max_steps=2, eval_steps=2)
        exp = tmp_path / "exp" / "nan"
        marker = tmp_path / "diverged_trial"
        cmd = [sys.executable, "-m", "ray_jobs.tune", "--space", str(space), "--storage_path", str(tmp_path / "exp")]
        ray_tmp = tempfile.mkdtemp(prefix="/tmp/ctn")
        try:
            out = subprocess.run(cmd, cwd=ROOT, env=job_env(ray_tmp, **{FAULT_DIVERGE_ENV: str(marker)}),
                                 capture_output=True, text=True, timeout=600)
            worker_logs = "".join(Path(f).read_text(errors="replace")
                                  for f in glob.glob(f"{ray_tmp}/ray/session_latest/logs/worker-*.out"))
        finally:
            clean_up(ray_tmp)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        bad = marker.read_text()
        reason = re.compile(r"FloatingPointError: loss is (nan|inf) at step 2 \(epoch 1, batch 2\)")

        results = json.loads((exp / "results.json").read_text())
        trials = {t["trial"]: t for t in results["trials"]}
        assert len(trials) == 2 and bad in trials
        assert trials[bad]["status"] == "ERROR" and reason.match(trials[bad]["error"]), trials[bad]
        (good,) = [t for t in trials.values() if t["trial"] != bad]
        assert good["status"] == "TERMINATED" and good["error"] is None and results["best_trial"] == good["trial"]
        assert reason.search((exp / "results.csv").read_text())
        table_line = next(line for line in out.stdout.splitlines() if line.startswith(bad))
        assert "ERROR" in table_line and reason.search(table_line)
        report = (exp / "report" / "report.html").read_text()
        assert "<td class='status ERROR'>ERROR</td>" in report and reason.search(report)

        # Ended at once: one run of the worker met the NaN (max_failures is 1: a retry would be a second).
        assert worker_logs.count("Training stopped: loss is") == 1, worker_logs[-3000:]
        states = collections.Counter(t.state.name for t in load_trials(exp, "nan"))
        assert states == {"COMPLETE": 1, "FAIL": 1}


    # "worker" takes the same Tune restart from a Train error instead of a dead actor: slow (a minute), off by default
    @pytest.mark.parametrize("dies", ["node", pytest.param("worker", marks=pytest.mark.slow)])
    def test_a_trial_whose_worker_or_node_dies_resumes_from_its_checkpoint(self, assets, tmp_path, dies):
        """After Ray has step 2's checkpoint, the trial's Train worker exits hard; for ``node`` it first kills the
        trial's own actor (SIGKILL), which owns the Train controller, as when the node that held both goes.
        Tune starts the trial again, its run resumes from that checkpoint (once: the Train run inside retries
        nothing), and the trial finishes with both validations. Before, a dead trial actor ended the trial in ERROR."""
        from ray_jobs.train import FAULT_ENV, FAULT_KILL_BUILDER_ENV, FAULT_MARKER_ENV

        space = write_space(tmp_path / "lost.yaml", assets, trials=1, max_steps=4, eval_steps=2)
        exp = tmp_path / "exp" / "lost"
        marker = tmp_path / "fault_marker"
        fault = {FAULT_ENV: "2", FAULT_MARKER_ENV: str(marker), **({FAULT_KILL_BUILDER_ENV: "1"} if dies == "node" else {})}
        cmd = [sys.executable, "-m", "ray_jobs.tune", "--space", str(space), "--storage_path", str(tmp_path / "exp")]
        ray_tmp = tempfile.mkdtemp(prefix="/tmp/ctl")
        try:
            out = subprocess.run(cmd, cwd=ROOT, env=job_env(ray_tmp, **fault), capture_output=True, text=True,
                                 timeout=600)
            worker_logs = "".join(Path(f).read_text(errors="replace")
                                  for f in glob.glob(f"{ray_tmp}/ray/session_latest/logs/worker-*.out"))
        finally:
            clean_up(ray_tmp)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert marker.read_text() == "2"  # the fault happened, after step 2's report
        (trial,) = json.loads((exp / "results.json").read_text())["trials"]
        assert trial["status"] == "TERMINATED" and trial["error"] is None, trial
        assert trial["validations"] == 2
        assert worker_logs.count("Resuming from Ray checkpoint") == 1, worker_logs[-3000:]
        # Its time is both attempts' (Tune's time_total_s starts again at 0 with the restart)
        (tune_results,) = exp.glob(f"trial_fn_{trial['trial']}*/result.json")
        reports = [json.loads(line) for line in tune_results.read_text().splitlines()]
        assert [r["training_iteration"] for r in reports] == [1, 1]  # one report an attempt, each counted from 1
        assert trial["time_s"] == pytest.approx(sum(r["time_total_s"] for r in reports))
        validations = sorted((exp / "trials" / trial["trial"]).glob("checkpoint-*/validation.json"))
        assert [p.parent.name for p in validations] == ["checkpoint-2", "checkpoint-4"]  # the one before too
        assert (exp / "trials" / trial["trial"] / "final" / "adapter_model.safetensors").is_file()


class TestRecoveryPieces:
    """The bookkeeping behind the two searches above, on a study in a temporary SQLite file."""

    def searcher(self, db, cls=None):
        import optuna
        from ray import tune

        from ray_jobs.recovery import ResumableOptunaSearch

        searcher = (cls or ResumableOptunaSearch)(metric="score", mode="max", study_name="s",
                                                  storage=optuna.storages.RDBStorage(f"sqlite:///{db}"))
        searcher.set_search_properties(None, None, {"lr": tune.loguniform(1e-3, 1e-2)})
        return searcher

    def test_a_finished_trial_reports_again_after_a_restore(self, tmp_path):
        """Saved after a trial's first result, told its end, then restored (a driver killed before Tune
        saved again): the trial's repeated second result is dropped, where OptunaSearch raises."""
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        first = self.searcher(tmp_path / "study.db")
        first.suggest("t1")
        first.on_trial_result("t1", {"score": 0.1, "training_iteration": 1})
        first.save(str(tmp_path / "searcher.pkl"))
        first.on_trial_result("t1", {"score": 0.2, "training_iteration": 2})
        first.on_trial_complete("t1", {"score": 0.2, "training_iteration": 2})
        for cls, raises in ((OptunaSearch, True), (None, False)):
            restored = self.searcher(tmp_path / "study.db", cls)
            restored.restore(str(tmp_path / "searcher.pkl"))
            restored.on_trial_result("t1", {"score": 0.1, "training_iteration": 1})  # already stored: Optuna skips it
            if raises:
                with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
                    restored.on_trial_result("t1", {"score": 0.2, "training_iteration": 2})
            else:
                restored.on_trial_result("t1", {"score": 0.2, "training_iteration": 2})
                restored.on_trial_complete("t1", {"score": 0.2, "training_iteration": 2})  # logged by OptunaSearch
        (trial,) = load_trials(tmp_path, "s")
        assert trial.state.name == "COMPLETE" and trial.value == 0.2 and trial.intermediate_values == {1: 0.1, 2: 0.2}

    def test_optunas_step_is_the_runs_validation_number(self, tmp_path):
        """A trial restarted by --resume reports training_iteration 1, 2, ... again while its run goes on from its
        checkpoint (validations 3, 4): Optuna records them under the run's validation numbers. Under Tune's count
        it drops them as steps it has already seen."""
        from conftok import metrics as M

        searcher = self.searcher(tmp_path / "study.db")
        searcher.suggest("t1")
        for iteration, validation, score in ((1, 1, 0.1), (2, 2, 0.2), (1, 3, 0.3), (2, 4, 0.4)):
            searcher.on_trial_result("t1", {"score": score, "training_iteration": iteration, M.VALIDATION: validation})
        (trial,) = load_trials(tmp_path, "s")
        assert trial.intermediate_values == {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4}

    def test_a_trial_that_reported_its_last_planned_validation_finished(self, tmp_path):
        """TERMINATED (trained to its end) or STOPPED (by ASHA) from what the trial reported, where the driver
        cannot see the trial's final/ (a cluster without a shared filesystem); final/ where nothing says."""
        from ray_jobs.tune import _finished

        assert _finished({"validation": 4.0, "validations_planned": 4.0}, tmp_path, "t")
        assert not _finished({"validation": 1.0, "validations_planned": 4.0}, tmp_path, "t")
        assert not _finished({}, tmp_path, "t")
        (tmp_path / "t" / "final").mkdir(parents=True)
        (tmp_path / "t" / "final" / "adapter_model.safetensors").write_bytes(b"x")
        assert _finished({}, tmp_path, "t")

    def test_a_finished_run_is_replayed_only_where_ray_has_its_last_checkpoint(self, tmp_path, monkeypatch):
        """A restarted trial whose run wrote final_metrics.json reports its validations again instead of training,
        naming Ray's checkpoints; but a worker that died after writing it and before reporting its last
        validation left Ray the checkpoint before: the run trains its last steps again (not replayed), and
        no reported checkpoint names a directory Ray never made."""
        import ray.tune

        from ray_jobs.recovery import replay_finished_run

        reported = []
        monkeypatch.setattr(ray.tune, "report", reported.append)
        out, run = tmp_path / "trial", tmp_path / "ray" / "trial"
        (out / "final").mkdir(parents=True)
        history = [{"step": 2, "validation": 1, "val/accuracy": 0.5}, {"step": 4, "validation": 2, "val/accuracy": 0.6}]
        (out / "final" / "final_metrics.json").write_text(json.dumps({"history": history}))
        (run / "checkpoint-2").mkdir(parents=True)
        assert not replay_finished_run(out, str(run)) and reported == []
        (run / "checkpoint-4").mkdir()
        assert replay_finished_run(out, str(run))
        assert [r["checkpoint_path"] for r in reported] == [f"{run}/checkpoint-2", f"{run}/checkpoint-4"]
        assert [r["validation"] for r in reported] == [1, 2]

    def test_a_trials_time_is_summed_over_its_attempts(self):
        """Tune's time_total_s starts again with each attempt (a restart after a failure, a --resume)."""
        import types

        import pandas as pd

        from ray_jobs.tune import running_time

        def result(seconds, iterations):
            frame = pd.DataFrame({"time_total_s": seconds, "training_iteration": iterations})
            return types.SimpleNamespace(metrics={"time_total_s": seconds[-1]}, metrics_dataframe=frame)

        assert running_time(result([10.0, 20.0, 5.0, 12.0, 0.5], [1, 2, 1, 2, 1])) == pytest.approx(32.5)
        assert running_time(result([10.0, 30.0], [1, 1])) == 40.0  # the restart took longer to its first report
        assert running_time(result([10.0, 20.0], [1, 2])) == 20.0
        assert running_time(types.SimpleNamespace(metrics={"time_total_s": 7.0}, metrics_dataframe=None)) == 7.0

    def test_orphaned_running_trials_are_failed(self, tmp_path):
        from ray_jobs.recovery import fail_orphaned_trials

        searcher = self.searcher(tmp_path / "study.db")
        for trial in ("done", "orphan"):
            searcher.suggest(trial)
        searcher.on_trial_complete("done", {"score": 0.5})
        assert fail_orphaned_trials(tmp_path / "study.db", "s") == [1]
        assert [t.state.name for t in load_trials(tmp_path, "s")] == ["COMPLETE", "FAIL"]
        assert fail_orphaned_trials(tmp_path / "study.db", "s") == []

    def test_error_reason_is_the_trials_exception_in_one_line(self):
        from ray.exceptions import RayTaskError

        from ray_jobs.recovery import error_reason

        try:
            raise FloatingPointError("loss is nan at step 2 (epoch 1, batch 2); try a lower learning_rate")
        except FloatingPointError as e:
            wrapped = RayTaskError("trial_fn", "Traceback (most recent call last):\nFloatingPointError: ...", e)
        assert error_reason(wrapped) == ("FloatingPointError: loss is nan at step 2 (epoch 1, batch 2); "
                                         "try a lower learning_rate")
        assert error_reason(RuntimeError("worker died\n\nexit code 1")) == "RuntimeError: exit code 1"
        assert error_reason(None) is None

    def test_table_and_best_trial_with_a_failed_trial(self):
        from ray_jobs.results import best_trial, format_table, pareto_front

        ok = {"trial": "a", "accuracy": 0.5, "calibration_error": 0.2, "score": 0.3, "status": "TERMINATED",
              "error": None}
        failed = {"trial": "b", "accuracy": 0.9, "calibration_error": 0.1, "score": 0.8, "status": "ERROR",
                  "error": "FloatingPointError: loss is nan at step 3"}
        table = format_table([ok, failed])
        assert table.splitlines()[0].split()[-1] == "error"
        assert table.splitlines()[3].startswith("b ") and table.endswith("FloatingPointError: loss is nan at step 3")
        assert best_trial([ok, failed]) is ok and pareto_front([ok, failed]) == [ok]  # its figures are not final
        assert format_table([ok]).splitlines()[0].split()[-1] == "status"  # no error column when none failed

    def test_a_tied_score_goes_to_the_lower_calibration_error_then_the_first_trial(self):
        from ray_jobs.results import best_trial, pareto_front

        rows = [{"trial": "t0", "accuracy": 0.5, "calibration_error": 0.2, "score": 0.5, "status": "TERMINATED"},
                {"trial": "t1", "accuracy": 0.5, "calibration_error": 0.1, "score": 0.5, "status": "TERMINATED"},
                {"trial": "t2", "accuracy": 0.5, "calibration_error": 0.1, "score": 0.5, "status": "TERMINATED"}]
        assert best_trial(rows)["trial"] == "t1" and best_trial(rows[::-1])["trial"] == "t1"  # lambda 0: ties
        assert best_trial(rows) in pareto_front(rows)

    def test_results_json_is_strict_json_with_nan_figures(self, tmp_path):
        from ray_jobs.results import write_results

        rows = [{"trial": "t0", "accuracy": 1.0, "val/med/auroc": float("nan"), "calibration_error": float("inf")}]
        write_results(tmp_path, rows, {"lambda": 1.0, "nested": {"x": [float("nan")]}})

        def refuse(constant):
            raise ValueError(f"not JSON: {constant}")

        results = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
        assert results["trials"][0]["val/med/auroc"] is None and results["trials"][0]["calibration_error"] is None
        assert results["nested"] == {"x": [None]} and results["trials"][0]["accuracy"] == 1.0

    def test_the_best_adapter_is_the_one_of_the_reported_step(self, tmp_path):
        """A trial ASHA stopped after reporting step 2 trained on a moment: checkpoint-2 was pruned to its
        validation.json and final/ holds step 4. Its figures are step 2's: best_accuracy/ has that adapter."""
        from conftok.modeling import METADATA_FILE
        from ray_jobs.results import ADAPTER_METADATA, best_adapter

        assert ADAPTER_METADATA == METADATA_FILE

        def adapter(path, step):
            path.mkdir(parents=True)
            (path / "adapter_model.safetensors").write_bytes(b"w")
            (path / METADATA_FILE).write_text(json.dumps({"global_step": step}))

        (tmp_path / "checkpoint-2").mkdir()
        (tmp_path / "checkpoint-2" / "validation.json").write_text("{}")
        adapter(tmp_path / "best_accuracy", 2)
        adapter(tmp_path / "final", 4)
        row = {"step": 2.0, "checkpoint": "bucket/exp/train/t/checkpoint-2"}
        assert best_adapter(tmp_path, row) == tmp_path / "best_accuracy"
        assert best_adapter(tmp_path, {**row, "step": 4.0}) == tmp_path / "final"
        adapter(tmp_path / "checkpoint-4", 4)
        assert best_adapter(tmp_path, {**row, "step": 4.0}) == tmp_path / "checkpoint-4"  # whole: the first choice
        shutil.rmtree(tmp_path / "best_accuracy")
        assert best_adapter(tmp_path, row) == Path("bucket/exp/train/t/checkpoint-2")  # only Ray's copy has it
