"""``dynamo-ext model init --preset NAME DIR [--seed S] [--layers N] [--dtype D]`` and ``model show DIR``.

init writes a complete model directory (config.json, tokenizer.json, tokenizer_config.json,
generation_config.json, model.safetensors) that Dynamo's frontend loads and ``engine.weights.load_model``
reads back bit-identically. show prints a directory's config and weight count (exit 2 if unreadable).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="create or inspect model directories for the reference engine")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION")
    msub.required = True
    i = msub.add_parser("init", help="write a model directory from a preset with random weights")
    i.add_argument("dir", metavar="DIR")
    i.add_argument("--preset", required=True, help="tiny | llama3-8b-shape | llama3-70b-shape")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--layers", type=int, default=None, help="number of layers (default: the preset's)")
    i.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    i.set_defaults(func=run_init)
    s = msub.add_parser("show", help="print a model directory's config")
    s.add_argument("dir", metavar="DIR")
    s.set_defaults(func=run_show)


def run_init(args: argparse.Namespace) -> int:
    from dynamo_ext.engine.config import PRESETS
    from dynamo_ext.engine.weights import init_model_dir

    if args.preset not in PRESETS:
        print(f"dynamo-ext model init: unknown preset {args.preset!r}; allowed: {', '.join(PRESETS)}", file=sys.stderr)
        return 2
    try:
        m = init_model_dir(args.dir, args.preset, seed=args.seed, num_layers=args.layers, dtype=args.dtype)
    except (OSError, ValueError) as e:
        print(f"dynamo-ext model init: {e}", file=sys.stderr)
        return 2
    c = m.config
    print(f"{args.dir}: {args.preset} layers={c.num_layers} hidden={c.hidden_size} vocab={c.vocab_size} "
          f"dtype={c.dtype} params={c.num_params:,} seed={args.seed}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from dynamo_ext.engine.weights import load_model

    try:
        m = load_model(args.dir)
    except (OSError, ValueError, KeyError) as e:
        print(f"dynamo-ext model show: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"config": m.config.to_hf(), "tensors": len(m.weights), "params": m.config.num_params,
                      "tokenizer_vocab": m.tokenizer.vocab_size}, indent=2))
    return 0


run = run_init
