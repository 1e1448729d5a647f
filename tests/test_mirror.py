"""A run's tree mirrored into remote storage (ray_jobs.mirror): what goes, what a push sends, what a fetch brings
back and what it refuses. The storage here is a pyarrow SubTreeFileSystem over a temporary folder: Ray and the
mirror take it for a remote one (it is not the "local" filesystem), as they take S3."""

import json
import logging
import os
from pathlib import Path

import pytest

pyarrow_fs = pytest.importorskip("pyarrow.fs")

from conftok.checkpoint import link_tree  # noqa: E402
from ray_jobs.mirror import (MANIFEST, MIRROR_DIR, RunMirror, is_mirrored, is_record, read_run_file,  # noqa: E402
                             remote_storage)


def bucket(tmp_path: Path):
    root = tmp_path / "bucket"
    root.mkdir(exist_ok=True)
    return pyarrow_fs.SubTreeFileSystem(str(root), pyarrow_fs.LocalFileSystem()), root


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_tree(out: Path) -> None:
    """A run's tree as conftok.train leaves it after two validations, with the leftovers a mirror must skip."""
    for step, weights in ((2, b"W2" * 500), (4, b"W4" * 500)):
        write(out / f"checkpoint-{step}" / "validation.json", json.dumps({"step": step}).encode())
        write(out / f"checkpoint-{step}" / "adapter_model.safetensors", weights)
        write(out / f"checkpoint-{step}" / "trainer_state.safetensors", b"optimizer" * 300)
    link_tree(out / "checkpoint-2", out / "best_accuracy", skip=("trainer_state.safetensors",))
    link_tree(out / "checkpoint-4", out / "best_calibration", skip=("trainer_state.safetensors",))
    write(out / "logs" / "events.out.tfevents.1", b"scalars")
    write(out / "reliability_epoch_1.json", b"{}")
    write(out / "cache" / "reference.safetensors", b"topk" * 1000)  # remade from the base model
    write(out / ".checkpoint-6.staging-999999" / "adapter_model.safetensors", b"half")  # a write in progress


def stored(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


class TestSelection:
    def test_what_is_mirrored(self):
        assert is_mirrored("logs/events.out.tfevents.1") and is_mirrored("final/adapter_model.safetensors")
        assert is_mirrored("checkpoint-4/validation.json") and is_mirrored("diverged.json")
        assert not is_mirrored("checkpoint-4/adapter_model.safetensors")  # Ray's checkpoint has the last one
        assert not is_mirrored("checkpoint-4/trainer_state.safetensors")
        assert not is_mirrored("cache/reference.safetensors")
        assert not is_mirrored(".final.tmp-4711/adapter_model.safetensors")
        assert not is_mirrored(MANIFEST)

    def test_records_are_what_every_trial_needs_for_the_report(self):
        assert is_record("logs/events.out.tfevents.1") and is_record("final/final_metrics.json")
        assert is_record("checkpoint-4/validation.json") and is_record("best_accuracy/validation.json")
        assert is_record("reliability_epoch_1.json") and is_record("diverged.json")
        assert not is_record("final/adapter_model.safetensors") and not is_record("final/tokenizer.json")

    def test_remote_storage_is_told_from_a_path_on_this_disk(self, tmp_path):
        assert remote_storage(str(tmp_path)) is None
        assert remote_storage(f"file://{tmp_path}") is None  # file:// is this node's disk too
        filesystem, path = remote_storage("mock://bucket/experiments/")
        assert filesystem.type_name == "mock" and not path.endswith("/")


class TestPush:
    def test_push_stores_the_tree_without_checkpoint_weights_caches_or_writes_in_progress(self, tmp_path):
        out, (fs, root) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        RunMirror(out, fs, f"train/run/{MIRROR_DIR}").push()
        mirror = root / "train" / "run" / MIRROR_DIR
        assert stored(mirror) == {
            MANIFEST, "checkpoint-2/validation.json", "checkpoint-4/validation.json", "best_accuracy/validation.json",
            "best_accuracy/adapter_model.safetensors", "best_calibration/validation.json",
            "best_calibration/adapter_model.safetensors", "logs/events.out.tfevents.1", "reliability_epoch_1.json"}
        manifest = json.loads((mirror / MANIFEST).read_text())["files"]
        assert set(manifest) == stored(mirror) - {MANIFEST}
        for rel, entry in manifest.items():
            assert (mirror / rel).read_bytes() == (out / rel).read_bytes() and entry["size"] == (out / rel).stat().st_size

    def test_a_push_sends_each_content_once_and_only_what_changed(self, tmp_path):
        out, (fs, root) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        mirror = RunMirror(out, fs, "run")
        first = mirror.push()
        # Each distinct content once: best_accuracy's adapter (W2) and best_calibration's (W4), the small files.
        small = sum((out / r).stat().st_size for r in ("checkpoint-2/validation.json", "checkpoint-4/validation.json",
                                                      "logs/events.out.tfevents.1", "reliability_epoch_1.json"))
        assert first == 1000 + 1000 + small  # best_*/validation.json are checkpoint-N's bytes: copied in storage
        assert mirror.push() == 0  # nothing changed
        write(out / "logs" / "events.out.tfevents.1", b"scalars, more scalars")
        link_tree(out / "checkpoint-4", out / "final", skip=("trainer_state.safetensors",))  # bytes stored already
        assert mirror.push() == len(b"scalars, more scalars")
        assert (root / "run" / "final" / "adapter_model.safetensors").read_bytes() == b"W4" * 500

    def test_files_that_trade_places_are_stored_as_they_now_are(self, tmp_path):
        """best_accuracy/ takes best_calibration/'s bytes and the other way round: a copy inside storage must read
        the bytes before they are overwritten, not after."""
        out, (fs, root) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        mirror = RunMirror(out, fs, "run")
        mirror.push()
        link_tree(out / "checkpoint-4", out / "best_accuracy", skip=("trainer_state.safetensors",))
        link_tree(out / "checkpoint-2", out / "best_calibration", skip=("trainer_state.safetensors",))
        mirror.push()
        for name in ("best_accuracy", "best_calibration"):
            for f in ("adapter_model.safetensors", "validation.json"):
                assert (root / "run" / name / f).read_bytes() == (out / name / f).read_bytes(), (name, f)

    def test_files_gone_from_the_tree_go_from_storage_after_the_manifest(self, tmp_path):
        out, (fs, root) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        mirror = RunMirror(out, fs, "run")
        mirror.push()
        (out / "reliability_epoch_1.json").unlink()
        mirror.push()
        assert not (root / "run" / "reliability_epoch_1.json").exists()
        assert "reliability_epoch_1.json" not in json.loads((root / "run" / MANIFEST).read_text())["files"]

    def test_a_new_mirror_object_takes_up_from_what_storage_holds(self, tmp_path):
        """A worker restarted on another node pushes through a new RunMirror: what storage has is not sent again."""
        out, (fs, _) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        RunMirror(out, fs, "run").push()
        assert RunMirror(out, fs, "run").push() == 0


class TestFetch:
    def test_fetch_rebuilds_the_tree_with_shared_bytes_as_links(self, tmp_path):
        out, (fs, _) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        link_tree(out / "checkpoint-4", out / "final", skip=("trainer_state.safetensors",))
        RunMirror(out, fs, "run").push()
        other = tmp_path / "other_node"
        written = RunMirror(other, fs, "run").fetch()
        assert set(written) == stored(other) and "final/adapter_model.safetensors" in written
        for rel in written:
            assert (other / rel).read_bytes() == (out / rel).read_bytes(), rel
        assert os.path.samefile(other / "final" / "adapter_model.safetensors",
                                other / "best_calibration" / "adapter_model.safetensors")  # one copy on disk
        assert not any(p.name.startswith(".") for p in other.rglob("*"))  # no temporary file left

    def test_fetch_selects_and_keeps_or_replaces_what_is_there(self, tmp_path):
        out, (fs, _) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        RunMirror(out, fs, "run").push()
        other = tmp_path / "other_node"
        written = RunMirror(other, fs, "run").fetch(is_record)
        assert "best_accuracy/validation.json" in written
        assert not (other / "best_accuracy" / "adapter_model.safetensors").exists()
        write(other / "logs" / "events.out.tfevents.1", b"this node's own")
        assert RunMirror(other, fs, "run").fetch() == ["best_accuracy/adapter_model.safetensors",
                                                       "best_calibration/adapter_model.safetensors"]
        assert (other / "logs" / "events.out.tfevents.1").read_bytes() == b"this node's own"  # kept
        assert RunMirror(other, fs, "run").fetch(replace=True) == ["logs/events.out.tfevents.1"]
        assert (other / "logs" / "events.out.tfevents.1").read_bytes() == b"scalars"
        assert RunMirror(other, fs, "run").fetch(replace=True) == []  # equal bytes are not fetched again

    def test_a_directory_whose_files_do_not_match_the_manifest_is_not_fetched(self, tmp_path, caplog):
        """A worker that died while uploading a new best_accuracy/: its adapter in storage is newer than the
        manifest. Half of two steps would lie; the directory is left out, the rest fetched."""
        out, (fs, root) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        RunMirror(out, fs, "run").push()
        (root / "run" / "best_accuracy" / "adapter_model.safetensors").write_bytes(b"W6" * 500)
        other = tmp_path / "other_node"
        with caplog.at_level(logging.WARNING, logger="ray_jobs.mirror"):
            written = RunMirror(other, fs, "run").fetch()
        assert not (other / "best_accuracy").exists() or not any((other / "best_accuracy").iterdir())
        assert "best_calibration/adapter_model.safetensors" in written and "logs/events.out.tfevents.1" in written
        assert "run/best_accuracy: not fetched" in caplog.text

    def test_nothing_mirrored_fetches_nothing(self, tmp_path):
        fs, _ = bucket(tmp_path)
        assert RunMirror(tmp_path / "run", fs, "nothing/here").fetch() == []


def test_read_run_file_takes_this_nodes_file_else_the_mirrors(tmp_path):
    out, (fs, root) = tmp_path / "run", bucket(tmp_path)
    write(root / "train" / "t1" / MIRROR_DIR / "final" / "final_metrics.json", b'{"history": []}')
    assert read_run_file(out, "final/final_metrics.json", None) is None
    assert read_run_file(out, "final/final_metrics.json", (fs, "train/t1")) == '{"history": []}'
    write(out / "final" / "final_metrics.json", b'{"history": [1]}')
    assert read_run_file(out, "final/final_metrics.json", (fs, "train/t1")) == '{"history": [1]}'
    assert read_run_file(out, "diverged.json", (fs, "train/t1")) is None


def test_a_search_fetches_every_trials_records_and_the_best_trials_adapters(tmp_path, capsys):
    """Two trials trained elsewhere: both trees' records come to the driver, adapters only for the best, and where
    the best one's tree has no adapter of its reported step (ASHA stopped it), Ray's checkpoint of that step."""
    from conftok.modeling import METADATA_FILE
    from ray_jobs.results import best_adapter
    from ray_jobs.mirror import fetch_trial_trees
    from ray_jobs.tune import trials_storage

    fs, root = bucket(tmp_path)
    setup = trials_storage("s3://unused", "exp", (fs, "store"))
    assert setup == {"train_storage": "store/exp/train", "train_filesystem": fs}
    for trial in ("t1", "t2"):
        out = tmp_path / "gpu_node" / trial
        make_tree(out)
        RunMirror(out, fs, f"store/exp/train/{trial}/{MIRROR_DIR}").push()
    ray_checkpoint = root / "store" / "exp" / "train" / "t2" / "checkpoint-4"
    write(ray_checkpoint / "adapter_model.safetensors", b"W4" * 500)
    write(ray_checkpoint / METADATA_FILE, json.dumps({"global_step": 4}).encode())
    write(ray_checkpoint / "trainer_state.safetensors", b"optimizer")
    rows = [{"trial": "t1", "step": 4.0, "checkpoint": "store/exp/train/t1/checkpoint-4"},
            {"trial": "t2", "step": 4.0, "checkpoint": "store/exp/train/t2/checkpoint-4"}]
    trials = tmp_path / "driver" / "trials"
    assert fetch_trial_trees(rows, rows[1], trials, fs, setup["train_storage"]) > 0
    assert "Trial trees:" in capsys.readouterr().out
    for trial in ("t1", "t2"):
        assert (trials / trial / "logs" / "events.out.tfevents.1").is_file()
        assert (trials / trial / "checkpoint-2" / "validation.json").is_file()
    assert not (trials / "t1" / "best_accuracy" / "adapter_model.safetensors").exists()
    assert (trials / "t2" / "best_accuracy" / "adapter_model.safetensors").is_file()
    assert best_adapter(trials / "t2", rows[1]) == trials / "t2" / "checkpoint-4"  # Ray's copy, fetched
    assert (trials / "t2" / "checkpoint-4" / "validation.json").is_file()  # beside the mirrored record
    assert not (trials / "t2" / "checkpoint-4" / "trainer_state.safetensors").exists()  # nothing left to resume
