#!/usr/bin/env bash
# The whole test suite: set up (idempotent), check the layer contracts, run pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow" -x`). DYNAMO_EXT_SOAK=1 adds the soak
# tests (extra fuzzing, e.g. 20,000 transfer plans).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export DYN_TCP_RPC_HOST=127.0.0.1 DYN_EVENT_PLANE_HOST=127.0.0.1 DYN_EVENT_PLANE=nats HF_HUB_OFFLINE=1
export UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo}
echo "[test] import contracts (lint-imports)"
.venv/bin/lint-imports --no-cache
echo "[test] pytest"
set +e
.venv/bin/python -m pytest -p no:cacheprovider -ra --durations=15 "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "[test] no tests collected" >&2; exit 1; fi
exit $rc
