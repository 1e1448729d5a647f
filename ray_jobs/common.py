"""Shared pieces of the Ray entry points: CLI flags from TrainConfig, Ray start-up, resource checks."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import typing
from pathlib import Path
from typing import Any

from conftok.config import TrainConfig

logger = logging.getLogger(__name__)


def add_config_flags(parser: argparse.ArgumentParser, defaults: TrainConfig | None = None) -> None:
    """One ``--flag`` per TrainConfig field, named as in the original script (``--lora_r``)."""
    defaults = defaults or TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("training (conftok.TrainConfig)")
    for f in dataclasses.fields(TrainConfig):
        default = getattr(defaults, f.name)
        # argparse expands %(default)s and the like in help texts: a literal % (a share) must be %%.
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")
        hint = hints[f.name]
        if hint is bool:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif hint == bool | str:  # true/false/'auto': a bare --flag means true, --no-flag false
            group.add_argument(f"--{f.name}", nargs="?", const=True, type=_bool_or_auto, default=default,
                               metavar="{auto,true,false}", help=help_text)
            group.add_argument(f"--no-{f.name}", dest=f.name, action="store_const", const=False,
                               help=f"same as --{f.name} false")
        elif f.name == "target_modules":
            group.add_argument(f"--{f.name}", nargs="+", default=list(default), help=help_text)
        elif f.name == "val_sources":
            group.add_argument(f"--{f.name}", nargs="+", metavar="DATASET=SOURCE", default=None, help=help_text,
                               type=_key_value)
        else:
            group.add_argument(f"--{f.name}", type=_scalar_type(hint), default=default, help=help_text)


def _bool_or_auto(text: str) -> bool | str:
    word = text.strip().lower()
    if word == "auto":
        return "auto"
    if word in ("true", "yes", "on", "1"):
        return True
    if word in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected DATASET=SOURCE (e.g. boolq=val/boolq.jsonl), got {text!r}")
    return key, value


def _scalar_type(hint):
    """int/float/str; for ``X | None`` fields the words 'none'/'null' give None."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint)
    base = base if base in (int, float) else str
    return _optional(base) if optional else base


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if values["val_sources"] is not None:
        values["val_sources"] = dict(values["val_sources"])
    return TrainConfig(**values)


def local_paths_made_absolute(fields: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``fields`` (TrainConfig fields) that name local paths relative to this directory, made
    absolute: ``model_name``, ``train_data``, each of ``val_sources``, ``domains`` (a file, and any domain's
    ``validation`` file), and a ``reference_cache`` directory (not ``auto`` or off; made by the first run that
    needs it, so it need not exist yet). Ray's workers run in a directory of their own, where a relative path
    names nothing, while the checks before Ray starts read these paths here. A name with no such path here (a Hub
    model or data set) is left as it is. Only the changed entries are returned; a domains entry whose validation
    files move is returned as the list it holds."""

    def local(value: Any) -> str | None:
        text = str(value)
        return str(Path(text).resolve()) if text and not os.path.isabs(text) and Path(text).exists() else None

    out: dict[str, Any] = {}
    for key in ("model_name", "train_data"):
        if fields.get(key) and (path := local(fields[key])):
            out[key] = path
    cache = fields.get("reference_cache")
    if cache and cache != "auto" and not os.path.isabs(cache):
        out["reference_cache"] = str(Path(cache).resolve())
    sources = fields.get("val_sources")
    if isinstance(sources, dict) and any(local(v) for v in sources.values()):
        out["val_sources"] = {name: local(v) or v for name, v in sources.items()}
    domains = fields.get("domains")
    if isinstance(domains, (str, os.PathLike)) and (path := local(domains)):
        out["domains"] = domains = path
    if domains is not None:
        from conftok.domains import resolve_domains

        try:
            items = resolve_domains(domains).to_list()
        except Exception:  # noqa: BLE001 - a bad domain file: the checks before Ray starts report it in full
            return out
        if any(d.get("validation") and local(d["validation"]) for d in items):
            out["domains"] = [{**d, "validation": local(d["validation"]) or d["validation"]}
                              if d.get("validation") else d for d in items]
    return out


def check_padding_free_here(padding_free: Any, address: str | None) -> None:
    """Raise :class:`~conftok.inputs.InputError` for ``padding_free=True`` without flash-attention, where the job's
    worker runs on this machine (no cluster address: a local Ray is started, with this Python). Otherwise the
    worker finds it out after Ray has started, and each of its restarts fails again on it. On a cluster the
    workers' nodes may have what this one lacks: their own check stands."""
    if padding_free is not True or address or os.environ.get("RAY_ADDRESS"):
        return
    from conftok.inputs import InputError
    from conftok.packing import check_padding_free

    try:
        check_padding_free()
    except ValueError as e:
        raise InputError(str(e)) from e


def driver_env_vars() -> dict[str, str]:
    """The workers' environment variables this driver sets, less those its job's runtime_env sets already
    (``ray job submit --runtime-env-json``, KubeRay's ``runtimeEnvYAML``): Ray refuses to merge the two where a
    key repeats, even with the same value, and the job fails before it starts. The job's value reaches the
    workers then, and the driver's own environment (the job supervisor sets it there too)."""
    # Train V2 patches print() in workers and also tees it to stdout, so every line of the
    # validation block would reach the driver twice; plain stdout is enough here.
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")  # what `ray job submit` gives a driver
    taken = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {key: value for key, value in env_vars.items() if key not in taken}


def connection_problem(error: BaseException, address: str) -> str:
    """What stopped ``ray.init(address=...)``: a cluster with token auth that this driver has no token for (Ray
    2.60's ``ray start --head`` turns it on once ``~/.ray/auth_token`` exists), or the error itself."""
    seen, text = error, []
    while seen is not None and len(text) < 10:
        text.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    if any("InvalidAuthToken" in t or "AuthenticationError" in t for t in text):
        return (f"the Ray cluster at {address} uses token authentication and refused this driver: export "
                "RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token (or $RAY_AUTH_TOKEN)")
    return f"cannot connect to a Ray cluster at {address} ({error}): is its head running (ray start --head)?"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> dict[str, float]:
    """Connect to a cluster (``address``, ``$RAY_ADDRESS``, or a local one) and return its resources."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": True, "logging_level": logging.WARNING,
                                  "runtime_env": {"env_vars": driver_env_vars()}}
        if address:
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as e:  # one line, not Ray's 40 of traceback; exit 2 as for other bad inputs
                print(f"error: {connection_problem(e, address)}", file=sys.stderr)
                raise SystemExit(2) from e
        else:
            start_local_ray(num_cpus=num_cpus, **kwargs)
    return ray.cluster_resources()


def start_local_ray(**init_kwargs: Any) -> None:
    """``ray.init`` of a new local cluster with its dashboard, named to the cluster's own workers.

    The dashboard also serves the State API that Ray Train's placement-group cleaner needs: without
    it a finished trial's CPUs are not freed and the next trial waits. The cleaner finds that API by
    scanning the machine for Ray clusters; with a second one there (another user's or test run's,
    or what a killed search left) it raises "Found multiple active Ray instances", and the next
    trial's workers time out (60 s) and are asked for again, forever. So the dashboard's port is
    chosen here and named in RAY_API_SERVER_ADDRESS to the processes ray.init starts (workers
    inherit their environment); the caller's own environment is put back, runtime_env is untouched.
    The port is free when chosen, but another process may take it before the dashboard binds it (another
    local Ray starting, seen with two test processes): ray.init is then tried again with another port.
    """
    import ray

    for attempt in range(1, DASHBOARD_PORT_ATTEMPTS + 1):
        port = _free_port()
        try:
            with _environ(RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{port}"):
                ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, **init_kwargs)
            return
        except Exception as e:  # Ray raises a plain Exception with the dashboard's log
            taken = "address already in use" in str(e) or "already occupied" in str(e)  # at binding; Ray's check
            if not taken or attempt == DASHBOARD_PORT_ATTEMPTS:
                raise
            logger.warning("the dashboard's port %d was taken before it started; trying another", port)
            ray.shutdown()


DASHBOARD_PORT_ATTEMPTS = 3


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class ResourceError(RuntimeError):
    """The job asks for more than the cluster has or can add."""


def check_resources(gpus_needed: float, cpus_needed: float, resources: dict[str, float],
                    autoscaling_gpus: float = 0.0, *, cpu_hint: str = "use --num_gpus 0 to train on CPUs",
                    fewer_cpus_hint: str = "lower --cpus_per_worker") -> None:
    """Fail at once when the cluster cannot ever give what a worker needs; Ray would otherwise
    wait forever ("No available node types can fulfill resource request"). The hints name the calling
    job's own way out (its flags)."""
    have_gpus = resources.get("GPU", 0.0) + autoscaling_gpus
    have_cpus = resources.get("CPU", 0.0)
    problems = []
    if gpus_needed > have_gpus:
        problems.append(f"{gpus_needed:g} GPU(s) per worker requested, but the cluster has {have_gpus:g} "
                        f"({resources.get('GPU', 0.0):g} now, {autoscaling_gpus:g} more from autoscaling); "
                        f"{cpu_hint}")
    if cpus_needed > have_cpus and not autoscaling_gpus:
        problems.append(f"{cpus_needed:g} CPU(s) per worker requested, but the cluster has {have_cpus:g}; "
                        f"{fewer_cpus_hint}")
    if problems:
        raise ResourceError("cannot schedule the training worker: " + "; ".join(problems))


# Where `ray up` puts the cluster's config on the head (cluster.yaml starts Ray with --autoscaling-config on it).
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def autoscaling_gpus(bootstrap_config: Path | None = None) -> tuple[float, float]:
    """(GPUs of the largest GPU node type, GPUs the cluster may grow to) from the autoscaler's
    config; (0, 0) without an autoscaler.

    ``ray up`` clusters start with ``min_workers: 0``, so ``ray.cluster_resources()`` shows no GPU
    until a GPU worker joins; the autoscaler's node types say what can come. Ray 2.60's GCS holds no
    cluster config for a ``ray up`` cluster (nothing reports it: ``get_cluster_config()`` is None), so
    the node types are read from the config ``ray up`` leaves on the head (:data:`BOOTSTRAP_CONFIG`)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
        if config is not None:
            per_node = max((float(g.resources.get("GPU", 0)) for g in config.node_group_configs
                            if g.max_count != 0), default=0.0)
            total = float((state.get_max_resources_from_cluster_config() or {}).get("GPU", 0))
            return per_node, total
    except Exception:  # no autoscaler state in this GCS
        pass
    return _bootstrap_gpus((bootstrap_config or BOOTSTRAP_CONFIG).expanduser())


def _bootstrap_gpus(path: Path) -> tuple[float, float]:
    """``autoscaling_gpus`` from a cluster launcher config: the node types that may be started."""
    if not path.is_file():
        return 0.0, 0.0
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
        node_types = config.get("available_node_types") or {}
        cap = config.get("max_workers")
        per_node = total = 0.0
        for node_type in node_types.values():
            gpus = float((node_type.get("resources") or {}).get("GPU", 0) or 0)
            count = int(node_type.get("max_workers", cap or 0) or 0)
            count = min(count, int(cap)) if cap is not None else count
            if gpus and count:
                per_node, total = max(per_node, gpus), total + gpus * count
        return per_node, total
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return 0.0, 0.0


def largest_node_cpus() -> float | None:
    """CPUs of the largest live node (a worker cannot span nodes), or None where Ray is not running."""
    import ray

    if not ray.is_initialized():
        return None
    return max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=None)


def default_cpus_per_worker(resources: dict[str, float], gpus: float, node_cpus: float | None = None) -> float:
    """All but a sliver of the CPUs on a CPU-only cluster (torch runs one thread per CPU Ray
    gives a worker), of its largest node where ``node_cpus`` is given (a worker cannot span nodes: the
    cluster's sum would never be scheduled); 8 per GPU worker otherwise."""
    cpus = min(resources.get("CPU", 1.0), node_cpus or math.inf)
    if gpus:
        return min(8.0, cpus)
    return max(1.0, cpus - 0.05)


def torch_threads(cpus: float) -> int:
    return max(1, math.floor(cpus + 0.5))


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Only finite-or-NaN numbers: what Ray Tune and TensorBoard take."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
