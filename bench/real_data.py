"""A real-data run: SmolLM2-135M-Instruct on real BoolQ and MedQA rows from ../shared/data.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/real_data.py [--n_train 128] [--n_eval 100] [--epochs 2] \
        [--placement_weight 1.0] [--kl_weight 0.0] [--stored_kl_weight 1.0] [--name NAME] [--reuse | --reuse_tagging]

Rows (by position in the files, which keep the published order):
- training: BoolQ dev rows 0 .. n_train-1 and MedQA dev rows 0 .. n_train-1, tagged by the model;
- evaluation: BoolQ dev rows 2000 .. 2000+n_eval-1 and MedQA dev rows 1000 .. 1000+n_eval-1
  (never seen in training or tagging).

Steps, each timed: tag the training part; train LoRA on the token (the demo search's best
settings unless overridden); evaluate the adapter on the evaluation part against the untrained
token and the answer-probability baselines (ray_jobs.evaluate); reliability diagrams. Prints a
table and writes bench/results/real_data.json and PNGs. The data is read at run time, never
copied into the project.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_reliability(result: dict, out: Path, prefix: str = "") -> list[Path]:
    """Per domain, the report's reliability diagram for the trained token and the answer probability."""
    from conftok.calibration import reliability_bins
    from ray_jobs.report import plot_reliability as draw

    paths = []
    for domain, recs in result["records"].items():
        rows = recs["trained"]
        correct = [r["correct"] for r in rows]
        panels = {f"{domain}: {name}": reliability_bins([r[key] or 0.0 for r in rows], correct, n_bins=10)
                  for name, key in (("trained token", "p_confident"), ("answer probability", "p_answer"))}
        paths.append(draw(panels, out / f"{prefix}reliability_{domain}.png"))
    return paths


def train_adapter(args, model_dir, tagged, eval_rows, work: Path, timings: dict):
    from conftok import TrainConfig, train

    t = time.perf_counter()
    # Validation during training on a small slice of the evaluation part only to pick best_calibration;
    # the figures below are from the final adapter on the whole evaluation part.
    val_files = {}
    for name, rows in eval_rows.items():
        val_files[name] = str(work / f"{name}_val.jsonl")
        Path(val_files[name]).write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    cfg = TrainConfig(model_name=str(model_dir), train_data=str(tagged), output_dir=str(work / f"run_{args.name}"), backend="hf",
                      num_epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                      lora_r=args.lora_r, lora_alpha=args.lora_alpha, warmup_ratio=0.1, eval_steps=None,
                      val_sources=val_files, calib_beta=10, max_seq_length=768, gradient_checkpointing=False,
                      eval_batch_size=16, max_new_tokens=16, logging_steps=5,
                      placement_weight=args.placement_weight, kl_weight=args.kl_weight,
                      stored_kl_weight=args.stored_kl_weight)
    result = train(cfg)
    timings["train_s"] = round(time.perf_counter() - t, 1)

    return result.global_step, result.final_dir


def main(argv: list[str] | None = None) -> int:
    from conftok import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n_train", type=int, default=128, help="training rows per domain")
    parser.add_argument("--n_eval", type=int, default=100, help="evaluation rows per domain")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_alpha", type=float, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--placement_weight", type=float, default=TrainConfig.placement_weight,
                        help="weight of the placement term (TrainConfig.placement_weight)")
    parser.add_argument("--kl_weight", type=float, default=TrainConfig.kl_weight,
                        help="weight of the KL term (TrainConfig.kl_weight)")
    parser.add_argument("--stored_kl_weight", type=float, default=TrainConfig.stored_kl_weight,
                        help="weight of the stored top-k KL term (TrainConfig.stored_kl_weight); 0 with --kl_weight")
    parser.add_argument("--name", default="default",
                        help="results go to real_data_NAME.json, PNGs to NAME_*.png, the run to real_data_work/run_NAME")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--reuse", action="store_true", help="reuse the tagged file and trained adapter of a previous run")
    parser.add_argument("--reuse_tagging", action="store_true",
                        help="reuse the tagged file of a previous run (same --n_train), train again")
    args = parser.parse_args(argv)
    if args.kl_weight and args.stored_kl_weight:  # said now, not after minutes of tagging
        parser.error(f"--kl_weight {args.kl_weight} and --stored_kl_weight {args.stored_kl_weight} are two forms of the "
                     "same term: set one of them to 0 (--kl_weight 1 --stored_kl_weight 0 for the live KL)")
    if not args.name.replace("-", "").replace("_", "").isalnum():
        parser.error(f"--name must be letters, digits, - and _ only, got {args.name!r}")
    if not DATA.is_dir():
        print(f"error: {DATA} not found (the real rows live in ../shared/data)", file=sys.stderr)
        return 2

    import torch
    from transformers import AutoModelForCausalLM

    from conftok.modeling import load_adapter, load_tokenizer
    from conftok.smollm import ensure_smollm2
    from conftok.tagging import tag_to_file
    from ray_jobs.evaluate import format_table, plot_curves, run_evaluation

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "real_data_work"
    boolq, medqa = read_jsonl(DATA / "boolq" / "dev.jsonl"), read_jsonl(DATA / "medqa" / "dev.jsonl")
    train_rows = {"boolq": boolq[:args.n_train], "medqa": medqa[:args.n_train]}
    eval_rows = {"boolq": boolq[2000:2000 + args.n_eval], "medqa": medqa[1000:1000 + args.n_eval]}
    timings = {}

    model_dir = ensure_smollm2()
    results = out / f"real_data_{args.name}.json"
    previous = json.loads(results.read_text()) if args.reuse else None
    if previous:
        timings.update({k: v for k, v in previous["timings_s"].items() if k != "evaluate_s"})
        tag_summary, steps, final_dir = previous["tagging"], previous["steps"], work / f"run_{args.name}" / "final"
    t = time.perf_counter()
    if not previous:
        tagged = work / "tagged.jsonl"
        summary_path = tagged.with_suffix(".summary.json")
        reused = args.reuse_tagging and summary_path.is_file() and \
            json.loads(summary_path.read_text())["rows"] == sum(map(len, train_rows.values()))
        if reused:
            tag_summary = json.loads(summary_path.read_text())
            print(f"Reusing {tagged} ({tag_summary['rows']} tagged rows)")
        else:
            tokenizer = load_tokenizer(model_dir)
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
            tagged, tag_summary = tag_to_file(base, tokenizer, train_rows, tagged, batch_size=16, max_new_tokens=16)
            timings["tag_s"] = round(time.perf_counter() - t, 1)
            del base
        steps, final_dir = train_adapter(args, model_dir, tagged, eval_rows, work, timings)

    t = time.perf_counter()
    model, tokenizer, domains = load_adapter(final_dir, device="cpu")
    model.to(torch.bfloat16)
    evaluation = run_evaluation(model, tokenizer, domains, eval_rows, beta=25, p="2", batch_size=16, max_new_tokens=16)
    timings["evaluate_s"] = round(time.perf_counter() - t, 1)
    pngs = plot_curves(evaluation, out, prefix=f"{args.name}_") + plot_reliability(evaluation, out, prefix=f"{args.name}_")

    table = format_table(evaluation["methods"])
    print("\n" + table)
    print(f"\nTiming: {timings}")
    summary = {"rows": {"train": "boolq dev[0:%d], medqa dev[0:%d]" % (args.n_train, args.n_train),
                        "eval": "boolq dev[2000:%d], medqa dev[1000:%d]" % (2000 + args.n_eval, 1000 + args.n_eval)},
               "settings": vars(args), "tagging": tag_summary, "timings_s": timings, "steps": steps,
               "methods": evaluation["methods"], "pngs": [p.name for p in pngs], "table": table}
    results.write_text(json.dumps(summary, indent=2, default=str))
    print(f"Wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
