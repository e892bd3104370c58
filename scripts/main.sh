#!/usr/bin/env bash
# The main job on the embedded default: set up (idempotent), validate the shipped configs, and
# print this machine's topology and the transport chosen for every local worker pair.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export DYN_TCP_RPC_HOST=127.0.0.1 DYN_EVENT_PLANE_HOST=127.0.0.1 UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo}
.venv/bin/dynamo-ext config check configs/*.yaml
.venv/bin/dynamo-ext topology "$@"
