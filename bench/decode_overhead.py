"""What a decode step costs beyond its arithmetic: a deep, narrow model with and without conftok's LoRA wrapping.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/decode_overhead.py [--layers 28] [--rounds 3]   # CPU or GPU

Validation is greedy generation, one token a step. On a GPU a 7B model's step reads its weights once
(15 GB: ~5 ms on an H100), and the rest is launching kernels from Python; LoRA adds two small
products, a dropout module and a scaling for each of the seven projections of every layer, and the
new tokens' rows add wrappers around the embedding and the output matrix. This measures that part
alone: a Qwen2-shaped model with ``--layers`` layers (28, as Qwen2.5-7B) at a width where arithmetic
is negligible (hidden 64), greedy ``generate`` of ``--new_tokens`` tokens after a ``--prompt``-token
prompt at batch 1 and ``--batch`` (left-padded as ``conftok.evaluate`` pads), for

- the bare model,
- LoRA r=16 on all seven projections (PEFT, eval mode), and
- the same with the four confidence tokens' rows trainable (``trainable_token_indices``, as
  ``conftok.build_model`` wraps a model), and
- that model with the LoRA update merged into copies of the weights for the ``generate``
  (``conftok.merged.merged_lora``, what ``conftok.evaluate`` does by default; the merge itself is
  inside the timed call).

Variants run interleaved, one ``generate`` each per round after a warm-up, every step forced
(``min_new_tokens``). Reported: the median milliseconds per generated token, and each variant's
ratio to the bare model in the same rounds. Needs torch, transformers and peft only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from benchlib import interleave, machine_info, markdown_table, median, write_json  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=200, help="prompt tokens per row")
    parser.add_argument("--new_tokens", type=int, default=17, help="the answer budget (16) and the token's step")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on a CPU (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(BENCH / "results" / "decode_overhead.json"))
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from conftok.lora_targets import trainable_token_indices
    from conftok.merged import merged_lora

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vocab = 1024
    config = Qwen2Config(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)

    def model(lora: bool, tokens: bool):
        torch.manual_seed(args.seed)
        m = Qwen2ForCausalLM(config).to(device, dtype)
        if lora:
            new_ids = list(range(vocab - 4, vocab))  # stand-ins for the four confidence tokens
            m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=PROJECTIONS,
                                             task_type="CAUSAL_LM",
                                             trainable_token_indices=trainable_token_indices(m, new_ids)
                                             if tokens else None))
        return m.eval()

    models = {"bare model": model(False, False), "LoRA r=16 x 7 projections": model(True, False),
              "LoRA + trainable token rows (conftok.build_model)": model(True, True)}
    gen = torch.Generator().manual_seed(args.seed)
    inputs = {}
    for batch in (1, args.batch):
        ids = torch.randint(0, vocab - 4, (batch, args.prompt), generator=gen)
        mask = torch.ones_like(ids)
        for row in range(batch):  # left padding of up to a quarter of the prompt, as sorted batches leave
            pad = int(torch.randint(0, args.prompt // 4 + 1, (1,), generator=gen))
            mask[row, :pad] = 0
        inputs[batch] = (ids.to(device), mask.to(device))

    merged_name = "the same, merged for generation (conftok.merged_lora, evaluate's default)"
    models[merged_name] = models["LoRA + trainable token rows (conftok.build_model)"]

    def run(m, batch, merge=False):
        ids, mask = inputs[batch]

        def step(_k):
            with torch.no_grad(), merged_lora(m, True if merge else False):
                m.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, pad_token_id=0)
        return step

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = {"machine": machine_info(), "device": str(device), "dtype": str(dtype), "config": vars(args),
              "per_token_ms": {}}
    rows = []
    for batch in (1, args.batch):
        times = interleave({name: run(m, batch, merge=name == merged_name) for name, m in models.items()},
                           rounds=args.rounds, warmup=1,
                           sync=sync)
        bare = times["bare model"]
        for name, values in times.items():
            ms = median(values) / args.new_tokens * 1e3
            ratio = median([v / b for v, b in zip(values, bare)])
            result["per_token_ms"][f"{name}, batch {batch}"] = {"ms": ms, "ratio_to_bare": ratio,
                                                                "seconds": values}
            rows.append([name, batch, ms, ratio])
    write_json(args.out, result)
    print(f"{args.layers} layers, hidden {args.hidden}, {device} {dtype}; prompt {args.prompt} tokens, "
          f"{args.new_tokens} new; median of {args.rounds} rounds\n")
    print(markdown_table(["variant", "batch", "ms per generated token", "x bare model"], rows))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
