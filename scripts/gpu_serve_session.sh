#!/usr/bin/env bash
# ONE remote command that measures the product path on a lent GPU machine: `dynamo-ext bench serve` (Dynamo's
# frontend + our router + prefill and decode worker processes sharing the one GPU, and the aggregated graph for
# comparison), started through scripts/gpu_run.sh (unpacks .gpu_bundle, sets PYTHONPATH/PATH and the loopback,
# offline and multicast-off variables), results under ${OUT:-/tmp/out}.
#
# The GPU session runs, from the repository root, with `.gpu_bundle` (built here by `bash scripts/gpu_bundle.sh`)
# named in the call's carry, on the one-H200 kind, timeout_s 550:
#
#     bash scripts/gpu_serve_session.sh
#
# Stages (each under `timeout`; the whole script keeps to DX_SESSION_BUDGET_S, default 480 s, and prints its
# compact table LAST, since only the stdout tail comes back):
#   check  gpu_run.sh's import report (bundle unpacked into ${TMPDIR:-/tmp}/dx-site, dx-bin) + one python3 -c
#          line: torch.cuda.is_available(), the GPU's name and memory, one bf16 matmul on it
#   c1     bench serve --device cuda --preset llama3-8b-shape --layers 16 --dtype bfloat16 --graphs agg,disagg
#          --prompt-lens 512,4096 --prompt-len-jitter 0 --output-len 32 --concurrency 1 --requests 16 --warmup 2
#          (agg = 1 aggregated worker; disagg = 1 prefill + 1 decode, both on cuda:0; the model directory,
#          1.75 G parameters / 3.5 GB, is generated once under $DYNAMO_EXT_CACHE and loaded by every worker)
#   cN     the same at --concurrency 8 --requests 32 --warmup 8, only when >= 150 s of the budget are left
#   (each bench stage: timeout min(330, left - 10) s, and --deadline-s 60 s shorter: no graph or cell starts
#   after it, what was measured is written; TERM stops the graphs, KILL 30 s later)
#   table  python3 -m dynamo_ext.bench.serve --summary $OUT/serve-*.json
# Files in $OUT (the machine returns at most 8, <= 16 MiB each): serve-1xH200-llama3-8b-shape-8l-c1.{md,json,png},
# serve-1xH200-llama3-8b-shape-8l-c8.{md,json,png} and session-logs.txt (stage timings, the check, each stage's
# bench output, the last lines of every process log of both graphs).
#
# Environment the script sets: UCX_NET_DEVICES=lo; PYTORCH_CUDA_ALLOC_CONF without expandable_segments (its
# memory cannot be exported for cuda_ipc: pulls would fall back to TCP); DYNAMO_EXT_CACHE=${TMPDIR:-/tmp}/dx-cache
# (a re-run while the machine is warm reuses the model); DX_SESSION_MARK (every process it starts inherits it:
# after each stage, processes still carrying it, e.g. a worker left by a killed bench, are stopped by pid).
# UCX_CUDA_IPC_ENABLE_GET_ZCOPY is NOT set here: the product sets it for GPU pairs (topology/select.py).
#
# Proof on the CPU machine (Python 3.11 bundle, the bare interpreter of gpu_run.sh's proof, tiny on CPU, the same
# stages and files; the bundle is unpacked into a fresh temporary directory):
#     bash scripts/gpu_bundle.sh --python 3.11
#     PATH=/tmp/dx-bare/bin:$PATH OUT=/tmp/dx-serve-out bash scripts/gpu_serve_session.sh --cpu     # or DRY_RUN=1
# --cpu: bundle .gpu_bundle-py311, DX_UNPACK_DIR=<temp>, --device cpu --preset tiny --prompt-lens 256,1024,
# concurrency 1 then 4, --requests 8 / 16. Measured there (2 shared cores, 2026-12): check 8 s (bundle unpacked
# in 4 s + import report), c1 17 s (tiny generated 1 s, each graph ready in ~4 s), cN 15 s, whole script 40 s,
# exit 0, 7 files in $OUT (session-logs.txt ~0.4 MB). Expected on the H200 (not run yet): check ~20-40 s,
# model generation ~10-20 s (3.5 GB written; 19 s on this machine), each graph ready in ~15-30 s (3.5 GB loaded
# per worker), c1 ~2-3 min, cN ~2 min: ~5-6 min of the 480 s budget.
#
# Options: --cpu (or DRY_RUN=1), --budget S (or DX_SESSION_BUDGET_S), --bundle DIR; DX_PYTHON (default python3);
# DX_KEEP_WORK=1 keeps the --cpu work folder (unpacked bundle, model cache, process logs) for a look.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MODE=gpu
[ "${DRY_RUN:-0}" = 1 ] && MODE=cpu
BUDGET=${DX_SESSION_BUDGET_S:-480}
BUNDLE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu|--dry-run) MODE=cpu; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift 2 ;;
    --bundle) BUNDLE=${2:?--bundle needs a folder}; shift 2 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_serve_session.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
T0=$(date +%s)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dx-serve-session.XXXXXX")
LOG=$OUT/session-logs.txt
: > "$LOG"
read -r -a PY <<< "${DX_PYTHON:-python3}"
export DX_PYTHON="${PY[*]}"
export DX_SESSION_MARK="dxs-$$-$T0"
export UCX_NET_DEVICES=lo
export PYTHONUNBUFFERED=1
if [ -n "${PYTORCH_CUDA_ALLOC_CONF:-}" ]; then
  conf=$(echo "$PYTORCH_CUDA_ALLOC_CONF" | tr ',' '\n' | grep -v expandable_segments | paste -sd, -)
  if [ -n "$conf" ]; then export PYTORCH_CUDA_ALLOC_CONF=$conf; else unset PYTORCH_CUDA_ALLOC_CONF; fi
fi
if [ "$MODE" = gpu ]; then
  BUNDLE=${BUNDLE:-$ROOT/.gpu_bundle}
  export DYNAMO_EXT_CACHE=${DYNAMO_EXT_CACHE:-${TMPDIR:-/tmp}/dx-cache}
  # 16 layers: a 4,096-token prompt's KV is 256 MiB (the pull target is stated for >= 256 MiB); DX_LAYERS overrides
  BENCH=(--device cuda --preset llama3-8b-shape --layers "${DX_LAYERS:-16}" --dtype bfloat16
         --prompt-lens "${DX_PROMPT_LENS:-512,4096}")
  C1=(--concurrency 1 --requests 16 --warmup 2)
  C2=(--concurrency 8 --requests 32 --warmup 8)
else
  BUNDLE=${BUNDLE:-$ROOT/.gpu_bundle-py311}
  export DX_UNPACK_DIR=${DX_UNPACK_DIR:-$WORK/unpack}   # a fresh unpack: the proof includes it
  export DYNAMO_EXT_CACHE=${DYNAMO_EXT_CACHE:-$WORK/cache}
  BENCH=(--device cpu --preset tiny --prompt-lens 256,1024)
  C1=(--concurrency 1 --requests 8 --warmup 2)
  C2=(--concurrency 4 --requests 16 --warmup 4)
fi
COMMON=(--graphs agg,disagg --agg-workers 1 --prompt-len-jitter 0 --output-len 32 --no-progress --out "$OUT")

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET - $(elapsed) )); }
say() { echo "[session +$(elapsed)s] $*" | tee -a "$LOG"; }
STAGES=()

stop_leftovers() {  # processes this session started that are still alive (they inherit DX_SESSION_MARK)
  local pids=() d p
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = "$$" ] && continue
    grep -qa "DX_SESSION_MARK=$DX_SESSION_MARK" "$d/environ" 2>/dev/null && pids+=("$p")
  done
  local live=()
  for p in "${pids[@]}"; do [ -d "/proc/$p" ] && [ "$p" != "$BASHPID" ] && live+=("$p"); done
  [ ${#live[@]} -eq 0 ] && return 0
  say "stopping ${#live[@]} leftover process(es) of this session: ${live[*]}"
  kill -TERM "${live[@]}" 2>/dev/null
  sleep 3
  for p in "${live[@]}"; do [ -d "/proc/$p" ] && kill -KILL "$p" 2>/dev/null; done
  return 0
}
finish() {
  stop_leftovers
  # on this machine (--cpu) the work folder holds the unpacked bundle (~250 MB): keep it only when asked
  if [ "$MODE" = cpu ] && [ "${DX_KEEP_WORK:-0}" != 1 ]; then rm -rf "$WORK"; fi
}
trap finish EXIT

run_stage() {  # NAME SECONDS COMMAND...: under timeout (SIGTERM, SIGKILL 30 s later), output to $WORK/NAME.log
  local name=$1 secs=$2; shift 2
  local t=$(date +%s) rc
  say "stage $name (timeout ${secs}s): $(echo "$*" | tr -s '\n ' ' ' | cut -c1-400)"
  timeout -k 30 "$secs" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  STAGES+=("$name rc=$rc $(( $(date +%s) - t ))s")
  say "stage $name: exit $rc after $(( $(date +%s) - t )) s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
  stop_leftovers
  return $rc
}

say "mode $MODE, budget ${BUDGET}s, bundle $BUNDLE, out $OUT, work $WORK, python ${PY[*]} ($(command -v "${PY[0]}"))"

# -- check ------------------------------------------------------------------------------------------------------------
CHECK='
import os, time, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize(); t = time.perf_counter(); y = x @ x; torch.cuda.synchronize()
    print("gpu", torch.cuda.device_count(), "x", p.name, round(p.total_memory / 2**30, 1), "GiB, cc",
          f"{p.major}.{p.minor}", "bf16 4096^3 matmul %.2f ms" % ((time.perf_counter() - t) * 1e3))
'
SMI=$(command -v nvidia-smi || true)
if [ -n "$SMI" ]; then
  $SMI --query-gpu=name,memory.used,memory.total,utilization.gpu,driver_version --format=csv 2>&1 | tee -a "$LOG"
  $SMI topo -m >> "$LOG" 2>&1
fi
run_stage check 150 bash scripts/gpu_run.sh --bundle "$BUNDLE" -- "${PY[@]}" -c "$CHECK"
grep -E "^(ok |MISSING|== |torch |gpu |\[gpu_run\] unpacked|python )|Error" "$WORK/check.log" | tail -n 30
if [ "$MODE" = gpu ] && ! grep -q "available True" "$WORK/check.log"; then
  say "no CUDA: torch.cuda.is_available() is not True (see the check above); the GPU stages would fail"
fi

# -- bench stages -------------------------------------------------------------------------------------------------------
bench_stage() {  # NAME MIN_SECONDS ARGS...: only when MIN_SECONDS of the budget are left
  local name=$1 need=$2; shift 2
  local l; l=$(left)
  if [ "$l" -lt "$need" ]; then
    say "stage $name skipped: ${l}s of the budget left, it needs ~${need}s"
    STAGES+=("$name skipped")
    return 0
  fi
  local secs=$(( l - 10 )); [ "$secs" -gt 330 ] && secs=330
  local dl=$(( secs - 60 )); [ "$dl" -lt $(( secs / 2 )) ] && dl=$(( secs / 2 ))
  run_stage "$name" "$secs" bash scripts/gpu_run.sh --bundle "$BUNDLE" -- "${PY[@]}" -m dynamo_ext.cli bench serve \
    "${BENCH[@]}" "${COMMON[@]}" "$@" --deadline-s "$dl" --log-dir "$WORK/logs-$name"
  grep -E "^(bench serve: (model|PYTORCH)|(agg|disagg)(:| [0-9]+ tok)|dynamo-ext bench serve:|MISSING)|Traceback|stopped by" \
    "$WORK/$name.log" | cut -c1-300 | tail -n 24
  if [ -n "$SMI" ]; then $SMI --query-gpu=memory.used,memory.total --format=csv,noheader 2>&1 | sed "s/^/[gpu after $name] /"; fi
  return 0
}
bench_stage c1 150 "${C1[@]}"
bench_stage cN 150 "${C2[@]}"

# -- logs: ONE file ------------------------------------------------------------------------------------------------------
{
  echo "== stages: ${STAGES[*]}"
  for f in "$WORK"/check.log "$WORK"/c1.log "$WORK"/cN.log; do
    [ -f "$f" ] || continue
    echo; echo "===== $(basename "$f") (last 400 lines) ====="
    tail -n 400 "$f"
  done
  for d in "$WORK"/logs-*/logs-*; do
    [ -d "$d" ] || continue
    for f in "$d"/*.log; do
      [ -f "$f" ] || continue
      case "$(basename "$f")" in
        prefill-*|decode-*|agg-*)  # our lines (device, transport backends, each KV transfer), NIXL/UCX, problems
          echo; echo "===== ${d#$WORK/}/$(basename "$f") (first 60 lines from dynamo_ext / NIXL / UCX / errors) ====="
          sed 's/\x1b\[[0-9;]*m//g' "$f" | grep -E "dynamo_ext|NIXL|UCX|ucx|cuda|CUDA|ERROR|Error|Traceback|WARN" \
            | head -n 60 | cut -c1-400 ;;
      esac
      echo; echo "===== ${d#$WORK/}/$(basename "$f") (last 40 lines) ====="
      sed 's/\x1b\[[0-9;]*m//g' "$f" | tail -n 40 | cut -c1-400
    done
  done
} >> "$LOG" 2>&1
ls -la "$OUT" >> "$LOG"

# -- the table, LAST ---------------------------------------------------------------------------------------------------
say "stages: ${STAGES[*]}; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
shopt -s nullglob
results=("$OUT"/serve-*.json)
rc=0
if [ ${#results[@]} -eq 0 ]; then
  echo "NO RESULTS: see $LOG"
  rc=1
else
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "${PY[@]}" -m dynamo_ext.bench.serve --summary "${results[@]}" || rc=1
fi
for s in "${STAGES[@]}"; do case "$s" in *"rc=0 "*|*skipped) ;; *) rc=1 ;; esac; done
echo "[session] done in $(elapsed) s (exit $rc)"
exit $rc
