"""``dynamo-ext deploy render GRAPH -f CONFIG --image IMAGE [--namespace NS] [--name NAME] [-o DIR]``.

Renders a graph (``graphs/disagg.py`` or ``graphs.disagg``) and its ``dynamo.yaml`` as Kubernetes manifests for
Dynamo's operator: a ``nvidia.com/v1beta1`` ``DynamoGraphDeployment`` whose components run the commands
``dynamo-ext serve`` runs, the config as a ConfigMap, and a PodMonitor (``dynamo_ext/launch/deploy.py``).
Multi-document YAML on stdout, or with ``-o DIR`` one file per document plus a ``kustomization.yaml``. Exit 0
rendered, 2 a config / graph / option that cannot run on Kubernetes (one line per problem, naming the key).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="Kubernetes manifests for Dynamo's operator (DynamoGraphDeployment)")
    dsub = p.add_subparsers(dest="deploy_command", metavar="ACTION")
    dsub.required = True
    r = dsub.add_parser("render", help="render GRAPH + CONFIG as a DynamoGraphDeployment, ConfigMap and PodMonitor")
    r.add_argument("graph", metavar="GRAPH", help="graph file (graphs/disagg.py) or module (graphs.disagg)")
    r.add_argument("-f", "--config", required=True, metavar="CONFIG",
                   help="dynamo.yaml for the cluster (deploy/k8s/configs/: in-cluster etcd and NATS)")
    r.add_argument("--image", required=True, metavar="IMAGE",
                   help="image with dynamo-ext and Dynamo 1.6.1 (deploy/Dockerfile), a pinned tag or digest")
    r.add_argument("--planner-image", default=None, metavar="IMAGE",
                   help="image of the planner pod (deploy/Dockerfile --target planner: Dynamo's planner image with "
                        "dynamo-ext[planner]); default: --image")
    r.add_argument("--namespace", default=None, metavar="NS", help="metadata.namespace of every document (default: none)")
    r.add_argument("--name", default=None, metavar="NAME",
                   help="DynamoGraphDeployment name (default: dynamo-ext-<graph name>)")
    r.add_argument("-o", "--output", default=None, metavar="DIR",
                   help="write one file per document + kustomization.yaml into DIR instead of stdout")
    r.set_defaults(func=run_render)


def run_render(args: argparse.Namespace) -> int:
    from dynamo_ext.launch.commands import CommandsError, load_checked
    from dynamo_ext.launch.deploy import DeployError, render, to_yaml, write_dir

    try:
        graph, config = load_checked(args.graph, args.config)
    except CommandsError as e:
        print(f"dynamo-ext deploy render: {e}", file=sys.stderr)
        return 2
    name = args.name or f"dynamo-ext-{graph.name}"
    source = f"dynamo-ext deploy render {args.graph} -f {args.config}"
    try:
        docs = render(graph, config, Path(args.config).read_text(), image=args.image, name=name,
                      namespace=args.namespace, source=source, planner_image=args.planner_image)
    except DeployError as e:
        print(f"dynamo-ext deploy render: {args.config} cannot run as graph {graph.name!r} on Kubernetes:",
              file=sys.stderr)
        for line in e.lines:
            print(f"  {line}", file=sys.stderr)
        return 2
    header = (f"{source} --image {args.image}"
              + (f" --planner-image {args.planner_image}" if args.planner_image else "")
              + (f" --namespace {args.namespace}" if args.namespace else "")
              + (f" --name {args.name}" if args.name else "") + "\nGenerated: re-render instead of editing.")
    if args.output:
        for path in write_dir(docs, Path(args.output), header):
            print(path, file=sys.stderr)
    else:
        sys.stdout.write(to_yaml(docs, header))
    return 0
