#!/usr/bin/env bash
# The checks for a lent GPU box, in two calls (bench/README.md, "The next device calls"). Run there from the
# repository root, after bench/device_prep.sh filled .device/ here and the call carries it (carry: [".device"]):
#
#     bash bench/device_run.sh 1    # make test-gpu, then eager training (timeout_s 330)
#     bash bench/device_run.sh 2    # compiled training (the defaults against the step before TrainStep), validation
#                                   # (batches by rows and by tokens, static KV cache too), profile (timeout_s 440)
#
# The loan is 15 minutes, the machine's start (a minute or two) included: 330 + 440 s leaves room for the start and
# the gap between the calls, not for a rerun; give the machine back after call 2.
#
# Everything it writes goes under $OUT (the device tool brings it back): nvidia_smi.txt, test_gpu.log,
# gpu.{json,log} (call 1), gpu_compiled.{json,log} (call 2). Each bench/gpu.py run rewrites its JSON after every
# training row and phase, so a run cut by its timeout keeps what it measured.
#
# A dry run here, on the CPU (the tiny shape, every code path of call 2):
#
#     OUT=$(mktemp -d) PY=.venv/bin/python BENCH_ARGS=--smoke bash bench/device_run.sh 2
set -o pipefail

call=${1:?usage: bash bench/device_run.sh 1|2}
[ "$call" = 1 ] || [ "$call" = 2 ] || { echo "error: call must be 1 or 2, got $call" >&2; exit 2; }
OUT=${OUT:?OUT is the folder the device tool brings back}
[ -d .device/whl ] && [ -f .device/commit ] || { echo "error: .device/ is missing: run bench/device_prep.sh here and carry .device" >&2; exit 2; }

PY=${PY:-python3}  # the box's python3 holds its torch
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CONFTOK_COMMIT=$(cat .device/commit)
# shellcheck disable=SC2206  # BENCH_ARGS: extra words on purpose (--smoke for a dry run)
bench=("$PY" bench/gpu.py --tokenizer .device/tokenizer --data .device/data --batching grouped --steps 6 --rounds 3
       ${BENCH_ARGS:-})

case $call in
1)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.txt"
    # -vv (against the Makefile's -q): one line a test as it ends, so a run cut by the timeout still names its failures;
    # --durations: where the time went. Two compile threads a pytest worker: 8 workers each starting inductor's pool
    # of one a core is 128 processes for the few tests that compile (train() tests run eager: tests/conftest.py).
    TORCHINDUCTOR_COMPILE_THREADS=2 timeout 150 make test-gpu PYTHON="$PY" PYTEST_ARGS='-n 8 -vv --durations=15' 2>&1 |
        tee "$OUT/test_gpu.log" | grep -E 'FAILED|ERROR|passed|failed|^[0-9.]+s (call|setup)' | tail -40
    timeout 165 "${bench[@]}" --out "$OUT/gpu.json" --only matmul train 2>&1 | tee "$OUT/gpu.log" | tail -14
    ;;
2)
    timeout 425 "${bench[@]}" --out "$OUT/gpu_compiled.json" --only matmul train validate profile --compile \
        --losses token_only defaults defaults_before --static_cache --val_batch_sizes 64 --val_batching rows tokens \
        --per_row_rows 8 2>&1 | tee "$OUT/gpu_compiled.log" | tail -150
    ;;
esac
