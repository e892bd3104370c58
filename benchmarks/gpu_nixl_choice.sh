#!/usr/bin/env bash
# Issue 17.0 on the lent one-GPU machine (<= 125 s): every NIXL row of `bench transfer` with the UCX
# environment the workers get from select_transport (bench/transfer.py `_Bench.nixl_choice`:
# UCX_CUDA_IPC_ENABLE_GET_ZCOPY=on for GPU pairs), the staged WRITE's phases (where its time goes, for 17.1),
# next to CUDA IPC and the product's pull. Run from the repository root on the GPU machine, through the bundle:
#
#   bash scripts/gpu_run.sh -- bash benchmarks/gpu_nixl_choice.sh OUT_DIR      (carry .gpu_bundle)
#   bash benchmarks/gpu_nixl_choice.sh --dry-run /tmp/x                          (here: host->host, 16 MiB)
#
# Writes OUT_DIR/transfer-gpu-nixl-choice.{json,md,png} (same GPU, 1 GiB) and
# OUT_DIR/transfer-gpu-host-nixl-choice.{json,md,png} (GPU -> another process's host, 128 MiB); prints both
# tables last. Each run is under `timeout`.
set -u
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && { DRY=1; shift; }
OUT=${1:?output folder}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${DX_PYTHON:-python3}
[ "$DRY" = 1 ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
if [ "$DRY" = 1 ]; then
  A=(--size 16MiB --paths 'host->host' --methods planned-nixl,planned-staged,raw-single,copy,product-pull --reps 2)
  B=(--size 16MiB --paths 'host->host' --methods planned-staged,raw-single --reps 1)
else
  A=(--size 1GiB --paths 'GPU0->GPU0' --methods planned,planned-staged,raw-single,copy,cuda-ipc,product-pull --reps 2)
  B=(--size 128MiB --paths 'GPU0->host' --methods planned-staged,raw-single,copy,owner-copy --reps 1)
fi
timeout 85 "$PY" -m dynamo_ext.bench.transfer "${A[@]}" --out "$OUT/transfer-gpu-nixl-choice.json" \
  > "$OUT/a.log" 2>&1; echo "[gpu_nixl_choice] same GPU: exit $?"
timeout 35 "$PY" -m dynamo_ext.bench.transfer "${B[@]}" --out "$OUT/transfer-gpu-host-nixl-choice.json" \
  > "$OUT/b.log" 2>&1; echo "[gpu_nixl_choice] GPU -> host: exit $?"
for f in a b; do grep -v "kv-transfer:" "$OUT/$f.log" | grep -v "^\s*$" | tail -25; done
