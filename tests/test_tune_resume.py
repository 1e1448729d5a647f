"""An interrupted search resumes (its own Ray, in subprocesses, like a user at a terminal)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml
from test_ray_jobs import (FAKE_HF_TOKEN, ROOT, assets, files_holding, job_env,  # noqa: F401  (module fixture)
                           write_space)

pytest.importorskip("ray")


class TestTuneResume:
    def test_interrupted_search_resumes(self, assets, tmp_path):
        """Kill a 3-trial search after its first trial finishes; --resume keeps it and runs the rest. The
        Hub token in its environment reaches no file of the experiment or of Ray's session and no output."""
        space = write_space(tmp_path / "resume.yaml", assets, trials=3, max_steps=2, eval_steps=1)
        exp = tmp_path / "exp" / "resume"
        cmd = [sys.executable, "-m", "ray_jobs.tune", "--space", str(space), "--storage_path", str(tmp_path / "exp")]
        ray_tmp = tempfile.mkdtemp(prefix="/tmp/ctr")  # Ray's socket paths must stay short
        env = job_env(ray_tmp)  # HF_TOKEN set
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        deadline = time.time() + 300
        finished_first = None
        while time.time() < deadline and proc.poll() is None:
            done = [p for p in (exp / "trials").glob("*/final/adapter_model.safetensors")] if exp.exists() else []
            if done:
                finished_first = done[0].parent.parent.name
                break
            time.sleep(1)
        assert finished_first, "first trial never finished"
        time.sleep(3)  # let Tune record the result in its experiment state
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert not (exp / "results.json").exists()  # it really was interrupted, and says so
        interrupted_output = proc.stdout.read()
        assert proc.returncode != 0, interrupted_output[-3000:]
        if proc.returncode == 130:  # Tune stopped gracefully and fit() returned: the resume command is printed
            assert "Search interrupted" in interrupted_output and "--resume" in interrupted_output
        out = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        results = json.loads((exp / "results.json").read_text())
        trials = {t["trial"]: t for t in results["trials"]}
        assert len(trials) == 3 and finished_first in trials
        assert all(t["status"] != "ERROR" for t in trials.values())
        # One stored KL reference for the search: the trials (and the resumed ones) share it.
        assert len(list((exp / "trials" / "cache").glob("base_topk-*.safetensors"))) == 1
        assert not list((exp / "trials").glob("*/cache"))
        import optuna

        study = optuna.load_study(study_name="resume", storage=f"sqlite:///{exp / 'study.db'}")
        states = [t.state.name for t in study.trials]  # each finished trial once; none left RUNNING
        assert states.count("COMPLETE") == 3 and "RUNNING" not in states, states

        # No leak: results, report, study.db, config dumps, TensorBoard events, Ray's experiment state,
        # params.json (the Tune parameter space), tuner.pkl, checkpoints, driver and worker logs.
        hits, read = files_holding(FAKE_HF_TOKEN, tmp_path, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not hits, hits
        assert FAKE_HF_TOKEN not in interrupted_output + out.stdout + out.stderr
        names = {p.name for p in exp.rglob("*") if p.is_file()}
        assert {"results.json", "report.html", "study.db", "params.json", "tuner.pkl", "conftok.json"} <= names
        assert any(n.startswith("events.out.tfevents") for n in names) and read > 100


def test_resume_refuses_a_space_file_changed_since_the_search_started(assets, tmp_path, monkeypatch, capsys):
    """Tune restores its searcher and parameter space from its pickles, but every trial gets the current file's
    train section: edit num_epochs and resume, and one study mixed two training configurations. The search records
    hashes of train, objective and scheduler in search.json; --resume refuses a file whose sections differ
    (exit 2, naming the file, the sections and the record), before any trial runs. No Ray: it is faked."""
    import ray.tune

    import ray_jobs.common
    import ray_jobs.tune
    from ray_jobs.tune import SEARCH_FILE, main

    class TunerBuilt(Exception):
        """The search got past its checks."""

    def build_tuner(*args, **kwargs):
        raise TunerBuilt

    monkeypatch.setattr(ray_jobs.common, "init_ray", lambda *a, **k: {"CPU": 2.0})
    monkeypatch.setattr(ray_jobs.common, "autoscaling_gpus", lambda *a, **k: (0.0, 0.0))
    monkeypatch.setattr(ray.tune.Tuner, "can_restore", staticmethod(lambda path: True))
    monkeypatch.setattr(ray_jobs.tune, "build_tuner", build_tuner)
    space = write_space(tmp_path / "edited.yaml", assets)
    argv = ["--space", str(space), "--storage_path", str(tmp_path / "exp")]
    with pytest.raises(TunerBuilt):
        main(argv)  # a new search records the space's hashes
    with pytest.raises(TunerBuilt):
        main(argv + ["--resume"])  # the same file resumes
    original = space.read_text()
    for section, edit in (("train", {"num_epochs": 2}), ("scheduler", {"max_t": 1})):
        data = yaml.safe_load(original)
        data[section].update(edit)
        space.write_text(yaml.safe_dump(data))
        capsys.readouterr()
        assert main(argv + ["--resume"]) == 2
        err = capsys.readouterr().err
        assert f"error: {space}: {section} changed since search 'edited' started" in err, err
        assert str(tmp_path / "exp" / "edited" / SEARCH_FILE) in err and "another --name" in err
    # More trials: Tune would restore the count the search started with and never reach the new one (every rerun
    # "interrupted", no results written). Refused the same way, from --num_trials or the file.
    space.write_text(original)
    trials = yaml.safe_load(original)["num_trials"]
    assert main(argv + ["--resume", "--num_trials", str(trials + 1)]) == 2
    err = capsys.readouterr().err
    assert f"search 'edited' started with {trials} trials" in err and f"resume with {trials}" in err, err
    with pytest.raises(TunerBuilt):
        main(argv + ["--resume", "--num_trials", str(trials)])
