"""Tag raw rows with a base model's own answers on a pool of model replicas (Ray Data).

    python -m ray_jobs.tag --model_name Qwen/Qwen2.5-7B-Instruct \\
        --data boolq=data/boolq_train.jsonl medqa=data/medqa_train.jsonl \\
        --out tagged/qwen/qwen_all_tagged.jsonl

    # a submitted job runs in a copy of the working dir: give paths outside it (README, "Ray cluster and jobs")
    ray job submit --working-dir . -- python -m ray_jobs.tag --model_name Qwen/Qwen2.5-7B-Instruct \\
        --data boolq=/data/boolq_train.jsonl medqa=/data/medqa_train.jsonl --out /data/tagged/qwen_all_tagged.jsonl

The same tagging as ``python -m conftok.tagging`` (same prompts, parser, output and summary), spread
over one model replica per GPU (``--num_gpus auto``: every GPU of the cluster) or, on a CPU-only
cluster, one replica on the CPUs. Rows are read on the driver, which plans the generate() batches as
the single process would (:func:`conftok.evaluate.plan_batches` over each data set's prompt lengths,
batched as on the replicas' device); each replica loads the model once and generates each planned
batch as it is, so the padded inputs, and with them the bf16 answers, are the single process's. The
driver puts the results back in the order of ``--data`` and its rows and writes ``--out`` and
``<out>.summary.json``. Results stay in memory until then, as in the
core. ``--model_name`` must be a Hub id or a directory every node can read.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

# Planned generate() batches per Ray Data batch: more share the work among replicas more coarsely.
BATCHES_PER_TASK = 8


class Tagger:
    """A Ray Data replica: loads the tokenizer and model once, then tags batches of rows.

    A Ray Data batch holds planned generate() batches (:func:`plan_items`), one an item: columns
    ``dataset`` (name), ``indices`` (the rows' numbers in that data set, JSON) and ``rows`` (the raw rows
    as JSON: raw rows differ in their fields, which Arrow columns would not allow); the output has
    ``dataset``, ``index`` and ``outcome`` (:func:`conftok.tagging.tag_dataset`'s, as JSON), one per row.
    """

    def __init__(self, model_name: str, *, domains: list[dict[str, Any]], bf16: bool, batch_size: int,
                 max_new_tokens: int, torch_threads: int | None = None, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM

        from conftok.domains import resolve_domains
        from conftok.modeling import load_tokenizer

        if torch_threads:  # Ray sets OMP_NUM_THREADS from num_cpus, rounded down: one thread for 1.95 CPUs
            torch.set_num_threads(torch_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_name, dtype=torch.bfloat16 if bf16 else torch.float32, use_safetensors=True,
            trust_remote_code=trust_remote_code).to(device).eval()
        self.domains = resolve_domains(domains)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from conftok.tagging import tag_dataset

        out: dict[str, list] = {"dataset": [], "index": [], "outcome": []}
        for name, indices, rows in zip(batch["dataset"], batch["indices"], batch["rows"]):
            indices, rows = json.loads(indices), json.loads(rows)
            # One planned batch, generated as one: batch_size its rows, "rows" batching (sorted by length again,
            # stably: the order it was planned in).
            outcomes = tag_dataset(self.model, self.tokenizer, str(name), rows, domains=self.domains,
                                   batch_size=len(rows), max_new_tokens=self.max_new_tokens, progress=False,
                                   batching="rows")
            out["dataset"] += [str(name)] * len(rows)
            out["index"] += indices
            out["outcome"] += [json.dumps(o) for o in outcomes]
        return {key: np.array(values) for key, values in out.items()}


def plan_items(rows_by_dataset: dict[str, list[dict]], tokenizer, domains, *, batch_size: int, max_new_tokens: int,
               batching: str) -> list[dict[str, Any]]:
    """The Ray Data items: one a generate() batch, as :func:`conftok.tagging.tag_dataset` on one process would plan
    them for each data set (:func:`conftok.evaluate.plan_batches` over its prompt lengths, ``batching`` resolved for
    the replicas' device). Cutting the rows in file order instead, each replica re-planning its share, gave other
    padded batches and, in bf16, other answers (15 of 256 SmolLM2 rows)."""
    from conftok.evaluate import plan_batches
    from conftok.prompts import encode_prompt

    items = []
    for name, rows in rows_by_dataset.items():
        domain = domains.for_dataset(name)
        lengths = [len(encode_prompt(tokenizer, domain.build_question(row))) for row in rows]
        for planned in plan_batches(lengths, batch_size, batching, decode_steps=max_new_tokens):
            items.append({"dataset": name, "indices": json.dumps(planned),
                          "rows": json.dumps([rows[i] for i in planned], ensure_ascii=False)})
    return items


def tag_with_ray_data(model_name: str, rows_by_dataset: dict[str, list[dict]], *, domains, num_gpus: int,
                      cpus_per_replica: float, bf16: bool = True, batch_size: int = 16,
                      max_new_tokens: int = 16, trust_remote_code: bool = False, tokenizer=None) -> tuple[list[dict], dict]:
    """``(tagged_rows, summary)`` as :func:`conftok.tagging.tag_rows` gives them, computed by
    ``num_gpus`` one-GPU replicas (or one CPU replica when 0). ``tokenizer``: the model's, to plan the batches
    (loaded here when not given)."""
    import ray.data

    from conftok.evaluate import resolve_batching
    from conftok.tagging import collect_tagged
    from ray_jobs.common import torch_threads

    if tokenizer is None:
        from conftok.modeling import load_tokenizer

        tokenizer = load_tokenizer(model_name, trust_remote_code=trust_remote_code)
    items = plan_items(rows_by_dataset, tokenizer, domains, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       batching=resolve_batching("auto", "cuda" if num_gpus else "cpu"))
    results = ray.data.from_items(items).map_batches(
        Tagger,
        fn_constructor_kwargs={"model_name": model_name, "domains": domains.to_list(), "bf16": bf16,
                               "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                               "torch_threads": None if num_gpus else torch_threads(cpus_per_replica),
                               "trust_remote_code": trust_remote_code},
        batch_size=BATCHES_PER_TASK, compute=ray.data.ActorPoolStrategy(size=max(1, num_gpus)),
        num_gpus=1 if num_gpus else 0, num_cpus=cpus_per_replica,
    ).take_all()
    # Replicas finish in any order: put each data set's outcomes back in row order.
    outcomes: dict[str, list] = {name: [None] * len(rows) for name, rows in rows_by_dataset.items()}
    for r in results:
        outcomes[r["dataset"]][int(r["index"])] = json.loads(r["outcome"])
    missing = [f"{name}[{i}]" for name, per_row in outcomes.items() for i, o in enumerate(per_row) if o is None]
    if missing:  # every row is in one planned batch; a lost one must stop the job, not write a file without it
        raise RuntimeError(f"rows without a result: {missing[:10]}")
    return collect_tagged(outcomes, domains)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from conftok.inputs import InputError
    from conftok.tagging import check_tag_inputs, write_tagged
    from ray_jobs.common import ResourceError, autoscaling_gpus, check_resources, init_ray, largest_node_cpus

    try:  # the single-process tagging's checks: every row, --out, the tokens, before Ray starts
        domains, rows, tokenizer = check_tag_inputs(args.model_name, args.data, args.out, split=args.split, limit=args.limit,
                                            domains=args.domains, trust_remote_code=args.trust_remote_code)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    resources = init_ray(args.address)
    _, max_gpus = autoscaling_gpus()
    extra_gpus = max(0.0, max_gpus - resources.get("GPU", 0.0))  # GPU nodes the autoscaler can still add
    num_gpus = int(resources.get("GPU", 0.0) or extra_gpus) if args.num_gpus is None else args.num_gpus
    # A GPU replica needs a CPU for tokenizing and decoding; a CPU replica gets all but a sliver
    # of the largest node (torch runs one thread per CPU Ray gives it).
    cpus = 1.0 if num_gpus else max(1.0, (largest_node_cpus() or 1.0) - 0.05)
    try:
        check_resources(num_gpus, cpus * max(1, num_gpus), resources, autoscaling_gpus=extra_gpus,
                        cpu_hint="use --num_gpus 0 to tag on CPUs", fewer_cpus_hint="use --num_gpus 0 or fewer GPUs")
    except ResourceError as e:
        print(f"error: --num_gpus {num_gpus} (one model replica per GPU): {e}", file=sys.stderr)
        return 2
    replicas = f"{num_gpus} replica(s) on 1 GPU each" if num_gpus else f"1 replica on {cpus:g} CPUs"
    print(f"Ray Data tagging: {sum(map(len, rows.values()))} rows, {replicas}", flush=True)
    tagged, summary = tag_with_ray_data(args.model_name, rows, domains=domains, num_gpus=num_gpus,
                                        cpus_per_replica=cpus, bf16=args.bf16, batch_size=args.batch_size,
                                        max_new_tokens=args.max_new_tokens, trust_remote_code=args.trust_remote_code,
                                        tokenizer=tokenizer)
    path = write_tagged(tagged, summary, args.out)
    for name, d in summary["domains"].items():
        print(f"{name}: {d['tagged']} tagged, accuracy {100 * d['accuracy']:.1f}% ({d['unparsed']} unparsed)")
    print(f"Wrote {path}")
    return 0


def _gpu_count(text: str) -> int | None:
    if text == "auto":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number of GPUs, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from conftok.tagging import add_tagging_flags

    parser = argparse.ArgumentParser(prog="python -m ray_jobs.tag", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tagging_flags(parser, model_help="Hub id or a directory every node can read")
    ray_group = parser.add_argument_group("Ray")
    ray_group.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    ray_group.add_argument("--num_gpus", type=_gpu_count, default=None,
                           help="model replicas, one GPU each; 0: one replica on the CPUs "
                                "(default 'auto': every GPU the cluster has or can add)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
