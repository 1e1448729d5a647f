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
    resources: {gpus_per_trial: 1, cpus_per_trial: 8, max_failures: 3}   # restarts of a trial (worker or node lost)
    demo: {n_train: 64, n_val: 24}    # optional: build the embedded demo data and model first

Every problem in a file is reported at once, each with its line and key path and what is allowed::

    space.yaml:9: search.learning_rate.loguniform: empty range [0.001, 1e-05]: low > high; allowed: low < high
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftok.config import ConfigError, TrainConfig
from conftok.inputs import InputError, duplicate_keys, format_problems, load_yaml, problems_message

SEARCHABLE = {"lora_r": int, "lora_alpha": float, "learning_rate": float, "lora_dropout": float,
              "weight_decay": float, "warmup_ratio": float, "num_epochs": int, "batch_size": int}
ALPHA_PER_RANK = "lora_alpha_per_rank"  # the sampled name of a lora_alpha searched as multiple_of_rank
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "multiple_of_rank")
INT_DISTRIBUTIONS = ("choice", "randint")  # an integer field sampled from uniform would get floats
FLOAT_DISTRIBUTIONS = ("choice", "uniform", "loguniform")
# What TrainConfig allows for each searchable field: every choice and both ends of a range are checked.
ALLOWED_VALUES = {
    "lora_r": ("integers >= 1", lambda v: v >= 1), "num_epochs": ("integers >= 1", lambda v: v >= 1),
    "batch_size": ("integers >= 1", lambda v: v >= 1), "lora_alpha": ("numbers > 0", lambda v: v > 0),
    "learning_rate": ("numbers > 0", lambda v: v > 0), "weight_decay": ("numbers >= 0", lambda v: v >= 0),
    "lora_dropout": ("numbers in [0, 1)", lambda v: 0 <= v < 1), "warmup_ratio": ("numbers in [0, 1)", lambda v: 0 <= v < 1),
}
TOP_KEYS = {"name", "train", "search", "objective", "scheduler", "num_trials", "seed", "resources", "demo",
            "description"}
OBJECTIVE_KEYS = {"type", "lambda"}
SCHEDULER_KEYS = {"type", "grace_period", "reduction_factor", "max_t"}
DEFAULT_MAX_T = 100  # ASHA's max_t (validations) where a space gives none
RESOURCE_KEYS = {"gpus_per_trial", "cpus_per_trial", "max_failures"}
DEMO_KEYS = {"n_train", "n_val", "seed"}
EMBEDDED_MODEL = "embedded:smollm2"


class SpaceError(InputError):
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


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number_hint(value: Any) -> str:
    """A hint for numbers YAML 1.1 reads as strings: ``1e-4`` (no dot) is the string '1e-4'."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return f" (YAML reads {value} as a string: write it with a dot and a signed exponent, such as 1.0e-4)"
    return ""


Problems = list[tuple[tuple[Any, ...], str]]  # (key path, problem)


def _check_search(search: Any, p: Problems) -> None:
    if not isinstance(search, dict) or not search:
        p.append((("search",), "must be a non-empty mapping of parameter -> {distribution: arguments}, "
                               f"e.g. {{lora_r: {{choice: [8, 16]}}}}; got {search!r}"))
        return
    for key, spec in search.items():
        where = ("search", key)
        if key not in SEARCHABLE:
            p.append((where, f"unknown parameter; searchable: {sorted(SEARCHABLE)}"))
            continue
        if not isinstance(spec, dict) or len(spec) != 1:
            p.append((where, f"must be one {{distribution: arguments}} pair, got {spec!r}; distributions: "
                             f"{list(DISTRIBUTIONS)}"))
            continue
        (kind, arg), = spec.items()
        where = (*where, kind)
        if kind not in DISTRIBUTIONS:
            p.append((where, f"unknown distribution {kind!r}; allowed: {list(DISTRIBUTIONS)}"))
            continue
        allowed, is_allowed = ALLOWED_VALUES[key]
        integer = SEARCHABLE[key] is int
        kinds = INT_DISTRIBUTIONS if integer else FLOAT_DISTRIBUTIONS
        if kind == "multiple_of_rank" and key != "lora_alpha":
            p.append((where, f"multiple_of_rank is only for lora_alpha; {key} takes {list(kinds)}"))
            continue
        if kind not in kinds and kind != "multiple_of_rank":
            p.append((where, f"{key} takes {allowed}: use one of {list(kinds)}, not {kind}"))
            continue
        if kind in ("choice", "multiple_of_rank"):
            fits = (lambda v: _is_number(v) and v > 0) if kind == "multiple_of_rank" else (
                lambda v: (_is_int(v) if integer else _is_number(v)) and is_allowed(v))
            bad = [v for v in arg if not fits(v)] if isinstance(arg, list) else []
            if not isinstance(arg, list) or not arg:
                p.append((where, f"must be a non-empty list of values, got {arg!r}"))
            elif bad:
                what = "positive numbers (multiples of lora_r)" if kind == "multiple_of_rank" else allowed
                p.append((where, f"{key} takes {what}, got {bad[0]!r} in {arg!r}{_number_hint(bad[0])}"))
            continue
        if not (isinstance(arg, list) and len(arg) == 2 and all(_is_number(v) for v in arg)):
            text = next((v for v in arg if isinstance(v, str)), None) if isinstance(arg, list) else None
            p.append((where, f"must be [low, high] numbers, got {arg!r}{_number_hint(text)}"))
            continue
        low, high = arg
        if low > high:
            p.append((where, f"empty range [{low}, {high}]: low > high; allowed: low < high"))
        elif low == high:
            p.append((where, f"empty range [{low}, {high}]: low = high; allowed: low < high (for one value use "
                             f"choice: [{low}])"))
        if kind == "loguniform" and low <= 0:
            p.append((where, f"loguniform needs low > 0, got {low}"))
        if kind == "randint" and not all(_is_int(v) for v in arg):
            p.append((where, f"randint needs integer bounds, got {arg!r}"))
        for bound in (low, high):
            if not is_allowed(bound):
                p.append((where, f"{key} takes {allowed}, but the range holds {bound!r}"))
                break


def _check_keys(where: str, value: Any, allowed: set[str], p: Problems) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        p.append(((where,), f"must be a mapping with keys among {sorted(allowed)}, got {type(value).__name__}"))
        return {}
    for key in sorted(set(value) - allowed, key=str):
        p.append(((where, key), f"unknown key; allowed: {sorted(allowed)}"))
    return value


def _config_problems(train: dict[str, Any]) -> Problems:
    """TrainConfig's own checks of the fixed fields (defaults for the searched ones), each at its key:
    every line of a :class:`ConfigError` starts with the field's name."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        TrainConfig(**{k: v for k, v in train.items() if k in known})  # unknown keys are reported on their own
    except (TypeError, ValueError) as e:
        if not isinstance(e, ConfigError):  # a value TrainConfig's checks could not even compare
            return [(("train",), f"{type(e).__name__}: {e}")]
        out = []
        for line in str(e).splitlines()[1:]:
            line = line.strip()
            name = re.match(r"\w+", line).group(0) if re.match(r"\w+", line) else ""
            out.append((("train", name) if name in train else ("train",),
                        line + _number_hint(train.get(name))))
        return out
    return []


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a search-space file; raise :class:`SpaceError` listing every problem as
    ``FILE:LINE: key.path: problem; what is allowed``."""
    path = Path(path)
    try:
        data, lines = load_yaml(path, "search-space file")
    except InputError as e:
        raise SpaceError(str(e)) from None
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: expected a mapping at the top level (name, train, search, ...), "
                         f"got {type(data).__name__}")
    p: Problems = []
    for key in sorted(set(data) - TOP_KEYS, key=str):
        p.append(((key,), f"unknown key; allowed: {sorted(TOP_KEYS)}"))
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        p.append((("name",), f"must be a non-empty string without '/', got {name!r}"))
    train = _check_keys("train", data.get("train"), {f.name for f in dataclasses.fields(TrainConfig)}, p)
    search = data.get("search")
    _check_search(search, p)
    if isinstance(search, dict):
        for key in sorted(set(search) & set(train)):
            p.append((("search", key), f"also fixed in train.{key}; keep one"))
    objective = _check_keys("objective", data.get("objective", {"type": "score"}), OBJECTIVE_KEYS, p)
    obj_type = objective.get("type", "score")
    if obj_type not in ("score", "pareto"):
        p.append((("objective", "type"), f"must be 'score' or 'pareto', got {obj_type!r}"))
    lam = objective.get("lambda", 1.0)
    if not _is_number(lam) or lam < 0:
        p.append((("objective", "lambda"), f"must be a number >= 0, got {lam!r}"))
    scheduler = _check_keys("scheduler", data.get("scheduler", {"type": "asha"}), SCHEDULER_KEYS, p)
    if scheduler.get("type", "asha") not in ("asha", "none"):
        p.append((("scheduler", "type"), f"must be 'asha' or 'none', got {scheduler.get('type')!r}"))
    for key, least in (("grace_period", 1), ("reduction_factor", 2), ("max_t", 1)):  # as Ray's ASHAScheduler asserts
        if key in scheduler and not (_is_int(scheduler[key]) and scheduler[key] >= least):
            p.append((("scheduler", key), f"must be an integer >= {least}, got {scheduler[key]!r}"))
    grace, max_t = scheduler.get("grace_period", 1), scheduler.get("max_t", DEFAULT_MAX_T)
    if _is_int(grace) and _is_int(max_t) and grace > max_t:
        p.append((("scheduler", "grace_period"), f"must be <= max_t ({max_t}{'' if 'max_t' in scheduler else ', the default'})"
                                                 f", got {grace}"))
    if obj_type == "pareto" and scheduler.get("type", "asha") == "asha":
        p.append((("scheduler", "type"), "ASHA needs one scalar objective; use {type: none} with objective pareto"))
    for key, least in (("num_trials", 1), ("seed", 0)):
        value = data.get(key, least)
        if not _is_int(value) or value < least:
            p.append(((key,), f"must be an integer >= {least}, got {value!r}"))
    resources = _check_keys("resources", data.get("resources"), RESOURCE_KEYS, p)
    gpus = resources.get("gpus_per_trial", 1.0)
    if not (gpus == "auto" or (_is_number(gpus) and gpus >= 0)):
        p.append((("resources", "gpus_per_trial"), f"must be a number >= 0 or 'auto', got {gpus!r}"))
    if "cpus_per_trial" in resources and not (_is_number(resources["cpus_per_trial"]) and resources["cpus_per_trial"] > 0):
        p.append((("resources", "cpus_per_trial"), f"must be a number > 0, got {resources['cpus_per_trial']!r}"))
    if "max_failures" in resources and not (_is_int(resources["max_failures"]) and resources["max_failures"] >= 0):
        p.append((("resources", "max_failures"), f"must be an integer >= 0, got {resources['max_failures']!r}"))
    demo = _check_keys("demo", data.get("demo"), DEMO_KEYS, p) if "demo" in data else None
    for key, value in (demo or {}).items():
        if not _is_int(value) or value < (0 if key == "seed" else 1):
            p.append((("demo", key), f"must be an integer >= {0 if key == 'seed' else 1}, got {value!r}"))
    if train:  # the fixed fields with defaults for the searched ones must make a valid config; with the rest
        p += _config_problems(train)
    duplicates = duplicate_keys(path)
    if p or duplicates:
        raise SpaceError(problems_message(path, duplicates + format_problems(path, p, lines)))
    return SearchSpace(
        name=name, train=dict(train), search=dict(search), objective=obj_type, score_lambda=float(lam),
        scheduler={"type": "asha", **scheduler}, num_trials=data.get("num_trials", 8), seed=data.get("seed", 0),
        gpus_per_trial=gpus if gpus == "auto" else float(gpus),
        cpus_per_trial=resources.get("cpus_per_trial"), max_failures=int(resources.get("max_failures", 3)),
        demo=demo, path=path,
    )
