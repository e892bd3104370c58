#!/usr/bin/env bash
# Run a command on the lent GPU machine with the bundle from scripts/gpu_bundle.sh (carried as `.gpu_bundle`):
#
#   bash scripts/gpu_run.sh [--bundle DIR] [--] COMMAND...       (from the repository root, on the GPU machine)
#   e.g. bash scripts/gpu_run.sh -- python3 -m dynamo_ext.cli serve graphs/disagg.py -f configs/disagg.yaml \
#          --once "Hello" --max-tokens 8
#
# 1. Unpacks the archives listed in DIR/manifest.txt (default .gpu_bundle, or $DX_BUNDLE) after checking their
#    size and sha256: DEST site -> ${TMPDIR:-/tmp}/dx-site, DEST bin -> ${TMPDIR:-/tmp}/dx-bin ($DX_UNPACK_DIR
#    instead of the temporary directory if set). Skipped when those folders hold the same manifest already.
# 2. Exports PYTHONPATH=<site>:<repository root>, PATH=<bin>:$PATH, the loopback and offline variables
#    (DYN_TCP_RPC_HOST, DYN_EVENT_PLANE_HOST, DYN_TCP_RESPONSE_STREAM_HOST = 127.0.0.1, DYN_EVENT_PLANE=nats,
#    UCX_NET_DEVICES=lo, HF_HUB_OFFLINE=1) and NVLink multicast off (NCCL_NVLS_ENABLE=0, NCCL_CUMEM_ENABLE=0);
#    a variable already set in the environment is kept.
# 3. Prints one block: which modules import (dynamo.runtime, dynamo.llm, dynamo.frontend, nixl._api and its
#    plugins, pydantic, msgspec, nats, etcd3aio, torch + torch.cuda.is_available(), triton, dynamo_ext) with
#    the python from $DX_PYTHON (default python3), and which of etcd / nats-server are on PATH. Every missing
#    piece is a line `MISSING: ...` (absent or damaged bundle, wrong Python, module that fails to import,
#    binary not found, no CUDA on a machine with an NVIDIA driver); nothing is silently ignored.
# 4. Runs COMMAND (exec: its exit status is this script's). Without a command: exit 0 when nothing is missing,
#    1 otherwise.
#
# Proved (2026-12-04), both times `exit status 0`, etcd / nats-server from dx-bin, the modules from dx-site:
#   here, CPU, Python 3.11 (bash scripts/gpu_bundle.sh --python 3.11; a bare venv /tmp/dx-bare holding only what
#   the GPU machine has, torch 2.13 CPU; `PATH=/tmp/dx-bare/bin:$PATH bash scripts/gpu_run.sh --bundle
#   .gpu_bundle-py311 -- python -m dynamo_ext.cli serve ...`): report "1 missing" (triton; no CUDA here);
#   lent H200, Python 3.12.3, one call carrying .gpu_bundle (55.0 MiB with the tree): report "0 missing"
#   (torch 2.11.0+cu130, cuda available, triton 3.6.0), unpacked in 4.5 s, graph ready in 6.3 s.
#   --once "Hello" (5 tokens) is answered by a decode worker alone (below router.disagg_min_prompt_tokens);
#   the 89-token prompt of scripts/main.sh is disaggregated: 49,152 KV bytes pulled host->host by cma, and by
#   NIXL (UCX) from the trimmed bundle when cma is made unavailable (proof-only sitecustomize that sets
#   dynamo_ext.transport.fallbacks.cma._available = False): "KV moved between workers: decode-1 49,152 bytes
#   (nixl read host->host)". Details: README.md, "Running on the lent GPU machine".
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUNDLE=${DX_BUNDLE:-$ROOT/.gpu_bundle}
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) BUNDLE=${2:?--bundle needs a folder}; shift 2 ;;
    --bundle=*) BUNDLE=${1#*=}; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
case "$BUNDLE" in /*) ;; *) BUNDLE=$PWD/$BUNDLE ;; esac
BASE=${DX_UNPACK_DIR:-${TMPDIR:-/tmp}}
SITE=$BASE/dx-site
BIN=$BASE/dx-bin
read -r -a PY <<< "${DX_PYTHON:-python3}"
MANIFEST=$BUNDLE/manifest.txt
missing=0
say() { echo "[gpu_run] $*"; }
miss() { echo "MISSING: $*"; missing=$((missing + 1)); }

# -- 1. unpack ---------------------------------------------------------------------------------------------------------
want_py=""
if [ ! -d "$BUNDLE" ]; then
  miss "bundle folder $BUNDLE (build it with scripts/gpu_bundle.sh and name it in the call's carry)"
elif [ ! -f "$MANIFEST" ]; then
  miss "$MANIFEST (build the bundle with scripts/gpu_bundle.sh)"
else
  want_py=$(awk '$1 == "python" {print $2}' "$MANIFEST")
  n_arch=$(awk '$1 == "archive"' "$MANIFEST" | wc -l)
  [ "$n_arch" -gt 0 ] || miss "archive lines in $MANIFEST"
  for f in "$BUNDLE"/*.tar.xz; do
    [ -e "$f" ] || continue
    awk -v n="$(basename "$f")" '$1 == "archive" && $2 == n {found = 1} END {exit !found}' "$MANIFEST" \
      || say "note: $(basename "$f") is not listed in the manifest, not unpacked"
  done
  if [ -d "$BIN" ] && cmp -s "$MANIFEST" "$SITE/.dx-manifest"; then
    say "bundle $BUNDLE already unpacked in $SITE, $BIN (same manifest)"
  else
    t0=$(date +%s.%N)
    rm -rf "$SITE" "$BIN"
    mkdir -p "$SITE" "$BIN"
    bad=0
    while read -r kind name dest bytes sum _; do
      [ "$kind" = archive ] || continue
      f=$BUNDLE/$name
      if [ ! -f "$f" ]; then miss "archive $name (listed in the manifest, not in $BUNDLE)"; bad=1; continue; fi
      size=$(stat -c %s "$f")
      if [ "$size" != "$bytes" ]; then
        miss "archive $name intact: $size bytes, the manifest says $bytes (truncated or stale)"; bad=1; continue
      fi
      if [ "$(sha256sum "$f" | cut -d' ' -f1)" != "$sum" ]; then
        miss "archive $name intact: sha256 differs from the manifest"; bad=1; continue
      fi
      case "$dest" in
        site) d=$SITE ;;
        bin) d=$BIN ;;
        *) miss "archive $name: unknown destination '$dest' in the manifest"; bad=1; continue ;;
      esac
      tar -xJf "$f" -C "$d" || { miss "archive $name unpacked (tar failed)"; bad=1; }
    done < "$MANIFEST"
    if [ "$bad" = 0 ]; then
      cp "$MANIFEST" "$SITE/.dx-manifest"
      say "unpacked $n_arch archives from $BUNDLE into $SITE, $BIN in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s"
    fi
  fi
fi

# -- 2. environment ------------------------------------------------------------------------------------------------------
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$BIN:$PATH"
export DYN_TCP_RPC_HOST=${DYN_TCP_RPC_HOST:-127.0.0.1}
export DYN_EVENT_PLANE_HOST=${DYN_EVENT_PLANE_HOST:-127.0.0.1}
export DYN_TCP_RESPONSE_STREAM_HOST=${DYN_TCP_RESPONSE_STREAM_HOST:-127.0.0.1}
export DYN_EVENT_PLANE=${DYN_EVENT_PLANE:-nats}
export UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export NCCL_CUMEM_ENABLE=${NCCL_CUMEM_ENABLE:-0}
export PYTHONUNBUFFERED=1

# -- 3. report -----------------------------------------------------------------------------------------------------------
echo "== dynamo_ext on this machine: what imports, what is on PATH =="
if ! have_py=$("${PY[@]}" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
  miss "python (${PY[*]} does not run; set DX_PYTHON)"
else
  echo "python   ${have_py} ($(command -v "${PY[0]}" || echo "${PY[0]}"))"
  if [ -n "$want_py" ] && [ "$want_py" != "$have_py" ]; then
    miss "Python $want_py, the one the bundle's compiled modules are built for (${PY[*]} is $have_py;" \
      "build with scripts/gpu_bundle.sh --python $have_py)"
  fi
  gpu_expected=0
  if command -v nvidia-smi >/dev/null 2>&1 || [ -e /dev/nvidiactl ]; then gpu_expected=1; fi
  report=$("${PY[@]}" - "$gpu_expected" 2>&1 <<'PY'
import importlib, importlib.metadata as md, os, sys, traceback
gpu_expected = sys.argv[1] == "1"
DIST = {"dynamo.runtime": "ai-dynamo-runtime", "dynamo.llm": "ai-dynamo-runtime", "dynamo.frontend": "ai-dynamo",
        "nixl._api": "nixl", "nats": "nats-py", "etcd3aio": "etcd3aio"}
def version(name, mod):
    v = getattr(mod, "__version__", None) or getattr(sys.modules.get(name.split(".")[0]), "__version__", None)
    if v is None:
        try:
            v = md.version(DIST.get(name, name.split(".")[0]))
        except Exception:
            v = "?"
    return str(v)
def where(mod):
    f = getattr(mod, "__file__", None) or ""
    return os.path.dirname(f)
for name in ("dynamo.runtime", "dynamo.llm", "dynamo.frontend", "nixl._api", "pydantic", "msgspec", "nats",
             "etcd3aio", "torch", "triton", "dynamo_ext", "dynamo_ext.cli"):
    try:
        mod = importlib.import_module(name)
    except BaseException as e:  # a broken extension may raise anything
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"MISSING: module {name}: {type(e).__name__}: {msg}", flush=True)
        continue
    extra = ""
    if name == "torch":
        try:
            avail = mod.cuda.is_available()
            n = mod.cuda.device_count() if avail else 0
            extra = f" cuda {mod.version.cuda} torch.cuda.is_available()={avail}"
            if avail:
                extra += f" {n} x {mod.cuda.get_device_name(0)}"
            elif gpu_expected:
                print("MISSING: CUDA (an NVIDIA driver is here but torch.cuda.is_available() is False)", flush=True)
        except BaseException as e:
            print(f"MISSING: torch.cuda: {type(e).__name__}: {e}", flush=True)
    if name == "nixl._api":
        try:
            agent = mod.nixl_agent("gpu-run-probe", mod.nixl_agent_config(backends=[]))
            plugins = sorted(agent.get_plugin_list())
            extra = f" plugins {','.join(plugins)}"
            for p in ("UCX", "POSIX"):
                if p not in plugins:
                    print(f"MISSING: NIXL plugin {p}", flush=True)
        except BaseException as e:
            print(f"MISSING: NIXL agent: {type(e).__name__}: {e}", flush=True)
    print(f"ok       {name:<16} {version(name, mod):<14} {where(mod)}{extra}", flush=True)
PY
  )
  rc=$?
  echo "$report" | grep -v "^ok \|^MISSING: " | sed 's/^/         | /'
  echo "$report" | grep "^ok \|^MISSING: "
  missing=$((missing + $(echo "$report" | grep -c "^MISSING: ")))
  [ "$rc" = 0 ] || miss "a complete import report (the python process ended with status $rc)"
fi
for b in etcd nats-server; do
  if p=$(command -v "$b"); then
    v=$("$p" --version 2>&1 | head -1)
    echo "ok       $(printf '%-16s' "$b") $(printf '%-14s' "${v##* }") $p"
  else
    miss "binary $b (not on PATH; it comes from the bundle's servers.tar.xz)"
  fi
done
echo "== $missing missing =="

# -- 4. the command --------------------------------------------------------------------------------------------------
if [ $# -eq 0 ]; then
  [ "$missing" = 0 ]; exit $?
fi
say "running: $*"
exec "$@"
