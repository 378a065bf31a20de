#!/usr/bin/env bash
# The one prepared script for a session lent a GPU (the `device` tool's `run`): the CUDA tests,
# then issue 23's GPU figures, most wanted first, each under its own time limit so that a slow
# step cannot use up the device time of the ones after it. Figures go to $OUT (the device
# tool's folder that comes back) or bench/results.
#
#   bash bench/gpu_session.sh            # on the GPU machine: about 9 minutes (estimated)
#   DRY=1 bash bench/gpu_session.sh      # here, on the CPU, with small sizes: checks the plumbing
#
# The device machine's stock Python has torch with CUDA, Lightning, pytest and hypothesis; the
# package is imported from this checkout (zlib-ng, if absent, falls back to zlib's CRC32).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TMP=/dev/shm
[ -d "$TMP" ] && [ -w "$TMP" ] || TMP=$(python -c 'import tempfile; print(tempfile.gettempdir())')

if [ "${DRY:-0}" = 1 ]; then
    DEVICE=cpu; GB=0.02; MB=64; STEP=(--cpu-dry-run --width 256 --batch 64 --steps 12 --every 4)
else
    DEVICE=cuda; GB=2; MB=8192; STEP=(--steps 90 --every 45)
fi

step() {  # step NAME SECONDS COMMAND...: run it, keep its output, say how it ended
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s): $*"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -40
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started))s"
}

python -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
    torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
if [ "$DEVICE" = cuda ]; then
    step cuda_tests 240 python -m pytest -q -p no:cacheprovider -o addopts= \
        tests/staging/test_cuda.py tests/staging/test_lazy_cuda.py tests/engine/test_reserve.py
fi
# 8 GiB of CUDA state: time to durable against the copy floor + the raw write floor.
step durable_cuda 200 python -m bench.durable --device "$DEVICE" --mb "$MB" --rounds 2 --folders "$TMP" \
    --impls torch.save thread process lazy
# The round holding the first saves, with and without reserve(), against a warm round.
step first_save 150 python -m bench.cuda_step --first-save --ckpt-gb "$GB" --tmp "$TMP" --out "$OUT" "${STEP[@]}"
# The step-time table of every implementation.
step cuda_step 200 python -m bench.cuda_step --ckpt-gb "$GB" --tmp "$TMP" --out "$OUT" --rounds 2 "${STEP[@]}"
