"""Export a trained adapter as a standalone model directory for serving (vLLM, TGI, transformers).

    python -m ray_jobs.export --adapter experiments/demo/trials/<best>/final --out exported/demo
    python -m ray_jobs.export --adapter checkpoints/qwen_confidence/best_calibration \\
        --out exported/qwen-confidence --dtype bf16 --device cuda
    vllm serve exported/qwen-confidence --max-logprobs 20

Single process, no Ray: LoRA merged into the weights, the confidence tokens' rows in the embedding
and output matrices, the tokenizer with the tokens, a generation config that stops at the tokens;
safetensors only, written to a temporary directory and renamed into place
(:func:`conftok.export.export_merged`). The result loads with plain
``AutoModelForCausalLM.from_pretrained`` + ``AutoTokenizer.from_pretrained``, without conftok or PEFT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        print(f"error: --adapter {adapter}: no adapter_config.json there (expected a directory written by "
              "training: final/, best_accuracy/, best_calibration/ or checkpoint-N/)", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda: no CUDA GPU here (torch.cuda.is_available() is False); merge with "
                  "--device cpu", file=sys.stderr)
            return 2
    from conftok.export import export_merged

    try:
        out = export_merged(adapter, args.out, dtype=args.dtype, base_model=args.base_model, device=args.device,
                            overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:  # an existing --out, a missing base model, a bad dtype
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"Exported {adapter} -> {out} ({args.dtype}, {size / 2**20:.1f} MiB)")
    print(f"Load it with AutoModelForCausalLM.from_pretrained({str(out)!r}); serve it with "
          f"`vllm serve {out} --max-logprobs 20`")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter directory written by training")
    parser.add_argument("--out", required=True, help="model directory to create (must not exist, unless --overwrite)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                        help="weights of the export (merging is done in fp32; default: bf16)")
    parser.add_argument("--base_model", default=None, help="base model (default: the adapter's base)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to merge: cpu (default) or cuda")
    parser.add_argument("--overwrite", action="store_true", help="replace --out once the new export is complete")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="run code shipped with the base model's repo (off: transformers' own classes only)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
