"""Every search space loads; the loader reports every problem of a bad file at once;
cluster.yaml passes Ray's own validator and fits the spaces; the KubeRay manifest is well formed."""

from pathlib import Path

import pytest
import yaml

from ray_jobs.space import SpaceError, load_space

ROOT = Path(__file__).resolve().parent.parent
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))


class TestSearchSpaces:
    def test_the_required_spaces_exist(self):
        assert {"demo.yaml", "qwen7b.yaml", "mistral7b.yaml"} <= {p.name for p in SPACES}

    @pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
    def test_every_space_loads_and_builds_tune_objects(self, path):
        space = load_space(path)
        assert {"lora_r", "lora_alpha", "learning_rate"} <= set(space.search)
        params = space.param_space()
        multiple = "multiple_of_rank" in space.search["lora_alpha"]
        expected = set(space.search) - {"lora_alpha"} | {"lora_alpha_per_rank" if multiple else "lora_alpha"}
        assert set(params) == expected  # a multiple is never sampled under the name lora_alpha
        sample = {k: v.sample() for k, v in params.items()}
        from conftok import TrainConfig

        TrainConfig(**space.sample_to_config(sample))  # every sample is a valid training config

    def test_alpha_as_multiple_of_rank(self):
        space = load_space(ROOT / "search_spaces" / "qwen7b.yaml")
        values = space.sample_to_config({"lora_r": 32, "lora_alpha_per_rank": 2, "learning_rate": 1e-4})
        assert values["lora_alpha"] == 64 and values["lora_r"] == 32 and values["score_lambda"] == 1.0
        assert "lora_alpha_per_rank" not in values

    def test_production_spaces_use_hub_validation_and_one_gpu(self):
        for name in ("qwen7b", "mistral7b"):
            space = load_space(ROOT / "search_spaces" / f"{name}.yaml")
            assert space.gpus_per_trial == 1.0
            assert space.train["val_sources"] == {"boolq": "huyxdang/boolq-split", "medqa": "huyxdang/medqa-split"}
        assert load_space(ROOT / "search_spaces" / "mistral7b.yaml").objective == "pareto"

    def test_relative_paths_are_taken_from_where_the_search_was_started(self, tmp_path, monkeypatch):
        from ray_jobs.tune import prepare_fixed

        text = (ROOT / "search_spaces" / "qwen7b.yaml").read_text()
        space = yaml.safe_load(text)
        space["train"].update(train_data="t.jsonl", reference_cache="shared/cache", model_name="models/base",
                              val_sources={"boolq": "val/boolq.jsonl", "medqa": "huyxdang/medqa-split"})
        (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
        (tmp_path / "t.jsonl").write_text("")
        (tmp_path / "models" / "base").mkdir(parents=True)
        (tmp_path / "val").mkdir()
        (tmp_path / "val" / "boolq.jsonl").write_text("")
        monkeypatch.chdir(tmp_path)
        fixed = prepare_fixed(load_space(tmp_path / "space.yaml"), tmp_path / "exp")
        assert fixed == {"train_data": str(tmp_path / "t.jsonl"), "reference_cache": str(tmp_path / "shared" / "cache"),
                         "model_name": str(tmp_path / "models" / "base"),
                         "val_sources": {"boolq": str(tmp_path / "val" / "boolq.jsonl"), "medqa": "huyxdang/medqa-split"}}

    def test_every_problem_reported_at_once(self, tmp_path):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({
            "name": "bad", "colour": "red",
            "train": {"model_name": "x", "lora_rank": 8, "batch_size": 0},
            "search": {"lora_r": {"choice": []}, "learning_rate": {"loguniform": [1e-3, 1e-5]},
                       "lora_alpha": {"gaussian": [1, 2]}, "batch_size": {"choice": [8.5]}, "momentum": {"choice": [1]}},
            "num_trials": "many",
            "objective": {"type": "pareto"},
        }))
        with pytest.raises(SpaceError) as e:
            load_space(bad)
        msg = str(e.value)
        for expected in ("colour: unknown key", "train.lora_rank: unknown key", "search.lora_r.choice: must be a non-empty list",
                         "search.learning_rate.loguniform: empty range", "unknown distribution 'gaussian'",
                         "batch_size takes integers", "search.momentum: unknown parameter", "num_trials: must be an integer",
                         "ASHA needs one scalar objective", "train.batch_size: batch_size must be a positive integer"):
            assert expected in msg, expected
        assert str(bad) in msg

    def test_bad_train_values_are_reported(self, tmp_path):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"train": {"batch_size": 0, "calib_p_norm": "3"},
                                       "search": {"lora_r": {"choice": [8]}}}))
        with pytest.raises(SpaceError, match="batch_size must be a positive integer") as e:
            load_space(bad)
        assert "calib_p_norm" in str(e.value)

    @pytest.mark.parametrize("scheduler, expected", [
        ({"reduction_factor": 1}, "scheduler.reduction_factor: must be an integer >= 2"),
        ({"grace_period": 4, "max_t": 2}, "scheduler.grace_period: must be <= max_t (2), got 4"),
        ({"grace_period": 200}, "scheduler.grace_period: must be <= max_t (100, the default), got 200"),
    ])
    def test_asha_settings_ray_refuses_are_named_at_load(self, tmp_path, scheduler, expected):
        """Ray's ASHAScheduler asserts reduction_factor > 1 and grace_period <= max_t: caught when the space loads,
        with its file and key, not as a bare AssertionError once Ray has started."""
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"search": {"lora_r": {"choice": [8]}}, "scheduler": {"type": "asha", **scheduler}}))
        with pytest.raises(SpaceError) as e:
            load_space(bad)
        assert expected in str(e.value) and str(bad) in str(e.value)

    def test_asha_max_t_below_a_trials_validations_is_warned(self, tmp_path, capsys):
        """qwen7b's max_t was 12 while a trial validates 17 times on ~19K rows: ASHA stopped every trial at 70% of
        its schedule. ray_jobs.tune counts the validations on the rows it finds and warns."""
        from conftest import feature_rows, write_jsonl

        from conftok import TrainConfig
        from conftok.train import planned_validations
        from ray_jobs.tune import warn_if_asha_cuts_trials

        rows = write_jsonl(tmp_path / "t.jsonl", feature_rows(40))
        train = {"train_data": rows, "batch_size": 4, "num_epochs": 3, "eval_steps": 4}  # 10 steps an epoch
        assert planned_validations(40, TrainConfig(**train)) == 3 + 6  # epoch ends 10, 20, 30; 4, 8, 12, 16, 24, 28
        assert planned_validations(19_000, TrainConfig(num_epochs=3, batch_size=8, eval_steps=500)) == 17  # qwen7b's
        for max_t, warned in ((8, True), (9, False)):
            space = tmp_path / f"s{max_t}.yaml"
            space.write_text(yaml.safe_dump({"train": train, "search": {"lora_r": {"choice": [8]}},
                                             "scheduler": {"type": "asha", "max_t": max_t}}))
            assert warn_if_asha_cuts_trials(load_space(space), 40) == 9
            assert ("scheduler.max_t is 8, but each trial validates 9 times" in capsys.readouterr().err) is warned

    @pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
    def test_asha_lets_a_trial_report_its_last_validation(self, path):
        """The spaces set max_t to a trial's planned validations. Ray's ASHA stopped every trial at its report of
        validation max_t (stop_last_trials=True), and Tune ended its actor while the worker still wrote final/ and
        final_metrics.json and pushed its tree. A trial best at every rung goes on at every report, its last too."""
        from types import SimpleNamespace

        from ray.tune.schedulers import TrialScheduler

        from conftok import metrics as M
        from ray_jobs.tune import build_scheduler

        space = load_space(path)
        scheduler = build_scheduler(space)
        if scheduler is None:
            assert space.objective == "pareto"
            return
        scheduler.set_search_properties(M.VAL_SCORE, "max")
        trial = SimpleNamespace(trial_id="t0")
        scheduler.on_trial_add(None, trial)
        max_t = space.scheduler["max_t"]
        decisions = [scheduler.on_trial_result(None, trial, {M.VALIDATION: v, M.VAL_SCORE: 1.0})
                     for v in range(1, max_t + 1)]
        assert decisions == [TrialScheduler.CONTINUE] * max_t

    @pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
    def test_every_space_fits_a_one_h200_host_with_16_cpus(self, path):
        """A trial takes its worker's CPUs plus the Tune actor's sliver: 16 + 0.01 CPUs did not fit a 16-CPU host
        with one H200 (the 7B spaces' header says "on one H200 per trial")."""
        from ray_jobs.common import check_resources, default_cpus_per_worker
        from ray_jobs.tune import TRIAL_ACTOR_CPUS

        space = load_space(path)
        node = {"CPU": 16.0, "GPU": 1.0}
        gpus = 1.0 if space.gpus_per_trial == "auto" else space.gpus_per_trial
        cpus = space.cpus_per_trial or default_cpus_per_worker(node, gpus)  # as ray_jobs.tune picks them
        check_resources(gpus, cpus + TRIAL_ACTOR_CPUS, node)

    def test_a_cpu_worker_asks_for_its_largest_nodes_cpus_not_the_clusters(self):
        """On a cluster of several nodes a CPU-only worker asked for the CPUs of all of them (199.95 of 8 + 192)
        and waited forever: no node has that many."""
        from ray_jobs.common import default_cpus_per_worker, largest_node_cpus

        cluster = {"CPU": 200.0, "GPU": 8.0}
        assert default_cpus_per_worker(cluster, 0.0, node_cpus=192.0) == pytest.approx(191.95)
        assert default_cpus_per_worker(cluster, 1.0, node_cpus=192.0) == 8.0
        assert default_cpus_per_worker({"CPU": 2.0}, 0.0) == pytest.approx(1.95)  # a local Ray, one node
        assert largest_node_cpus() is None  # no Ray running in this process

    def test_a_key_given_twice_is_an_error_at_its_line(self, tmp_path):
        """YAML keeps the last of two equal keys silently: lora_r written twice searched only [16]."""
        bad = tmp_path / "twice.yaml"
        bad.write_text("name: twice\n"
                       "search:\n"
                       "  lora_r: {choice: [8]}\n"
                       "  learning_rate: {loguniform: [1.0e-4, 1.0e-3]}\n"
                       "  lora_r: {choice: [16]}\n"
                       "train: {num_epochs: 1, num_epochs: 2, batch_size: 0}\n")
        with pytest.raises(SpaceError) as e:
            load_space(bad)
        msg = str(e.value)
        assert f"{bad}:5: search.lora_r: key given twice in one mapping (first at line 3)" in msg
        assert f"{bad}:6: train.num_epochs: key given twice" in msg
        assert "batch_size must be a positive integer" in msg  # with the file's other problems, at once

    def test_missing_and_invalid_files(self, tmp_path):
        with pytest.raises(SpaceError, match="file not found"):
            load_space(tmp_path / "nope.yaml")
        (tmp_path / "x.yaml").write_text("search: [unclosed")
        with pytest.raises(SpaceError, match="invalid YAML"):
            load_space(tmp_path / "x.yaml")


class TestClusterConfig:
    @pytest.fixture(scope="class")
    def cluster(self):
        return yaml.safe_load((ROOT / "cluster.yaml").read_text())

    def test_ray_validator_accepts_it(self, cluster):
        from ray.autoscaler._private.util import prepare_config, validate_config

        validate_config(prepare_config(cluster))

    def test_ray_validator_rejects_a_typo(self, cluster):
        import jsonschema
        from ray.autoscaler._private.util import prepare_config, validate_config

        with pytest.raises(jsonschema.ValidationError):
            validate_config(prepare_config({**cluster, "max_wrokers": 2}))

    def test_gpu_worker_is_h200_node_with_explicit_resources(self, cluster):
        nodes = cluster["available_node_types"]
        gpu = [n for n in nodes.values() if n["resources"].get("GPU")]
        assert len(gpu) == 1
        assert gpu[0]["node_config"]["InstanceType"] == "p5en.48xlarge"
        assert gpu[0]["resources"] == {"CPU": 192, "GPU": 8} and gpu[0]["min_workers"] == 0
        assert nodes[cluster["head_node_type"]]["resources"]["GPU"] == 0
        assert cluster["docker"]["image"].startswith("rayproject/ray:2.60") and cluster["docker"]["image"].endswith("-py311-gpu")
        start = " ".join(cluster["head_start_ray_commands"])
        assert "RAY_AUTH_MODE=token" in start and "--dashboard-host=127.0.0.1" in start
        assert any("[ray,gpu]" in c for c in cluster["setup_commands"])
        # torch pinned before the project (else pip takes the newest torch the GPU extra allows: 2.14.x)
        assert any(c.index("torch==2.13.0") < c.index("[ray,gpu]") for c in cluster["setup_commands"] if "[ray,gpu]" in c)
        # an explicit image on every node type: Ray's default AWS AMI (CUDA 11.2) predates the H200's driver
        assert all(n["node_config"].get("ImageId") for n in nodes.values())

    def test_every_comment_is_there(self):
        lines = [ln for ln in (ROOT / "cluster.yaml").read_text().splitlines()
                 if ln.strip() and not ln.strip().startswith("#") and not ln.strip().startswith("-")
                 and ":" in ln and not ln.rstrip().endswith(":") and not ln.startswith("    ")]
        missing = [ln for ln in lines if "#" not in ln]
        assert not missing, missing

    @pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
    def test_spaces_fit_the_gpu_worker(self, cluster, path):
        space = load_space(path)
        gpu = next(n for n in cluster["available_node_types"].values() if n["resources"].get("GPU"))
        gpus = 1.0 if space.gpus_per_trial == "auto" else space.gpus_per_trial
        assert gpus <= gpu["resources"]["GPU"]
        assert (space.cpus_per_trial or 1) + 0.01 <= gpu["resources"]["CPU"] / max(1, gpu["resources"]["GPU"] // max(gpus, 1))


class TestKubeRay:
    def test_rayjob_has_the_fields_kuberay_requires(self):
        job = yaml.safe_load((ROOT / "kuberay" / "rayjob.yaml").read_text())
        assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
        spec = job["spec"]
        assert spec["entrypoint"].startswith("python -m ray_jobs.tune")
        cluster = spec["rayClusterSpec"]
        assert cluster["rayVersion"].startswith("2.60") and cluster["authOptions"]["mode"] == "token"
        head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["image"].startswith("rayproject/ray:2.60")
        for group in cluster["workerGroupSpecs"]:
            assert group["groupName"] and "template" in group and "rayStartParams" in group
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1
            space = load_space(ROOT / "search_spaces" / "qwen7b.yaml")  # every GPU of a pod runs a trial at once
            assert int(limits["nvidia.com/gpu"]) * space.cpus_per_trial <= float(limits["cpu"]), limits
        pip = yaml.safe_load(spec["runtimeEnvYAML"])["pip"]
        assert pip[0] == "torch==2.13.0" and {"matplotlib>=3.8", "plotly>=5.0", "unsloth_zoo==2026.10.9"} <= set(pip)
