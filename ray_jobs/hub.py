"""Push a trained adapter and its tokenizer to the Hugging Face Hub with a model card.

The token comes from ``$HF_TOKEN`` or ``huggingface-cli login`` (``huggingface_hub`` finds it);
it is never a flag and never printed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from conftok import metrics as M

CARD_METRICS = (M.VAL_ACCURACY, M.VAL_CALIBRATION_ERROR, M.VAL_BRIER, M.VAL_AUROC, M.VAL_ANSWER_ACCURACY,
                M.VAL_TOKEN_RATE)


def _loss_description(config: dict[str, Any]) -> str:
    names = (("placement", "placement_weight"), ("KL", "kl_weight"), ("stored top-k KL", "stored_kl_weight"),
             ("answer cross-entropy", "answer_ce_weight"))
    terms = [f"{name} weight {config[key]:g}" for name, key in names if config.get(key)]
    if config.get("answer_ce_weight") and config.get("answer_ce_rows") == "correct":
        terms[-1] += " (right answers only)"
    if not terms:
        return "loss on the confidence token only"
    return ("cross-entropy on the confidence token, plus guard terms on the answer's positions that keep "
            "the answers the base model's (" + ", ".join(terms) + ")")


def model_card(adapter_dir: Path, repo: str, metrics: dict[str, Any]) -> str:
    meta = json.loads((adapter_dir / "conftok.json").read_text())
    base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path", "")
    tokens = ", ".join(f"`{t}`" for t in meta["token_ids"])
    rows = [f"| {k} | {metrics[k]:.4f} |" for k in sorted(metrics)
            if k.startswith("val/") and isinstance(metrics[k], (int, float)) and not math.isnan(metrics[k])
            and (k in CARD_METRICS or k.count("/") == 2)]
    return "\n".join([
        "---", "library_name: peft", f"base_model: {base}", "tags: [conftok, lora, confidence, calibration]", "---",
        f"# {repo}", "",
        f"A LoRA adapter for `{base}` that appends a confidence token after each answer ({tokens}): "
        "C when the model's answer is likely right, U otherwise. p_confident = p(C) / (p(C) + p(U)) "
        "at the token's position. Trained with [conftok](https://pypi.org/project/conftok/): "
        f"{_loss_description(meta.get('config') or {})}.", "",
        "## Validation metrics", "", "| metric | value |", "| --- | --- |", *rows, "",
        "Accuracy is token accuracy (emitted token = C if the answer was right, else U); calibration error "
        "is Hendrycks' binned RMS error of p_confident against answer correctness; overall figures are means "
        "over domains.", "",
        "## Use", "", "```python", "from conftok.modeling import load_adapter",
        f'model, tokenizer, domains = load_adapter("{repo}", bf16=True)  # bf16 on a GPU, as validated', "```", "",
    ])


def push_problem(repo: str) -> str | None:
    """Why pushing to ``repo`` after training would fail, found before training starts (the push comes after hours
    of it): the Hub switched off here, or no token it accepts (``whoami``). None where the push can be tried."""
    from huggingface_hub import HfApi

    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return (f"--hf_repo {repo}: the Hub is switched off here (HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']}), so "
                "the push after training would fail: unset it, or leave out --hf_repo and push final/ later")
    try:
        HfApi().whoami()
    except Exception as e:  # noqa: BLE001 - no token, a rejected one, or no network: each stops the push alike
        return (f"--hf_repo {repo}: the Hub does not accept this machine's token ({type(e).__name__}: {e}); set "
                "$HF_TOKEN or run `huggingface-cli login`, or leave out --hf_repo")
    return None


def push_adapter(adapter_dir: str | Path, repo: str, *, metrics: dict[str, Any], private: bool = True) -> str:
    """Create ``repo`` if needed and upload the adapter directory with a model card; returns its URL."""
    from huggingface_hub import HfApi

    adapter_dir = Path(adapter_dir)
    # A new file renamed over the old: final/'s files are hard links shared with a checkpoint
    # (conftok.checkpoint.link_tree), and writing into one in place would change both.
    tmp = adapter_dir / ".README.md.tmp"
    tmp.write_text(model_card(adapter_dir, repo, metrics))
    os.replace(tmp, adapter_dir / "README.md")
    api = HfApi()
    api.create_repo(repo, exist_ok=True, private=private)
    api.upload_folder(repo_id=repo, folder_path=str(adapter_dir), commit_message="conftok adapter")
    return f"https://huggingface.co/{repo}"
