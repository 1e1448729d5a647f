"""Check a Ray cluster launcher config (``cluster.yaml``) offline, against Ray's own schema.

    python -m ray_jobs.cluster                     # the project's cluster.yaml
    python -m ray_jobs.cluster path/to/cluster.yaml

``ray up`` finds a typo only once it talks to the cloud; this runs the same checks without one:
Ray's JSON schema (``ray/autoscaler/ray-schema.json``) on the file as written, then Ray's own
``prepare_config`` + ``validate_config`` (defaults filled in, the cross-field rules such as
``head_node_type`` naming a node type). Every schema problem is reported at once, as
``FILE:LINE: key.path: problem; allowed: ...``. Instance type names are not checked (Ray looks
them up in the cloud), which is why ``cluster.yaml`` states each node type's ``resources``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from conftok.inputs import InputError, format_problems, load_yaml, problems_message

DEFAULT_CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"


def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def _schema_problem(error) -> tuple[tuple[Any, ...], str]:
    """(key path, problem with what is allowed) for one jsonschema error."""
    path = tuple(error.absolute_path)
    schema, instance = error.schema, error.instance
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        allowed = sorted(schema.get("properties", {}))
        patterns = list(schema.get("patternProperties", {}))
        unknown = [k for k in instance if k not in allowed and not any(re.search(p, k) for p in patterns)]
        return (*path, unknown[0]) if len(unknown) == 1 else path, (
            f"unknown key{'s ' + str(unknown) if len(unknown) > 1 else ''}; allowed: {allowed}")
    if error.validator == "required":
        return path, f"{error.message}; required here: {schema['required']}"
    if error.validator == "type":
        return path, f"expected {error.validator_value}, got {type(instance).__name__} {instance!r}"
    if error.validator == "enum":
        return path, f"{instance!r} is not allowed; allowed: {error.validator_value}"
    return path, error.message


def check_cluster_config(path: str | Path) -> dict[str, Any]:
    """The config of ``path`` after Ray's checks; :class:`InputError` listing every problem."""
    import jsonschema

    path = Path(path)
    config, lines = load_yaml(path, "Ray cluster config")
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a mapping of cluster settings (cluster_name, provider, ...), "
                         f"got {type(config).__name__}")
    validator = jsonschema.Draft7Validator(ray_schema())
    problems = [_schema_problem(e) for e in validator.iter_errors(config)]
    node_types, head = config.get("available_node_types"), config.get("head_node_type")
    if isinstance(node_types, dict) and head is not None and head not in node_types:
        problems.append((("head_node_type",), f"{head!r} is not one of available_node_types; allowed: "
                                              f"{list(node_types)}"))
    if problems:
        raise InputError(problems_message(path, format_problems(path, problems, lines)))
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:  # Ray's defaults and cross-field rules (head_node_type, min_workers against max_workers)
        prepared = prepare_config(config)
        validate_config(prepared)
    except (ValueError, KeyError, TypeError, RuntimeError, jsonschema.ValidationError) as e:
        raise InputError(f"{path}: {getattr(e, 'message', None) or e}") from None
    return prepared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CLUSTER), help="cluster YAML (default: cluster.yaml)")
    args = parser.parse_args(argv)
    try:
        config = check_cluster_config(args.config)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    nodes = ", ".join(f"{name} {node.get('resources', {})}" for name, node in config["available_node_types"].items())
    print(f"{args.config}: valid for Ray's cluster launcher; node types: {nodes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
