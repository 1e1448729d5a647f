"""Search-space files (``search_spaces/*.yaml``): load, check, and turn into Ray Tune objects.

A file::

    name: qwen7b                      # experiment name (also the default experiment folder)
    train:                            # fixed conftok.TrainConfig fields for every trial
      model_name: Qwen/Qwen2.5-7B-Instruct
      train_data: tagged/qwen/qwen_all_tagged.jsonl
    search:                           # sampled per trial
      lora_r: {choice: [8, 16, 32, 64]}
      lora_alpha: {multiple_of_rank: [1, 2, 4]}   # or {choice: [...]} for absolute values
      learning_rate: {loguniform: [1.0e-5, 1.0e-3]}
    objective: {type: score, lambda: 1.0}         # or {type: pareto}
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or {type: none}
    num_trials: 16
    seed: 0
    resources: {gpus_per_trial: 1, cpus_per_trial: 8, max_failures: 3}
    demo: {n_train: 64, n_val: 24}    # optional: build the embedded demo data and model first

Every problem in a file is reported at once, with its key path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from conftok.config import ConfigError, TrainConfig

SEARCHABLE = {"lora_r": int, "lora_alpha": float, "learning_rate": float, "lora_dropout": float,
              "weight_decay": float, "warmup_ratio": float, "num_epochs": int, "batch_size": int}
ALPHA_PER_RANK = "lora_alpha_per_rank"  # the sampled name of a lora_alpha searched as multiple_of_rank
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "multiple_of_rank")
TOP_KEYS = {"name", "train", "search", "objective", "scheduler", "num_trials", "seed", "resources", "demo",
            "description"}
OBJECTIVE_KEYS = {"type", "lambda"}
SCHEDULER_KEYS = {"type", "grace_period", "reduction_factor", "max_t"}
RESOURCE_KEYS = {"gpus_per_trial", "cpus_per_trial", "max_failures"}
DEMO_KEYS = {"n_train", "n_val", "seed"}
EMBEDDED_MODEL = "embedded:smollm2"


class SpaceError(ValueError):
    """A search-space file has problems; the message lists each with its key path."""


@dataclass
class SearchSpace:
    name: str
    train: dict[str, Any]
    search: dict[str, dict[str, Any]]
    objective: str = "score"
    score_lambda: float = 1.0
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha"})
    num_trials: int = 8
    seed: int = 0
    gpus_per_trial: "float | str" = 1.0  # or "auto": 1 where the cluster has GPUs, else 0
    cpus_per_trial: float | None = None
    max_failures: int = 3
    demo: dict[str, Any] | None = None
    path: Path | None = None

    def sample_to_config(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Fixed training fields plus one trial's sampled values (alpha = multiple x rank when the
        file searches alpha as a multiple of rank: Tune and Optuna then sample ``lora_alpha_per_rank``,
        so their tables never show a multiple under the name lora_alpha)."""
        values = {**self.train, **sample, "score_lambda": self.score_lambda}
        if ALPHA_PER_RANK in values:
            values["lora_alpha"] = values.pop(ALPHA_PER_RANK) * values.get("lora_r", TrainConfig().lora_r)
        return values

    def param_space(self) -> dict[str, Any]:
        from ray import tune

        out = {}
        for key, spec in self.search.items():
            (kind, arg), = spec.items()
            if kind == "multiple_of_rank":
                out[ALPHA_PER_RANK] = tune.choice(list(arg))
            elif kind == "choice":
                out[key] = tune.choice(list(arg))
            elif kind == "uniform":
                out[key] = tune.uniform(*arg)
            elif kind == "loguniform":
                out[key] = tune.loguniform(*arg)
            elif kind == "randint":
                out[key] = tune.randint(arg[0], arg[1] + 1)  # inclusive upper bound in the file
        return out


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_search(search: Any, problems: list[str]) -> None:
    if not isinstance(search, dict) or not search:
        problems.append("search: must be a non-empty mapping of parameter -> {distribution: arguments}")
        return
    for key, spec in search.items():
        where = f"search.{key}"
        if key not in SEARCHABLE:
            problems.append(f"{where}: unknown parameter; searchable: {sorted(SEARCHABLE)}")
            continue
        if not isinstance(spec, dict) or len(spec) != 1:
            problems.append(f"{where}: must be one {{distribution: arguments}} pair, got {spec!r}")
            continue
        (kind, arg), = spec.items()
        if kind not in DISTRIBUTIONS:
            problems.append(f"{where}: unknown distribution {kind!r}; allowed: {list(DISTRIBUTIONS)}")
            continue
        if kind == "multiple_of_rank" and key != "lora_alpha":
            problems.append(f"{where}: multiple_of_rank is only for lora_alpha")
        if kind in ("choice", "multiple_of_rank"):
            if not isinstance(arg, list) or not arg:
                problems.append(f"{where}.{kind}: must be a non-empty list, got {arg!r}")
            elif not all(_is_number(v) and v > 0 for v in arg):
                problems.append(f"{where}.{kind}: every value must be a positive number, got {arg!r}")
            elif SEARCHABLE[key] is int and kind == "choice" and not all(isinstance(v, int) for v in arg):
                problems.append(f"{where}.{kind}: {key} takes integers, got {arg!r}")
            continue
        if not (isinstance(arg, list) and len(arg) == 2 and all(_is_number(v) for v in arg)):
            problems.append(f"{where}.{kind}: must be [low, high] numbers, got {arg!r}")
            continue
        low, high = arg
        if not low < high:
            problems.append(f"{where}.{kind}: empty range [{low}, {high}] (need low < high)")
        if kind == "loguniform" and low <= 0:
            problems.append(f"{where}.{kind}: loguniform needs low > 0, got {low}")
        if kind == "randint" and not all(isinstance(v, int) for v in arg):
            problems.append(f"{where}.{kind}: randint needs integers, got {arg!r}")


def _check_keys(where: str, value: Any, allowed: set[str], problems: list[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where}: must be a mapping, got {type(value).__name__}")
        return {}
    for key in sorted(set(value) - allowed):
        problems.append(f"{where}.{key}: unknown key; allowed: {sorted(allowed)}")
    return value


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a search-space file; raise :class:`SpaceError` listing every problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpaceError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: expected a mapping at the top level")
    p: list[str] = []
    for key in sorted(set(data) - TOP_KEYS):
        p.append(f"{key}: unknown key; allowed: {sorted(TOP_KEYS)}")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        p.append(f"name: must be a non-empty string without '/', got {name!r}")
    train = _check_keys("train", data.get("train"), {f.name for f in dataclasses.fields(TrainConfig)}, p)
    search = data.get("search")
    _check_search(search, p)
    if isinstance(search, dict):
        for key in sorted(set(search) & set(train)):
            p.append(f"search.{key}: also fixed in train.{key}; keep one")
    objective = _check_keys("objective", data.get("objective", {"type": "score"}), OBJECTIVE_KEYS, p)
    obj_type = objective.get("type", "score")
    if obj_type not in ("score", "pareto"):
        p.append(f"objective.type: must be 'score' or 'pareto', got {obj_type!r}")
    lam = objective.get("lambda", 1.0)
    if not _is_number(lam) or lam < 0:
        p.append(f"objective.lambda: must be a number >= 0, got {lam!r}")
    scheduler = _check_keys("scheduler", data.get("scheduler", {"type": "asha"}), SCHEDULER_KEYS, p)
    if scheduler.get("type", "asha") not in ("asha", "none"):
        p.append(f"scheduler.type: must be 'asha' or 'none', got {scheduler.get('type')!r}")
    for key in ("grace_period", "reduction_factor", "max_t"):
        if key in scheduler and not (isinstance(scheduler[key], int) and scheduler[key] >= 1):
            p.append(f"scheduler.{key}: must be an integer >= 1, got {scheduler[key]!r}")
    if obj_type == "pareto" and scheduler.get("type", "asha") == "asha":
        p.append("scheduler.type: ASHA needs one scalar objective; use {type: none} with objective pareto")
    for key, default in (("num_trials", 8), ("seed", 0)):
        value = data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "num_trials" else 0):
            p.append(f"{key}: must be an integer >= {1 if key == 'num_trials' else 0}, got {value!r}")
    resources = _check_keys("resources", data.get("resources"), RESOURCE_KEYS, p)
    gpus = resources.get("gpus_per_trial", 1.0)
    if not (gpus == "auto" or (_is_number(gpus) and gpus >= 0)):
        p.append(f"resources.gpus_per_trial: must be a number >= 0 or 'auto', got {gpus!r}")
    for key in ("cpus_per_trial",):
        if key in resources and not (_is_number(resources[key]) and resources[key] > 0):
            p.append(f"resources.{key}: must be a number > 0, got {resources[key]!r}")
    demo = _check_keys("demo", data.get("demo"), DEMO_KEYS, p) if "demo" in data else None
    if not p and train:
        try:  # the fixed fields with defaults for the searched ones must make a valid config
            TrainConfig(**{k: v for k, v in train.items()})
        except ConfigError as e:
            p += [f"train: {line.strip()}" for line in str(e).splitlines()[1:]]
        except TypeError as e:
            p.append(f"train: {e}")
    if p:
        raise SpaceError(f"{path}: {len(p)} problem(s):\n  " + "\n  ".join(p))
    return SearchSpace(
        name=name, train=dict(train), search=dict(search), objective=obj_type, score_lambda=float(lam),
        scheduler={"type": "asha", **scheduler}, num_trials=data.get("num_trials", 8), seed=data.get("seed", 0),
        gpus_per_trial=gpus if gpus == "auto" else float(gpus),
        cpus_per_trial=resources.get("cpus_per_trial"), max_failures=int(resources.get("max_failures", 3)),
        demo=demo, path=path,
    )
