"""Remote storage on a cluster (S3): nothing of a run stays only on the disk of the GPU node that trained it.

Ray and ray_jobs.mirror take a pyarrow SubTreeFileSystem over a temporary folder for a remote storage (it is not
the "local" filesystem), as they take S3. The Ray here is started with CONFTOK_NODE_DISK set, so that its workers
write their output_dir under a folder of their own ("the GPU node's disk"), where the driver does not look."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from test_ray_jobs import assets, scalar_steps, train_values, write_space  # noqa: F401  (module fixture)

pytest.importorskip("ray")
pyarrow_fs = pytest.importorskip("pyarrow.fs")

from ray_jobs.mirror import MANIFEST, MIRROR_DIR  # noqa: E402
from ray_jobs.train import FAULT_ENV, FAULT_MARKER_ENV, FAULT_WIPE_ENV, NODE_DISK_ENV  # noqa: E402


@pytest.fixture(scope="module")
def node_disk(tmp_path_factory):
    """A local Ray whose workers (started with this environment) write their trees under the returned folder."""
    import ray

    from ray_jobs.common import start_local_ray

    disk = tmp_path_factory.mktemp("gpu_node_disk")
    temp = tempfile.mkdtemp(prefix="/tmp/ctr")  # Ray's socket paths must stay short
    os.environ[NODE_DISK_ENV] = str(disk)
    try:
        start_local_ray(num_cpus=2, _temp_dir=temp, configure_logging=False, log_to_driver=False)
        yield disk
    finally:
        os.environ.pop(NODE_DISK_ENV, None)
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def bucket(tmp_path: Path):
    root = tmp_path / "bucket"
    root.mkdir()
    return pyarrow_fs.SubTreeFileSystem(str(root), pyarrow_fs.LocalFileSystem()), root


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_worker_restarted_on_a_node_without_the_tree_goes_on_with_all_of_it(assets, node_disk, tmp_path,
                                                                               monkeypatch):
    """The worker dies after step 4's validation and its node's disk with it; the restarted worker takes the tree
    back from storage: the final tree has the first worker's TensorBoard steps, every validation and best_*/, and
    the job fetches it all to the driver's --output_dir."""
    from conftok import TrainConfig
    from ray_jobs.mirror import fetch_run_tree
    from ray_jobs.train import build_trainer

    marker = tmp_path / "died"
    for key, value in ((FAULT_ENV, "4"), (FAULT_MARKER_ENV, str(marker)), (FAULT_WIPE_ENV, "1")):
        monkeypatch.setenv(key, value)
    filesystem, root = bucket(tmp_path)
    output_dir = tmp_path / "run"
    cfg = TrainConfig(**train_values(assets, output_dir=str(output_dir)))
    trainer = build_trainer(cfg, name="wiped", storage_path="ray", storage_filesystem=filesystem, num_gpus=0,
                            cpus_per_worker=1.0, max_failures=1)
    result = trainer.fit()
    assert result.error is None and marker.read_text() == "4"
    assert not output_dir.exists()  # the worker wrote on its node's disk only
    worker_tree = node_disk / str(output_dir.resolve()).lstrip("/")
    events = sorted((worker_tree / "logs").glob("events.out.tfevents.*"))
    assert len(events) == 2  # the first worker's file came back from storage, beside the second's
    assert sorted(s for e in events for s in scalar_steps(e, "train/loss")) == list(range(1, 9))
    for step in (2, 4, 6, 8):
        assert (worker_tree / f"checkpoint-{step}" / "validation.json").is_file(), step
    for name in ("best_accuracy", "best_calibration", "final"):
        assert (worker_tree / name / "adapter_model.safetensors").is_file(), name
    assert result.metrics["step"] == 8
    # Storage: Ray's last checkpoint (a copy, with its optimizer state) and the mirrored tree.
    assert (root / "ray" / "wiped" / "checkpoint-8" / "adapter_model.safetensors").is_file()
    manifest = json.loads((root / "ray" / "wiped" / MIRROR_DIR / MANIFEST).read_text())["files"]
    assert "final/final_metrics.json" in manifest and "checkpoint-2/validation.json" in manifest
    assert not any(rel.startswith("checkpoint-") and not rel.endswith("validation.json") for rel in manifest)
    # The driver's node gets the tree as the worker left it (what the mirror holds).
    fetched = fetch_run_tree(output_dir, (filesystem, "ray"), "wiped")
    assert sorted(fetched) == sorted(manifest)
    mine, theirs = files(output_dir), files(worker_tree)
    assert mine == {rel: theirs[rel] for rel in manifest}


def test_a_search_on_remote_storage_reports_trials_trained_on_other_disks(assets, node_disk, tmp_path, monkeypatch,
                                                                          capsys):
    """Trials train on "GPU nodes" whose trees the driver cannot see: the results, the report's curves and the best
    adapter come from storage."""
    import ray_jobs.tune as tune_job

    filesystem, root = bucket(tmp_path)
    monkeypatch.setattr(tune_job, "remote_storage", lambda path: (filesystem, "exp"))
    space = write_space(tmp_path / "far.yaml", assets)
    data = yaml.safe_load(space.read_text())
    space.write_text(yaml.safe_dump({**data, "scheduler": {"type": "none"}}))  # every trial to its end
    assert tune_job.main(["--space", str(space), "--storage_path", str(tmp_path / "exp")]) == 0
    assert "Trial trees:" in capsys.readouterr().out
    exp = tmp_path / "exp" / "far"
    results = json.loads((exp / "results.json").read_text())
    for t in results["trials"]:
        local = exp / "trials" / t["trial"]
        remote = node_disk / str(local.resolve()).lstrip("/")
        assert (remote / "final" / "final_metrics.json").is_file()  # trained over there
        assert t["status"] == "TERMINATED" and (local / "final" / "final_metrics.json").is_file()
        assert list((local / "logs").glob("events.out.tfevents.*")) and list(local.glob("checkpoint-*/validation.json"))
        weights = (local / "final" / "adapter_model.safetensors").is_file()
        assert weights == (t["trial"] == results["best_trial"])  # adapters only for the best trial
        assert (root / "exp" / "far" / "train" / t["trial"] / MIRROR_DIR / MANIFEST).is_file()
    best = Path(results["best_adapter"])
    assert best.is_relative_to(exp) and (best / "adapter_model.safetensors").is_file()
    report = (exp / "report" / "report.html").read_text()
    assert "nothing to plot" not in report
    # The search's own records are in storage too: a head that goes (KubeRay tears its pod down) loses nothing.
    from ray_jobs.mirror import main as fetch_main

    monkeypatch.setattr("ray_jobs.mirror.remote_storage", lambda path: (filesystem, path))
    assert fetch_main(["exp/far", str(tmp_path / "elsewhere"), "--search"]) == 0
    elsewhere = tmp_path / "elsewhere"
    assert {p.relative_to(elsewhere).as_posix() for p in elsewhere.rglob("*") if p.is_file()} >= {
        "study.db", "results.json", "results.csv", "report/report.html", "search.json"}
    assert json.loads((elsewhere / "search.json").read_text())["local_dir"] == str(exp)  # what --resume checks
    assert json.loads((elsewhere / "results.json").read_text()) == results
    import optuna

    study = optuna.load_study(study_name="far", storage=f"sqlite:///{elsewhere / 'study.db'}")
    assert len(study.trials) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)


def test_the_train_job_brings_the_tree_home_and_reads_a_divergence_from_storage(assets, node_disk, tmp_path,
                                                                                monkeypatch, capsys):
    """`python -m ray_jobs.train` with s3:// storage, its worker on another disk: a run that diverges exits 1 with
    the error from storage; a run into the same --output_dir that trains well exits 0 with the tree fetched
    home and the earlier run's diverged.json gone."""
    import ray_jobs.mirror
    from ray_jobs.train import FAULT_DIVERGE_ENV, main

    filesystem, _ = bucket(tmp_path)
    monkeypatch.setattr(ray_jobs.mirror, "remote_storage", lambda path: (filesystem, "ray"))
    output_dir = tmp_path / "run"
    argv = ["--model_name", assets["model"], "--train_data", assets["train"], "--output_dir", str(output_dir),
            "--backend", "hf", "--val_sources", *(f"{k}={v}" for k, v in assets["val"].items()), "--num_epochs", "1",
            "--eval_steps", "2", "--no-bf16", "--no-gradient_checkpointing", "--max_new_tokens", "4", "--lora_r", "4",
            "--lora_alpha", "8", "--calib_beta", "4", "--no-progress", "--num_gpus", "0", "--cpus_per_worker", "1",
            "--storage_path", "s3://bucket/ray"]
    monkeypatch.setenv(FAULT_DIVERGE_ENV, str(tmp_path / "diverge_once"))
    assert main([*argv, "--name", "first"]) == 1
    assert "training stopped: loss is" in capsys.readouterr().err
    assert (output_dir / "diverged.json").is_file()  # fetched home with the rest of the tree
    assert main([*argv, "--name", "second"]) == 0  # the marker exists: this one trains at its own rate
    assert not (output_dir / "diverged.json").exists()
    assert (output_dir / "final" / "adapter_model.safetensors").is_file() and "Run tree:" in capsys.readouterr().out
    assert not (node_disk / str(output_dir).lstrip("/") / "diverged.json").exists()
