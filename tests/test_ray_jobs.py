"""Ray Train and Tune on a local Ray with an in-process tiny model: reporting, worker recovery from
the last checkpoint, a Tune search with its results, an interrupted search resumed, and the
fail-fast GPU check."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import feature_rows, make_model, make_tokenizer, save_tiny_base, write_jsonl

pytest.importorskip("ray")

from conftok.checkpoint import TRAINER_STATE_FILE, TRAINER_TENSORS_FILE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VAL_BOOLQ = [{"id": f"b{i}", "question": f"is code {w} red", "passage": "The barn is red.", "answer": i % 3 != 0}
             for i, w in enumerate(["alpha", "beta"] * 3)]
VAL_MEDQA = [{"id": f"m{i}", "question": f"code {w}: which drug", "answer": "ABCD"[i % 4],
              "options": {"A": "aspirin", "B": "insulin", "C": "heparin", "D": "penicillin"}}
             for i, w in enumerate(["alpha", "beta"] * 3)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_assets")
    save_tiny_base(root / "base")
    return {
        "model": str(root / "base"),
        "train": write_jsonl(root / "train.jsonl", feature_rows(64, seed=1)),
        "val": {"boolq": write_jsonl(root / "boolq.jsonl", VAL_BOOLQ), "medqa": write_jsonl(root / "medqa.jsonl", VAL_MEDQA)},
    }


def train_values(assets, **over):
    return {"model_name": assets["model"], "train_data": assets["train"], "val_sources": assets["val"], "backend": "hf",
            "num_epochs": 2, "batch_size": 16, "learning_rate": 5e-3, "eval_steps": 2, "bf16": False,
            "gradient_checkpointing": False, "calib_beta": 4, "eval_batch_size": 8, "max_new_tokens": 4,
            "logging_steps": 1, "progress": False, "lora_r": 4, "lora_alpha": 8, **over}


def scalar_steps(events_file, tag):
    """Steps of one TensorBoard scalar in one event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(events_file), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from ray_jobs.common import start_local_ray  # its dashboard named to its workers: other clusters may run here

    temp = tempfile.mkdtemp(prefix="/tmp/ctr")  # Ray's socket paths must stay short
    start_local_ray(num_cpus=2, _temp_dir=temp, configure_logging=False, log_to_driver=False)
    yield ray.cluster_resources()
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


class TestRayTrain:
    def test_worker_death_resumes_from_last_checkpoint(self, assets, local_ray, tmp_path, monkeypatch):
        from conftok import TrainConfig
        from ray_jobs.train import FAULT_ENV, FAULT_MARKER_ENV, build_trainer

        marker = tmp_path / "died"
        monkeypatch.setenv(FAULT_ENV, "4")
        monkeypatch.setenv(FAULT_MARKER_ENV, str(marker))
        cfg = TrainConfig(**train_values(assets, output_dir=str(tmp_path / "run")))
        trainer = build_trainer(cfg, name="fault", storage_path=str(tmp_path / "ray"), num_gpus=0,
                                cpus_per_worker=1.0, max_failures=1)
        result = trainer.fit()
        assert result.error is None
        assert marker.read_text() == "4"  # the worker did die after reporting step 4
        # Resumed after 4, nothing repeated: the restarted worker's TensorBoard file starts at step 5.
        second = max((tmp_path / "run" / "logs").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
        assert min(scalar_steps(second, "train/loss")) == 5
        assert result.metrics["step"] == 8 and 0 <= result.metrics["val/accuracy"] <= 1
        assert [m["step"] for _, m in result.best_checkpoints] == [8]  # Ray keeps the last checkpoint only
        # One copy on disk: Ray's checkpoint, the run's checkpoint-8 and final/ are links to the same files,
        # and the run being finished, neither checkpoint-8 keeps the optimizer state.
        run, ray_run = tmp_path / "run", tmp_path / "ray" / "fault"
        assert Path(result.checkpoint.path) == ray_run / "checkpoint-8"
        assert sorted(p.name for p in ray_run.glob("checkpoint-*")) == ["checkpoint-8"]
        adapter = "adapter_model.safetensors"
        for name in (adapter, "adapter_config.json", "tokenizer.json", "validation.json"):
            assert os.path.samefile(ray_run / "checkpoint-8" / name, run / "checkpoint-8" / name), name
        assert os.path.samefile(run / "final" / adapter, run / "checkpoint-8" / adapter)
        for checkpoint in (ray_run / "checkpoint-8", run / "checkpoint-8"):
            assert not any((checkpoint / name).exists() for name in (TRAINER_STATE_FILE, TRAINER_TENSORS_FILE))
        for step in (2, 4, 6):
            assert [p.name for p in (run / f"checkpoint-{step}").iterdir()] == ["validation.json"]
        assert (run / "best_accuracy" / "adapter_model.safetensors").is_file()
        assert not (run / "best_accuracy" / TRAINER_STATE_FILE).exists()

    def test_more_gpus_than_the_cluster_fails_at_once(self, local_ray):
        from ray_jobs.common import ResourceError, check_resources

        start = time.perf_counter()
        with pytest.raises(ResourceError, match=r"1 GPU\(s\) per worker requested, but the cluster has 0"):
            check_resources(1.0, 1.0, local_ray)
        assert time.perf_counter() - start < 1
        check_resources(1.0, 1.0, local_ray, autoscaling_gpus=8)  # a GPU node type can still come

    def test_cli_flags_match_the_seed(self):
        from ray_jobs.common import config_from_args
        from ray_jobs.train import parse_args

        args = parse_args(["--model_name", "m", "--train_data", "t.jsonl", "--output_dir", "o", "--num_epochs", "2",
                           "--batch_size", "4", "--learning_rate", "1e-4", "--lora_r", "8", "--lora_alpha", "16",
                           "--lora_dropout", "0.1", "--calib_beta", "50", "--calib_p_norm", "infty",
                           "--max_seq_length", "1024", "--no-bf16", "--seed", "7", "--eval_steps", "100",
                           "--hf_repo", "me/x", "--val_sources", "boolq=v.jsonl", "--num_gpus", "0"])
        cfg = config_from_args(args)
        assert (cfg.num_epochs, cfg.batch_size, cfg.lora_r, cfg.lora_alpha, cfg.calib_beta) == (2, 4, 8, 16, 50)
        assert cfg.calib_p_norm == "infty" and cfg.bf16 is False and cfg.seed == 7 and cfg.eval_steps == 100
        assert cfg.val_sources == {"boolq": "v.jsonl"} and cfg.hf_repo == "me/x" and args.num_gpus == 0

    def test_hub_push_writes_a_model_card_with_metrics(self, tmp_path, monkeypatch, capsys):
        import huggingface_hub

        from conftok.modeling import build_model, save_adapter
        from ray_jobs.hub import push_adapter

        tok = make_tokenizer()
        model, tok = build_model(make_model(len(tok)), tokenizer=tok, backend="hf", bf16=False,
                                 gradient_checkpointing=False)
        save_adapter(model, tok, tmp_path / "final", extra={"config": {"placement_weight": 1.0, "kl_weight": 0.5}})
        calls = []

        class FakeApi:
            def create_repo(self, repo, **kw):
                calls.append(("create", repo, kw))

            def upload_folder(self, **kw):
                calls.append(("upload", kw["repo_id"], sorted(os.listdir(kw["folder_path"]))))

        monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
        monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
        url = push_adapter(tmp_path / "final", "me/conf", metrics={"val/accuracy": 0.75, "val/calibration_error": 0.12,
                                                                   "val/read/token_accuracy": 0.8, "step": 10})
        assert url.endswith("me/conf") and calls[0][:2] == ("create", "me/conf")
        assert "adapter_model.safetensors" in calls[1][2] and "README.md" in calls[1][2]
        card = (tmp_path / "final" / "README.md").read_text()
        assert "| val/accuracy | 0.7500 |" in card and "| val/read/token_accuracy | 0.8000 |" in card
        assert "<C_READ>" in card
        assert "placement weight 1, KL weight 0.5" in card  # the card says how it was trained
        assert "hf_secret_value_123" not in card and "hf_secret_value_123" not in capsys.readouterr().out


def write_space(path, assets, trials=2, **over):
    space = {"name": path.stem, "train": {k: v for k, v in train_values(assets, num_epochs=1, **over).items()},
             "search": {"lora_r": {"choice": [4, 8]}, "lora_alpha": {"multiple_of_rank": [1, 2]},
                        "learning_rate": {"loguniform": [1e-3, 1e-2]}},
             "objective": {"type": "score", "lambda": 1.0},
             "scheduler": {"type": "asha", "grace_period": 1, "max_t": 2},
             "num_trials": trials, "seed": 0, "resources": {"gpus_per_trial": "auto", "max_failures": 1}}
    for k in ("lora_r", "lora_alpha", "learning_rate"):
        space["train"].pop(k)
    path.write_text(yaml.safe_dump(space))
    return path


class TestRayTune:
    def test_search_writes_table_study_and_results(self, assets, local_ray, tmp_path, capsys):
        import optuna

        from ray_jobs.tune import main

        space = write_space(tmp_path / "tiny.yaml", assets)
        assert main(["--space", str(space), "--storage_path", str(tmp_path / "exp")]) == 0
        out = capsys.readouterr().out
        exp = tmp_path / "exp" / "tiny"
        results = json.loads((exp / "results.json").read_text())
        assert len(results["trials"]) == 2 and results["best_trial"] in {t["trial"] for t in results["trials"]}
        assert "lora_r" in out and "Best trial" in out and "Best adapter:" in out
        for t in results["trials"]:
            assert t["score"] == pytest.approx(t["accuracy"] - t["calibration_error"])
            assert type(t["validations"]) is int and t["validations"] >= 1  # a count (Ray reports floats)
            assert t["lora_alpha"] in (t["lora_r"], 2 * t["lora_r"])
            assert (exp / "trials" / t["trial"] / "logs").is_dir()  # per-trial TensorBoard
        assert Path(results["best_adapter"], "adapter_model.safetensors").is_file()
        assert (exp / "results.csv").read_text().count("\n") == 3
        study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{exp / 'study.db'}")
        assert len(study.trials) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)
        # What --resume checks the space file against (test_tune_resume.py)
        assert set(json.loads((exp / "search.json").read_text())["space_hashes"]) == {"train", "objective", "scheduler"}


# A Hub token shaped like a real one, set in the jobs' environment (where huggingface_hub reads it).
FAKE_HF_TOKEN = "hf_fakeLeakCheck7Qz9Xw2Vb4Nm6Lk8Jh0Gf3Ds5Ap1"


def files_holding(secret: str, *roots) -> tuple[list[str], int]:
    """(files whose bytes hold ``secret`` as UTF-8 or UTF-16, number of files read): every regular
    file under ``roots`` (pickles, SQLite, TensorBoard events, logs), symlinks not followed."""
    needles = (secret.encode(), secret.encode("utf-16-le"))
    hits, read = [], 0
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):  # sockets, links
                    continue
                with open(path, "rb") as f:
                    data = f.read()
                read += 1
                if any(n in data for n in needles):
                    hits.append(path)
    return hits, read


def job_env(ray_tmp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_TOKEN")}
    return {**env, "HF_TOKEN": FAKE_HF_TOKEN, "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": ray_tmp}


class TestNoLeaks:
    """The Hub token in the environment reaches no file a job writes (its output, Ray's storage and
    session logs), no printed line and no runtime_env. The search's half is in test_tune_resume.py,
    which runs its interrupted and resumed search with the token set."""

    def test_the_scan_finds_the_token(self, tmp_path):
        (tmp_path / "a" / "b").mkdir(parents=True)
        (tmp_path / "a" / "b" / "events.bin").write_bytes(b"\x00\x08" + FAKE_HF_TOKEN.encode() + b"\xff")
        (tmp_path / "a" / "wide.txt").write_bytes(FAKE_HF_TOKEN.encode("utf-16-le"))
        (tmp_path / "a" / "clean.json").write_text('{"hf_repo": null}')
        (tmp_path / "link").symlink_to(tmp_path / "a" / "wide.txt")
        hits, read = files_holding(FAKE_HF_TOKEN, tmp_path)
        assert sorted(Path(h).name for h in hits) == ["events.bin", "wide.txt"] and read == 3

    def test_init_ray_passes_no_secret_in_runtime_env(self, monkeypatch):
        import ray

        from ray_jobs.common import init_ray

        seen = {}
        monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
        monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", FAKE_HF_TOKEN)
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
        init_ray()
        env_vars = seen["runtime_env"]["env_vars"]
        assert set(env_vars) == {"RAY_TRAIN_ENABLE_PRINT_PATCH", "HF_HUB_OFFLINE"}
        assert FAKE_HF_TOKEN not in repr(seen)

    def test_train_job_leaks_no_token(self, assets, tmp_path):
        """``python -m ray_jobs.train`` with HF_TOKEN set: its run tree, Ray's storage, Ray's session
        directory (driver and worker logs) and its output never hold the token."""
        ray_tmp = tempfile.mkdtemp(prefix="/tmp/ctl")  # Ray's socket paths must stay short
        run = tmp_path / "train" / "run"
        cmd = [sys.executable, "-m", "ray_jobs.train", "--model_name", assets["model"], "--train_data", assets["train"],
               "--output_dir", str(run), "--val_sources", *(f"{k}={v}" for k, v in assets["val"].items()),
               "--backend", "hf", "--max_steps", "2", "--eval_steps", "1", "--batch_size", "16", "--no-bf16",
               "--gradient_checkpointing", "false", "--calib_beta", "4", "--eval_batch_size", "8",
               "--max_new_tokens", "4", "--logging_steps", "1", "--no-progress", "--lora_r", "4", "--lora_alpha", "8",
               "--num_gpus", "0", "--save_total_limit", "none"]  # every file a run can write is kept to be scanned
        try:
            out = subprocess.run(cmd, cwd=ROOT, env=job_env(ray_tmp), capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            hits, read = files_holding(FAKE_HF_TOKEN, tmp_path, ray_tmp)
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not hits, hits
        assert FAKE_HF_TOKEN not in out.stdout + out.stderr
        written = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
        assert {"final/conftok.json", "checkpoint-1/trainer_state.json", "checkpoint-2/trainer_state.json"} <= written
        assert any(p.startswith("logs/events.out.tfevents") for p in written) and read > 50


def test_paths_are_taken_from_where_the_job_was_started(tmp_path, monkeypatch):
    """The Ray worker runs in another directory: relative paths are made absolute on the driver."""
    from conftok.config import TrainConfig
    from ray_jobs.train import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(TrainConfig(train_data="t.jsonl", output_dir="runs/a", reference_cache="shared/cache"))
    assert (cfg.train_data, cfg.output_dir, cfg.reference_cache) == (
        str(tmp_path / "t.jsonl"), str(tmp_path / "runs" / "a"), str(tmp_path / "shared" / "cache"))
    for kept in ("auto", ""):
        assert with_absolute_paths(TrainConfig(reference_cache=kept)).reference_cache == kept


def test_local_model_validation_and_domain_files_are_taken_from_where_the_job_was_started(tmp_path, monkeypatch):
    """Checked on the driver, read in the worker: a relative local model, validation file or domains file named
    nothing there (the model was taken for a Hub id). Hub names stay as they are."""
    import yaml

    from conftok.config import TrainConfig
    from conftok.domains import DEFAULT_DOMAINS, resolve_domains
    from ray_jobs.train import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    (tmp_path / "val").mkdir()
    for name in ("boolq.jsonl", "medqa.jsonl"):
        (tmp_path / "val" / name).write_text("")
    domains = [d.to_dict() for d in DEFAULT_DOMAINS]
    (tmp_path / "hub_domains.yaml").write_text(yaml.safe_dump({"domains": domains}))
    domains[1]["validation"] = "val/medqa.jsonl"
    (tmp_path / "local_domains.yaml").write_text(yaml.safe_dump({"domains": domains}))

    cfg = with_absolute_paths(TrainConfig(model_name="base", val_sources={"boolq": "val/boolq.jsonl",
                                                                          "medqa": "huyxdang/medqa-split"},
                                          domains="hub_domains.yaml"))
    assert cfg.model_name == str(tmp_path / "base")
    assert cfg.val_sources == {"boolq": str(tmp_path / "val" / "boolq.jsonl"), "medqa": "huyxdang/medqa-split"}
    assert cfg.domains == str(tmp_path / "hub_domains.yaml")
    cfg = with_absolute_paths(TrainConfig(domains="local_domains.yaml"))
    assert [d.validation for d in resolve_domains(cfg.domains)] == [
        DEFAULT_DOMAINS[0].validation, str(tmp_path / "val" / "medqa.jsonl")]
    hub = TrainConfig(model_name="Qwen/Qwen2.5-0.5B-Instruct", domains=None)
    assert with_absolute_paths(hub).model_name == hub.model_name and with_absolute_paths(hub).domains is None


def test_a_job_whose_runtime_env_sets_the_same_variables_still_starts(monkeypatch):
    """`ray job submit --runtime-env-json '{"env_vars": {"HF_HUB_OFFLINE": "1"}}'` (the usual way to run offline):
    Ray merges the job's runtime_env with the driver's ray.init one and refuses a key both set, even with the same
    value. The driver leaves the job's keys to the job."""
    from ray._private.worker import _merge_runtime_env
    from ray.job_config import JobConfig

    from ray_jobs.common import driver_env_vars

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert driver_env_vars() == {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "HF_HUB_OFFLINE": "1"}  # a driver of its own
    job = {"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}, "working_dir": "gcs://_ray_pkg_x.zip"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))  # as the job supervisor sets it
    job_env = JobConfig.from_json(job).runtime_env
    assert _merge_runtime_env(job_env, {"env_vars": {"HF_HUB_OFFLINE": "1"}}) is None  # what Ray refuses
    merged = _merge_runtime_env(job_env, {"env_vars": driver_env_vars()})
    assert merged is not None and merged["env_vars"] == {"HF_HUB_OFFLINE": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


@pytest.mark.parametrize("job", ["train", "tune", "evaluate", "tag", "export", "report", "mirror"])
def test_every_job_prints_its_help(job, capsys):
    """`python -m ray_jobs.<job> --help` prints every flag and exits 0. argparse formats help texts with %, so
    a TrainConfig help text with a literal % (a share, "69% padding") must reach it escaped."""
    import importlib

    module = importlib.import_module(f"ray_jobs.{job}")
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m ray_jobs.{job} ")  # how it is run (argparse said "train.py")
    if job == "train":  # one flag per TrainConfig field
        assert "--eval_batching" in out and "69% padding" in out


def test_a_rerun_with_other_settings_is_refused_before_ray_starts(assets, tmp_path, monkeypatch, capsys):
    """Ray Train resumes a run of the same name it finds in storage (the default name: the output_dir's). Run again
    into the same --output_dir with another learning rate, the job stops before Ray starts (exit 2), naming the
    setting and the way out, instead of resuming the old run's optimizer and data order (or returning its
    adapter, had it finished) under the new flags. The same flags pass the check (a rerun resumes)."""
    import ray_jobs.common
    from ray_jobs.common import config_from_args
    from ray_jobs.train import check_stored_run, main, parse_args, with_absolute_paths

    monkeypatch.setattr(ray_jobs.common, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    argv = ["--model_name", assets["model"], "--train_data", assets["train"], "--output_dir", str(tmp_path / "run"),
            "--backend", "hf", "--learning_rate", "5e-3", "--val_sources", *(f"{k}={v}" for k, v in assets["val"].items())]
    cfg = with_absolute_paths(config_from_args(parse_args(argv)))
    stored = tmp_path / "ray_results" / "run"
    for step, config in ((2, {**cfg.to_dict(), "learning_rate": 1.0}), (4, {**cfg.to_dict(), "learning_rate": 1e-2})):
        (stored / f"checkpoint-{step}").mkdir(parents=True)
        (stored / f"checkpoint-{step}" / "conftok.json").write_text(json.dumps({"config": config}))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "learning_rate: 0.01 -> 0.005" in err and "checkpoint-4" in err  # the checkpoint Ray would resume
    assert f"delete {stored}" in err and "--output_dir" in err
    # Remote storage (s3://) is read the same way, before Ray starts.
    import pyarrow.fs

    from conftok.config import ConfigError

    bucket = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())
    with pytest.raises(ConfigError, match=r"s3://b/ray_results/run/checkpoint-4, written by a run with other settings "
                                          r"\(learning_rate: 0.01 -> 0.005\)"):
        check_stored_run(cfg, "s3://b/ray_results", "run", (bucket, "ray_results"))
    (stored / "checkpoint-4" / "conftok.json").write_text(json.dumps({"config": cfg.to_dict()}))
    check_stored_run(cfg, str(tmp_path / "ray_results"), "run")  # the same settings: Ray may resume it
    check_stored_run(cfg, "s3://b/ray_results", "run", (bucket, "ray_results"))
    check_stored_run(cfg, str(tmp_path / "elsewhere"), "run")  # nothing stored
    # The same flags on a training file tagged again in place: refused too (the checkpoint keeps its SHA-256).
    inputs = {**cfg.input_fingerprints(), "train_data_sha256": "0" * 64}
    (stored / "checkpoint-4" / "conftok.json").write_text(json.dumps({"config": cfg.to_dict(), "inputs": inputs}))
    with pytest.raises(ConfigError, match=r"train_data .*: its content \(SHA-256\) 000000000000… -> "):
        check_stored_run(cfg, str(tmp_path / "ray_results"), "run")


def test_a_ray_up_clusters_gpu_node_types_count_before_any_gpu_node_is_up(tmp_path):
    """On a `ray up` head Ray 2.60's GCS holds no cluster config (get_cluster_config() is None: nothing reports
    it), so the GPU node types come from the config `ray up` leaves there (~/ray_bootstrap_config.yaml). With
    the project's cluster.yaml: 8 GPUs a node, up to 4 nodes; a one-GPU trial passes the fail-fast check on a
    head with no GPU yet (it was refused: "the cluster has 0 (0 now, 0 more from autoscaling)")."""
    import shutil

    from ray_jobs.common import check_resources, autoscaling_gpus

    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    shutil.copy(Path(__file__).resolve().parent.parent / "cluster.yaml", bootstrap)
    assert autoscaling_gpus(bootstrap) == (8.0, 32.0)
    check_resources(1.0, 16.0, {"CPU": 8.0}, autoscaling_gpus=autoscaling_gpus(bootstrap)[0])
    assert autoscaling_gpus(tmp_path / "none.yaml") == (0.0, 0.0)  # no autoscaler: only what is there counts
    bootstrap.write_text("max_workers: 1\navailable_node_types:\n  a: {resources: {GPU: 4}, max_workers: 3}\n"
                         "  b: {resources: {GPU: 2}, max_workers: 0}\n  head: {resources: {CPU: 2}}\n")
    assert autoscaling_gpus(bootstrap) == (4.0, 4.0)  # b cannot start; the cluster caps a at 1 node


def test_a_search_asking_for_gpus_a_cpu_cluster_lacks_names_the_searchs_own_way_out(assets, tmp_path, monkeypatch,
                                                                                    capsys):
    """The resource error names flags the job has: for ray_jobs.tune --cpu / --allow_cpu and the space's
    resources.cpus_per_trial (it said "use --num_gpus 0", which ray_jobs.tune does not take)."""
    import ray_jobs.common
    from ray_jobs.tune import main

    space = write_space(tmp_path / "gpu.yaml", assets)
    data = yaml.safe_load(space.read_text())
    data["resources"]["gpus_per_trial"] = 1
    space.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(ray_jobs.common, "init_ray", lambda *a, **k: {"CPU": 2.0})
    monkeypatch.setattr(ray_jobs.common, "autoscaling_gpus", lambda *a, **k: (0.0, 0.0))
    assert main(["--space", str(space), "--storage_path", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert "pass --cpu (or --allow_cpu)" in err and "--num_gpus" not in err


def test_a_space_whose_training_rows_are_missing_names_the_file_the_field_and_the_directory(assets, tmp_path,
                                                                                            monkeypatch, capsys):
    """A job submitted with --working-dir . runs in a copy that leaves out git-ignored files (tagged/): the
    space's relative train_data is not there. The error names the space file, its field and where it was read."""
    from ray_jobs.tune import main

    space = write_space(tmp_path / "cluster.yaml", assets)
    data = yaml.safe_load(space.read_text())
    data["train"]["train_data"] = "tagged/qwen/qwen_all_tagged.jsonl"
    space.write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(space), "--storage_path", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert (f"error: {space}: train.train_data 'tagged/qwen/qwen_all_tagged.jsonl', read from {tmp_path}: "
            "tagged/qwen/qwen_all_tagged.jsonl: file not found") in err, err
    assert not (tmp_path / "exp").exists()


def test_a_cluster_that_refuses_the_drivers_token_is_one_line_and_exit_2(monkeypatch, capsys):
    """Ray 2.60's head turns token auth on once ~/.ray/auth_token exists; a driver without RAY_AUTH_MODE=token
    got Ray's 40-line traceback (the ConnectionError below, as ray.init raises it, its cause's text)."""
    import ray

    from ray_jobs.common import init_ray

    def refused(*args, **kwargs):
        try:
            raise RuntimeError("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
                               "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token "
                               "is missing or incorrect.")
        except RuntimeError as e:
            raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.2:39567") from e

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(SystemExit) as stopped:
        init_ray("192.0.2.2:39567")
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the Ray cluster at 192.0.2.2:39567 uses token authentication") and \
        "export RAY_AUTH_MODE=token" in err and len(err.splitlines()) == 1

    def absent(*args, **kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 192.0.2.2:1")

    monkeypatch.setattr(ray, "init", absent)
    with pytest.raises(SystemExit):
        init_ray("192.0.2.2:1")
    assert "error: cannot connect to a Ray cluster at 192.0.2.2:1" in capsys.readouterr().err


@pytest.mark.parametrize("count", ["0", "-1"])
def test_a_trial_count_below_one_is_refused(assets, tmp_path, capsys, count):
    """--num_trials 0 was ignored (the space's count ran) and -1 reached Tune, for which it means no limit."""
    from ray_jobs.tune import main

    space = write_space(tmp_path / "few.yaml", assets)
    assert main(["--space", str(space), "--storage_path", str(tmp_path / "exp"), "--num_trials", count]) == 2
    assert f"--num_trials must be at least 1, got {count}" in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()


def train_job_argv(assets, output_dir):
    return ["--model_name", assets["model"], "--train_data", assets["train"], "--output_dir", str(output_dir),
            "--backend", "hf", "--val_sources", *(f"{k}={v}" for k, v in assets["val"].items())]


@pytest.fixture
def fake_ray_train(monkeypatch):
    """``ray_jobs.train.main`` with no Ray: a cluster of 2 CPUs, and a trainer whose ``fit`` does what the test says
    (``fake_ray_train["fit"]``); records what the job gave ``build_trainer`` and ``check_stored_run``."""
    import ray_jobs.common
    import ray_jobs.train

    seen = {"fit": lambda: type("Result", (), {"error": None, "metrics": {}})()}
    check_stored_run = ray_jobs.train.check_stored_run

    def record_check(cfg, storage, name, remote=None):
        seen["checked_storage"] = storage
        return check_stored_run(cfg, storage, name, remote)

    def build_trainer(cfg, **kwargs):
        seen["trainer"] = kwargs
        return type("Trainer", (), {"fit": lambda self: seen["fit"]()})()

    monkeypatch.setattr(ray_jobs.common, "init_ray", lambda *a, **k: {"CPU": 2.0})
    monkeypatch.setattr(ray_jobs.common, "autoscaling_gpus", lambda *a, **k: (0.0, 0.0))
    monkeypatch.setattr(ray_jobs.train, "check_stored_run", record_check)
    monkeypatch.setattr(ray_jobs.train, "build_trainer", build_trainer)
    return seen


@pytest.mark.parametrize("given, expected", [("ray_rel", "work/ray_rel"), ("~/ray_home", "home/ray_home")])
def test_a_local_storage_path_is_resolved_before_ray_gets_it(assets, fake_ray_train, tmp_path, monkeypatch, given,
                                                            expected):
    """Ray's RunConfig takes a local storage path through pyarrow, which refuses a relative one ("URI has empty
    scheme: 'ray_results'", once Ray had started); and the stored-run check must look where Ray will."""
    from ray_jobs.train import main

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert main([*train_job_argv(assets, tmp_path / "run"), "--storage_path", given]) == 0
    assert fake_ray_train["trainer"]["storage_path"] == str(tmp_path / expected)
    assert fake_ray_train["checked_storage"] == str(tmp_path / expected)


def test_a_push_that_cannot_work_is_refused_before_training_and_a_failed_one_keeps_the_run(
        assets, fake_ray_train, tmp_path, monkeypatch, capsys):
    """--hf_repo was tried only after training: offline or without a usable token, hours of a run ended in a
    huggingface_hub traceback. Both are found before Ray starts (exit 2); a push that still fails says where the
    adapter is (exit 1, one line)."""
    import huggingface_hub

    import ray_jobs.hub
    from ray_jobs.train import main

    argv = [*train_job_argv(assets, tmp_path / "run"), "--hf_repo", "me/conf"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(argv) == 2 and "trainer" not in fake_ray_train
    assert "error: --hf_repo me/conf: the Hub is switched off here (HF_HUB_OFFLINE=1)" in capsys.readouterr().err

    class Api:
        def whoami(self):
            raise huggingface_hub.errors.LocalTokenNotFoundError("Token is required, but no token found.")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    assert main(argv) == 2 and "trainer" not in fake_ray_train
    err = capsys.readouterr().err
    assert "error: --hf_repo me/conf: the Hub does not accept this machine's token (LocalTokenNotFoundError" in err

    Api.whoami = lambda self: {"name": "me"}

    def push(adapter_dir, repo, **kwargs):
        raise OSError("403 Forbidden: no write access to me/conf")

    monkeypatch.setattr(ray_jobs.hub, "push_adapter", push)
    assert main(argv) == 1 and "trainer" in fake_ray_train
    err = capsys.readouterr().err
    assert f"error: push to me/conf failed (OSError: 403 Forbidden: no write access to me/conf); the adapter is in " \
           f"{tmp_path / 'run' / 'final'}" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_a_failed_training_exits_1_and_still_fetches_the_run_tree(assets, fake_ray_train, tmp_path, monkeypatch,
                                                                  capsys, storage):
    """Train V2's fit() raises TrainingFailedError itself once max_failures is spent (it never returns a result with
    an error): the job says so in one line and exits 1, and on s3:// still brings the run's tree (logs, validations,
    best_*/) into --output_dir."""
    import pyarrow.fs
    from ray.train import WorkerGroupError

    import ray_jobs.mirror
    from ray_jobs.train import main

    def fail():
        raise WorkerGroupError("worker 0 ran out of memory", {0: MemoryError("CUDA out of memory")})

    fetched = []
    bucket = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "s3"), pyarrow.fs.LocalFileSystem())
    if storage == "s3":
        monkeypatch.setattr(ray_jobs.mirror, "remote_storage", lambda path: (bucket, "b/ray"))
    monkeypatch.setattr(ray_jobs.mirror, "fetch_run_tree", lambda *args: fetched.append(args))
    fake_ray_train["fit"] = fail
    argv = [*train_job_argv(assets, tmp_path / "run"), "--storage_path", str(tmp_path / "ray")]
    if storage == "s3":
        argv[-1] = "s3://b/ray"
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "error: training failed: Training failed due to worker errors:\nworker 0 ran out of memory" in err
    assert "Traceback" not in err
    assert fetched == ([(tmp_path / "run", (bucket, "b/ray"), "run")] if storage == "s3" else [])


def test_the_last_validation_is_reported_once_final_is_written(assets, tmp_path, monkeypatch):
    """ASHA may stop a trial at any report (a rung at the last validation included), and Tune then ends the worker
    at once: the worker reports every validation as it comes but the run's last, which it reports once train() has
    written final/ and final_metrics.json."""
    import pyarrow.fs
    import ray.train

    from conftok.config import TrainConfig
    from ray_jobs.train import train_func

    reports = []
    run = tmp_path / "run"

    def report(metrics, checkpoint=None, checkpoint_dir_name=None, checkpoint_upload_fn=None):
        reports.append((metrics["step"], (run / "final" / "final_metrics.json").is_file()))

    storage = type("Storage", (), {"storage_filesystem": pyarrow.fs.LocalFileSystem(),
                                   "experiment_fs_path": str(tmp_path / "ray")})()
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "get_context", lambda: type("Context", (), {"get_storage": lambda self: storage})())
    monkeypatch.setattr(ray.train.Checkpoint, "from_directory", staticmethod(lambda path: path))
    cfg = TrainConfig(**train_values(assets, output_dir=str(run), num_epochs=1, eval_steps=2, torch_compile=False))
    train_func({"train": cfg.to_dict()})
    assert reports == [(2, False), (4, True)]  # 64 rows at batch 16: validations at steps 2 and 4 (the last)


def test_a_dashboard_port_taken_before_ray_binds_it_is_chosen_again(monkeypatch):
    """The free port start_local_ray picks may be taken by another process (another local Ray starting) before the
    dashboard binds it (Ray fails with "address already in use", or "already occupied" at its own check): a new
    port is tried, named to the workers as the dashboard's. Other errors are raised at once. (A real taken port,
    held by a listening socket, was checked by hand: the retry started Ray and ran a task.)"""
    import ray

    from ray_jobs import common

    calls, shutdowns = [], []

    def fake_init(**kwargs):
        calls.append((kwargs["dashboard_port"], os.environ["RAY_API_SERVER_ADDRESS"]))
        if len(calls) == 1:  # taken between the choice and the binding
            raise Exception("Failed to find a valid port for dashboard after 0 retries: [Errno 98] error while "
                            "attempting to bind on address ('127.0.0.1', 33321): address already in use")
        if len(calls) == 2:  # taken before Ray's own check
            raise ValueError("Failed to bind to 127.0.0.1:40000 because it's already occupied.")

    ports = iter([33321, 40000, 40001])
    monkeypatch.setattr(common, "_free_port", lambda: next(ports))
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    common.start_local_ray(num_cpus=1)
    assert calls == [(33321, "http://127.0.0.1:33321"), (40000, "http://127.0.0.1:40000"),
                     (40001, "http://127.0.0.1:40001")] and shutdowns == [1, 1]

    def broken(**kwargs):
        raise Exception("GCS failed to start")

    monkeypatch.setattr(ray, "init", broken)
    monkeypatch.setattr(common, "_free_port", lambda: 40002)
    with pytest.raises(Exception, match="GCS failed"):
        common.start_local_ray(num_cpus=1)
