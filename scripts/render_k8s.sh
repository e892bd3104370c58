#!/usr/bin/env bash
# Re-render the committed Kubernetes manifests deploy/k8s/base/{agg,disagg,disagg-planner} from
# deploy/k8s/configs/*.yaml with `dynamo-ext deploy render` (tests/launch/test_deploy_render.py renders the same
# into a temporary directory and fails when the committed files differ: run this after changing a config or
# the renderer).
#   scripts/render_k8s.sh [OUT_DIR]     (default deploy/k8s/base; PYTHON=.venv/bin/python, IMAGE=dynamo-ext:0.1.0,
#                                       PLANNER_IMAGE=dynamo-ext-planner:0.1.0)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-deploy/k8s/base}"
py="${PYTHON:-.venv/bin/python}"
image="${IMAGE:-dynamo-ext:0.1.0}"
render() { "$py" -m dynamo_ext.cli deploy render "$@" --image "$image" >/dev/null; }
render graphs/agg.py -f deploy/k8s/configs/agg.yaml --name dynamo-ext-agg -o "$out/agg"
render graphs/disagg.py -f deploy/k8s/configs/disagg.yaml --name dynamo-ext-disagg -o "$out/disagg"
render graphs/disagg.py -f deploy/k8s/configs/disagg_planner.yaml --name dynamo-ext-disagg-planner \
  --planner-image "${PLANNER_IMAGE:-dynamo-ext-planner:0.1.0}" -o "$out/disagg-planner"
