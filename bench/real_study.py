"""The real rows again: SmolLM2-135M-Instruct on BoolQ and MedQA with the chosen guard.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/real_study.py prepare       # rows, tagging, the base model's answers
    HF_HUB_OFFLINE=1 .venv/bin/python bench/real_study.py probe         # do SmolLM2's own answers carry a signal?
    HF_HUB_OFFLINE=1 .venv/bin/python bench/real_study.py train --name NAME [--set KEY=VALUE ...]

Rows, by position in ``../shared/data`` (read at run time, never copied into the project):

- training: BoolQ dev 0-255 and MedQA dev 0-255 (512 rows, twice the earlier study's), tagged by the model;
- validation during training (only to pick best_* checkpoints): BoolQ dev 1968-1999, MedQA dev 968-999;
- evaluation: BoolQ dev 2000-2149 and MedQA dev 1000-1149, never tagged or trained on.

Settings: TrainConfig defaults for the loss, LoRA and rate unless ``--set`` says otherwise; one
epoch (64 steps at batch 8) and no gradient checkpointing, to fit a 2-core CPU. Results:
``bench/results/real_study_{probe,NAME}.json``; work: ``bench/results/real_study_work/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.study import ROOT, Study, main, read_jsonl  # noqa: E402

DATA = Path(os.environ.get("CONFTOK_DATA", ROOT.parent / "shared" / "data"))  # a lent GPU box has its copy elsewhere


def make_rows() -> dict[str, dict[str, list[dict]]]:
    if not DATA.is_dir():
        raise SystemExit(f"error: {DATA} not found (the real rows live in ../shared/data)")
    boolq, medqa = read_jsonl(DATA / "boolq" / "dev.jsonl"), read_jsonl(DATA / "medqa" / "dev.jsonl")
    return {"train": {"boolq": boolq[:256], "medqa": medqa[:256]},
            "val": {"boolq": boolq[1968:2000], "medqa": medqa[968:1000]},
            "eval": {"boolq": boolq[2000:2150], "medqa": medqa[1000:1150]}}


STUDY = Study(
    name="real_study", domains_file=None, make_rows=make_rows,
    fixed=dict(num_epochs=1, max_seq_length=768, gradient_checkpointing=False, eval_batch_size=16, max_new_tokens=16,
               calib_beta=25, logging_steps=5, val_max_samples=None),
    # 150 rows a domain: beta 25 gives 6 bins (beta 100 would give one, a difference of means).
    beta=25, eval_batch=16, max_new_tokens=16,
)

if __name__ == "__main__":
    sys.exit(main(STUDY, doc=__doc__))
