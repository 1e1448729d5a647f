"""A run's tree mirrored into remote storage (ray_jobs.mirror): what goes, what a push sends, what a fetch brings
back and what it refuses. The storage here is a pyarrow SubTreeFileSystem over a temporary folder: Ray and the
mirror take it for a remote one (it is not the "local" filesystem), as they take S3."""

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest

pyarrow_fs = pytest.importorskip("pyarrow.fs")

from conftok.checkpoint import link_tree  # noqa: E402
from ray_jobs.mirror import (MANIFEST, MIRROR_DIR, OBJECTS, RunMirror, is_mirrored, is_record,  # noqa: E402
                             read_run_file, remote_storage, storage_uri)


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

    def test_a_checkpoint_on_remote_storage_is_named_by_its_uri(self):
        """Ray gives a checkpoint on s3:// as a path on its filesystem, without the scheme; results.json and the
        printed Pareto front name it as a URI that `aws s3` and pyarrow take. Paths on this disk stay as they are."""
        path = "bucket/exp/demo/train/t1/checkpoint-4"
        assert storage_uri("s3://bucket/exp", path) == "s3://bucket/exp/demo/train/t1/checkpoint-4"
        assert storage_uri("gs://bucket/exp?endpoint_override=x", path) == f"gs://{path}"
        assert storage_uri("s3://bucket/exp", f"s3://{path}") == f"s3://{path}"  # already a URI
        assert storage_uri("/mnt/exp", "/mnt/exp/demo/train/t1/checkpoint-4") == "/mnt/exp/demo/train/t1/checkpoint-4"
        assert storage_uri("file:///mnt/exp", "/mnt/exp/x") == "/mnt/exp/x"


def objects(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / OBJECTS).iterdir()} if (root / OBJECTS).is_dir() else {}


def manifest_of(root: Path) -> dict[str, dict]:
    return json.loads((root / MANIFEST).read_text())["files"]


MIRRORED = {"checkpoint-2/validation.json", "checkpoint-4/validation.json", "best_accuracy/validation.json",
            "best_accuracy/adapter_model.safetensors", "best_calibration/validation.json",
            "best_calibration/adapter_model.safetensors", "logs/events.out.tfevents.1", "reliability_epoch_1.json"}


class TestPush:
    def test_push_stores_the_tree_without_checkpoint_weights_caches_or_writes_in_progress(self, tmp_path):
        out, (fs, root) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        RunMirror(out, fs, f"train/run/{MIRROR_DIR}").push()
        mirror = root / "train" / "run" / MIRROR_DIR
        manifest, stored_objects = manifest_of(mirror), objects(mirror)
        assert set(manifest) == MIRRORED
        for rel, entry in manifest.items():
            data = (out / rel).read_bytes()
            assert stored_objects[entry["sha256"]] == data and entry["size"] == len(data)
        # One object per content: best_*/ share their checkpoint's validation.json bytes.
        assert set(stored_objects) == {entry["sha256"] for entry in manifest.values()} and len(stored_objects) == 6

    def test_a_push_sends_each_content_once_and_only_what_changed(self, tmp_path):
        out, (fs, root) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        mirror = RunMirror(out, fs, "run")
        small = sum((out / r).stat().st_size for r in ("checkpoint-2/validation.json", "checkpoint-4/validation.json",
                                                      "logs/events.out.tfevents.1", "reliability_epoch_1.json"))
        assert mirror.push() == 1000 + 1000 + small  # the two adapters (W2, W4) and the small files, once each
        assert mirror.push() == 0  # nothing changed
        write(out / "logs" / "events.out.tfevents.1", b"scalars, more scalars")
        link_tree(out / "checkpoint-4", out / "final", skip=("trainer_state.safetensors",))  # bytes stored already
        assert mirror.push() == len(b"scalars, more scalars")
        manifest = manifest_of(root / "run")
        assert manifest["final/adapter_model.safetensors"] == manifest["best_calibration/adapter_model.safetensors"]
        assert len(objects(root / "run")) == 6  # the events file's old bytes went once nothing named them

    def test_a_new_mirror_object_takes_up_from_what_storage_holds(self, tmp_path):
        """A worker restarted on another node pushes through a new RunMirror: what storage has is not sent again."""
        out, (fs, _) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        RunMirror(out, fs, "run").push()
        assert RunMirror(out, fs, "run").push() == 0

    def test_a_push_killed_partway_leaves_the_last_tree_whole(self, tmp_path):
        """Killed after uploading a new best_accuracy/ adapter, before mirror.json: a fetch gets the previous tree,
        and the next push (a restarted worker's) deletes nothing that tree names."""
        out, (fs, root) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        RunMirror(out, fs, "run").push()
        before = manifest_of(root / "run")
        write(root / "run" / OBJECTS / ("0" * 64), b"W6" * 500)  # the uploaded object of the push that died
        other = tmp_path / "other_node"
        assert set(RunMirror(other, fs, "run").fetch()) == MIRRORED
        assert manifest_of(root / "run") == before
        RunMirror(other, fs, "run").push()  # the restarted worker, with the fetched tree
        assert set(objects(root / "run")) == {entry["sha256"] for entry in before.values()}

    def test_an_object_of_the_wrong_size_is_uploaded_again(self, tmp_path):
        """An upload cut short on a filesystem whose writes are not atomic (S3's are) leaves a short object."""
        out, (fs, root) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        RunMirror(out, fs, "run").push()
        sha = manifest_of(root / "run")["best_accuracy/adapter_model.safetensors"]["sha256"]
        (root / "run" / OBJECTS / sha).write_bytes(b"W2")
        assert RunMirror(out, fs, "run").push() == 1000
        assert (root / "run" / OBJECTS / sha).read_bytes() == b"W2" * 500


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

    def test_files_that_trade_places_come_back_as_they_now_are(self, tmp_path):
        out, (fs, _) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        mirror = RunMirror(out, fs, "run")
        mirror.push()
        other = tmp_path / "other_node"
        RunMirror(other, fs, "run").fetch()
        link_tree(out / "checkpoint-4", out / "best_accuracy", skip=("trainer_state.safetensors",))
        link_tree(out / "checkpoint-2", out / "best_calibration", skip=("trainer_state.safetensors",))
        mirror.push()
        RunMirror(other, fs, "run").fetch()
        for name in ("best_accuracy", "best_calibration"):
            for f in ("adapter_model.safetensors", "validation.json"):
                assert (other / name / f).read_bytes() == (out / name / f).read_bytes(), (name, f)

    def test_fetch_selects_replaces_what_differs_and_prunes(self, tmp_path):
        out, (fs, _) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        RunMirror(out, fs, "run").push()
        other = tmp_path / "other_node"
        written = RunMirror(other, fs, "run").fetch(is_record)
        assert "best_accuracy/validation.json" in written
        assert not (other / "best_accuracy" / "adapter_model.safetensors").exists()
        write(other / "logs" / "events.out.tfevents.1", b"an older node's")
        write(other / "diverged.json", b'{"error": "an earlier run"}')
        write(other / "cache" / "reference.safetensors", b"this node's")
        assert RunMirror(other, fs, "run").fetch(is_record, prune=True) == ["logs/events.out.tfevents.1"]
        assert (other / "logs" / "events.out.tfevents.1").read_bytes() == b"scalars"
        assert not (other / "diverged.json").exists()  # not the mirrored run's
        assert (other / "cache" / "reference.safetensors").exists()  # never mirrored: not pruned
        assert RunMirror(other, fs, "run").fetch(is_record) == []  # equal bytes are not fetched again

    def test_a_node_with_an_older_tree_takes_storages(self, tmp_path):
        """A trial back on a node it ran on before: that node's best_accuracy/ is older than storage's, and a
        file with its old bytes must not become the source of storage's others (a hard link to wrong bytes)."""
        out, (fs, _) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        link_tree(out / "checkpoint-4", out / "best_accuracy", skip=("trainer_state.safetensors",))
        RunMirror(out, fs, "run").push()  # best_accuracy/ and best_calibration/ both hold step 4
        node = tmp_path / "node_a"
        make_tree(node)  # its best_accuracy/ holds step 2; best_calibration/ goes missing
        shutil.rmtree(node / "best_calibration")
        RunMirror(node, fs, "run").fetch()
        for name in ("best_accuracy", "best_calibration"):
            for f in ("adapter_model.safetensors", "validation.json"):
                assert (node / name / f).read_bytes() == (out / name / f).read_bytes(), (name, f)

    def test_damaged_or_missing_bytes_are_not_fetched_and_the_rest_is(self, tmp_path, caplog):
        out, (fs, root) = tmp_path / "run", bucket(tmp_path)
        make_tree(out)
        RunMirror(out, fs, "run").push()
        manifest = manifest_of(root / "run")
        (root / "run" / OBJECTS / manifest["best_accuracy/adapter_model.safetensors"]["sha256"]).write_bytes(b"bad")
        (root / "run" / OBJECTS / manifest["reliability_epoch_1.json"]["sha256"]).unlink()
        other = tmp_path / "other_node"
        with caplog.at_level(logging.WARNING, logger="ray_jobs.mirror"):
            written = RunMirror(other, fs, "run").fetch()
        assert set(written) == MIRRORED - {"best_accuracy/adapter_model.safetensors", "reliability_epoch_1.json"}
        assert not (other / "best_accuracy" / "adapter_model.safetensors").exists()
        assert "2 file(s) not fetched" in caplog.text
        assert not any(p.name.startswith(".") for p in other.rglob("*"))  # no temporary file left

    def test_nothing_mirrored_fetches_nothing(self, tmp_path):
        fs, _ = bucket(tmp_path)
        assert RunMirror(tmp_path / "run", fs, "nothing/here").fetch() == []


def test_read_run_file_reads_the_mirror_where_there_is_one(tmp_path):
    out, (fs, _) = tmp_path / "run", bucket(tmp_path)
    write(tmp_path / "worker" / "final" / "final_metrics.json", b'{"history": []}')
    RunMirror(tmp_path / "worker", fs, f"train/t1/{MIRROR_DIR}").push()
    assert read_run_file(out, "final/final_metrics.json", None) is None
    assert read_run_file(out, "final/final_metrics.json", (fs, "train/t1")) == '{"history": []}'
    write(out / "final" / "final_metrics.json", b'{"history": [1]}')  # this node's copy, stale
    assert read_run_file(out, "final/final_metrics.json", None) == '{"history": [1]}'
    assert read_run_file(out, "final/final_metrics.json", (fs, "train/t1")) == '{"history": []}'
    assert read_run_file(out, "diverged.json", (fs, "train/t1")) is None
    assert read_run_file(out, "final/final_metrics.json", (fs, "train/nothing")) is None


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


def test_the_fetch_command_says_what_is_wrong(tmp_path, capsys):
    from ray_jobs.mirror import main

    assert main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "is not remote storage" in capsys.readouterr().err
    assert main(["mock://bucket/conftok/demo/train/t1", str(tmp_path / "out")]) == 1
    assert "nothing mirrored in mock://bucket/conftok/demo/train/t1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_search_keeps_its_study_results_and_report_not_its_trials_or_demo(tmp_path):
    from ray_jobs.mirror import is_search_record
    from ray_jobs.recovery import PushSearchRecords
    from ray_jobs.tune import search_records

    assert is_search_record("study.db") and is_search_record("results.json") and is_search_record("report/pareto.png")
    assert not is_search_record("trials/t1/logs/events.out.tfevents.1") and not is_search_record("demo/tagged.jsonl")
    assert not is_search_record(".study.db.tmp-4711")
    fs, root = bucket(tmp_path)
    local = tmp_path / "experiments" / "demo"
    for rel in ("study.db", "results.json", "report/report.html", "trials/t1/final/final_metrics.json", "demo/x"):
        write(local / rel, rel.encode())
    callback = PushSearchRecords(search_records(local, (fs, "store")))
    pushes = []
    push = callback.mirror.push
    callback.mirror.push = lambda: pushes.append(1) or push()
    callback.on_step_end(1, [])  # as Tune calls it at the end of each step of its loop
    assert set(manifest_of(root / "store" / "demo" / "search")) == {"study.db", "results.json", "report/report.html"}
    callback.on_step_end(2, [])
    callback.on_trial_complete(2, [], None)
    assert len(pushes) == 1  # the study did not change: a stat, no push
    write(local / "study.db", b"study.db, a trial asked for")  # Optuna wrote a row
    callback.on_step_end(3, [])
    assert len(pushes) == 2 and manifest_of(root / "store" / "demo" / "search")["study.db"]["size"] == 27
    # A new head with --resume, its local_dir empty, takes them back.
    elsewhere = tmp_path / "new_head" / "demo"
    assert sorted(search_records(elsewhere, (fs, "store")).fetch()) == ["report/report.html", "results.json",
                                                                         "study.db"]
    assert (elsewhere / "study.db").read_bytes() == b"study.db, a trial asked for"


def test_a_push_from_a_missing_tree_leaves_storage_alone(tmp_path):
    """A mirror whose local folder is not there (a path from another head) must not commit an empty tree."""
    out, (fs, root) = tmp_path / "run", bucket(tmp_path)
    make_tree(out)
    RunMirror(out, fs, "run").push()
    before = manifest_of(root / "run")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        RunMirror(tmp_path / "gone", fs, "run").push()
    assert manifest_of(root / "run") == before and len(objects(root / "run")) == 6


def test_a_driver_on_the_node_that_trained_keeps_what_is_newer_than_the_mirror(tmp_path):
    """The worker's last push failed: the driver's disk (the same node) has final/ and a longer events file that
    storage lacks. They stay. On another node, a file of an earlier run, older than the mirror, goes."""
    out, (fs, _) = tmp_path / "run", bucket(tmp_path)
    driver = tmp_path / "driver"
    write(driver / "diverged.json", b'{"error": "an earlier run into this output_dir"}')
    time.sleep(0.05)
    make_tree(out)
    RunMirror(out, fs, "run").push()
    time.sleep(0.05)
    write(out / "logs" / "events.out.tfevents.1", b"scalars, and the last ones")
    link_tree(out / "checkpoint-4", out / "final", skip=("trainer_state.safetensors",))
    RunMirror(out, fs, "run").fetch(prune=True, keep_newer=True)
    assert (out / "logs" / "events.out.tfevents.1").read_bytes() == b"scalars, and the last ones"
    assert (out / "final" / "adapter_model.safetensors").is_file()
    RunMirror(driver, fs, "run").fetch(prune=True, keep_newer=True)
    assert not (driver / "diverged.json").exists() and (driver / "logs" / "events.out.tfevents.1").is_file()
    RunMirror(out, fs, "run").fetch(prune=True)  # a restarted worker: storage's tree is the one
    assert (out / "logs" / "events.out.tfevents.1").read_bytes() == b"scalars"
    assert not (out / "final" / "adapter_model.safetensors").exists()


def test_the_resumed_search_must_keep_its_study_where_it_was(tmp_path):
    from ray_jobs.tune import SEARCH_FILE, check_resume_local_dir

    here = tmp_path / "experiments" / "demo"
    assert check_resume_local_dir(here) is None  # a search from before the record: nothing to compare
    write(here / SEARCH_FILE, json.dumps({"local_dir": str(here)}).encode())
    assert check_resume_local_dir(here) is None
    write(here / SEARCH_FILE, json.dumps({"local_dir": "/tmp/ray/session_1/working_dir/experiments/demo"}).encode())
    assert "resume with --local_dir /tmp/ray/session_1/working_dir/experiments" in check_resume_local_dir(here)


def test_a_result_whose_optuna_trial_is_missing_is_logged_not_fatal(monkeypatch, caplog):
    from ray.tune.search.optuna import OptunaSearch

    from ray_jobs.recovery import ResumableOptunaSearch

    def missing(self, trial_id, result):
        raise KeyError("Record does not exist.")

    monkeypatch.setattr(OptunaSearch, "on_trial_result", missing)
    search = ResumableOptunaSearch.__new__(ResumableOptunaSearch)
    with caplog.at_level(logging.WARNING, logger="ray_jobs.recovery"):
        search.on_trial_result("t1", {"validation": 1})
    assert "its Optuna trial is missing from the study" in caplog.text


def test_a_search_on_storage_it_cannot_reach_stops_before_ray_starts(tmp_path, monkeypatch, capsys):
    import ray_jobs.common
    from ray_jobs.tune import main

    monkeypatch.setattr(ray_jobs.common, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    assert main(["--storage_path", "nosuchscheme://bucket/x", "--local_dir", str(tmp_path)]) == 2
    assert "error: storage nosuchscheme://bucket/x" in capsys.readouterr().err


def test_try_push_and_try_fetch_say_what_went_wrong_and_do_not_raise(tmp_path, capsys, monkeypatch):
    out, (fs, _) = tmp_path / "run", bucket(tmp_path)
    mirror = RunMirror(tmp_path / "not_there", fs, "run")
    monkeypatch.setattr("ray_jobs.mirror.time.sleep", lambda s: None)
    assert mirror.try_push(attempts=3) is False
    assert capsys.readouterr().out.count("not mirrored to run") == 3
    make_tree(out)
    assert RunMirror(out, fs, "run").try_push() is True
    write(tmp_path / "bucket" / "run" / MANIFEST, b"{not json")
    assert RunMirror(tmp_path / "elsewhere", fs, "run").try_fetch() == []
    assert "the tree not fetched from run" in capsys.readouterr().out
