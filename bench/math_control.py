"""The positive control: can the confidence token learn WHICH answers are right?

    HF_HUB_OFFLINE=1 .venv/bin/python bench/math_control.py prepare      # rows, tagging, the base model's answers
    HF_HUB_OFFLINE=1 .venv/bin/python bench/math_control.py probe        # the ceiling: a linear probe
    HF_HUB_OFFLINE=1 .venv/bin/python bench/math_control.py train --name defaults [--set KEY=VALUE ...]

SmolLM2-135M-Instruct on generated arithmetic of graded difficulty (``conftok.arithmetic``), the
third domain ``<C_MATH>``/``<U_MATH>`` of ``domains/read_med_math.yaml`` (all three domains' tokens
are in the model, so a wrong-domain token can be emitted and is counted). Rows:

- training: 560 questions (seed 0), tagged by the base model (``conftok.tagging``);
- validation during training (only to pick best_* checkpoints): 48 questions (seed 2);
- evaluation: 320 questions (seed 1), never tagged or trained on; the three parts share no question.

``prepare`` also evaluates the base model with fresh token rows on the evaluation part (the
untrained-token baseline and the base model's own answer accuracy), once for all runs. ``train``
trains with ``conftok.train`` (TrainConfig defaults, then the settings below, then ``--set``) and
evaluates the final adapter: the trained token against the answer-probability and untrained-token
baselines, in ``ray_jobs.evaluate``'s figures plus bootstrap intervals and the routing check.
Results: ``bench/results/math_control_{probe,NAME}.json``; work: ``bench/results/math_control_work/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.study import ROOT, Study, main  # noqa: E402

N_TRAIN, N_VAL, N_EVAL = 560, 48, 320


def make_rows() -> dict[str, dict[str, list[dict]]]:
    from conftok.arithmetic import make_arithmetic_rows

    train = make_arithmetic_rows(N_TRAIN, seed=0)
    seen = {r["question"] for r in train}
    val = make_arithmetic_rows(N_VAL, seed=2, exclude=seen)
    seen |= {r["question"] for r in val}
    held_out = make_arithmetic_rows(N_EVAL, seed=1, exclude=seen)
    return {"train": {"arithmetic": train}, "val": {"arithmetic": val}, "eval": {"arithmetic": held_out}}


STUDY = Study(
    name="math_control", domains_file=ROOT / "domains" / "read_med_math.yaml", make_rows=make_rows,
    # Short rows: checkpointing off is fast and small on the CPU. Validation on 48 rows picks best_*.
    fixed=dict(max_seq_length=256, gradient_checkpointing=False, eval_batch_size=32, max_new_tokens=16,
               calib_beta=100, logging_steps=5, val_max_samples=None),
    beta=100, eval_batch=32, max_new_tokens=16,
)

if __name__ == "__main__":
    sys.exit(main(STUDY, level_key="level", doc=__doc__))
