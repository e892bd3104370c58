"""``dynamo-ext generate [--model DIR|PRESET] --prompt P [--prompt P2 ...] [--max-tokens N] [--temperature T]
[--top-p X] [--seed S] [--json]``: run the prompts as one batch on the reference engine.

Text is encoded with the model's tokenizer (BOS prepended when its ``add_bos_token`` says so) and decoded
without special tokens. ``--json`` prints a list of {"prompt", "token_ids", "text", "finish_reason"}. The
default model is ``smollm2-135m-instruct`` (SmolLM2-135M-Instruct, imported into the model cache on first
use, as ``dynamo-ext serve`` does); a random-weight preset name (tiny, llama3-8b-shape, ...) builds its
weights in memory from ``--seed``. Exit 2 on a bad model or argument.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with the reference engine")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="model directory or preset name (default smollm2-135m-instruct: real weights, imported "
                        "into the model cache on first use; tiny, llama3-8b-shape, ...: random weights)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-tokens", type=int, default=32, help="output tokens per prompt at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="weights seed for presets; request i samples with seed+i")
    p.add_argument("--ignore-eos", action="store_true", help="go on past the end-of-sequence token")
    p.add_argument("--layers", type=int, default=None, help="use only the first N layers")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    p.add_argument("--num-blocks", type=int, default=None, help="default: enough for the batch")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dynamo_ext.config import IMPORTED_PRESETS
    from dynamo_ext.engine.core import EngineConfig, LlmEngine
    from dynamo_ext.engine.protocol import Request, SamplingParams
    from dynamo_ext.engine.weights import load_model
    from dynamo_ext.launch.modeldir import ModelDirError, imported_dir

    try:
        params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                 seed=args.seed + i, ignore_eos=args.ignore_eos) for i in range(len(args.prompt))]
        model = args.model
        if model in IMPORTED_PRESETS and not Path(model).is_dir():
            model, _how = imported_dir(model, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        m = load_model(model, device=args.device, seed=args.seed, num_layers=args.layers)
    except (OSError, ValueError, KeyError, ModelDirError) as e:
        print(f"dynamo-ext generate: {e}", file=sys.stderr)
        return 2
    tok = m.tokenizer
    prompts = [tok.encode(p) for p in args.prompt]
    bs = args.block_size
    need = sum(-(-(len(p) + args.max_tokens) // bs) for p in prompts)
    eng = LlmEngine(m, EngineConfig(block_size=bs, num_blocks=args.num_blocks or max(need, 1), device=args.device,
                                    max_num_seqs=max(len(prompts), 1)))
    out: dict[str, dict] = {}
    for i, (text, ids) in enumerate(zip(args.prompt, prompts)):
        try:
            eng.add_request(Request(str(i), ids, params[i]))
        except ValueError as e:
            print(f"dynamo-ext generate: {e}", file=sys.stderr)
            return 2
        out[str(i)] = {"prompt": text, "token_ids": [], "text": "", "finish_reason": None}
    while eng.has_unfinished():
        for o in eng.step():
            r = out[o.request_id]
            r["token_ids"] += o.new_token_ids
            if o.finished:
                r["finish_reason"] = o.finish_reason
    results = list(out.values())
    for r in results:
        r["text"] = tok.decode(r["token_ids"])
    if args.json:
        print(json.dumps(results, ensure_ascii=False))
    else:
        for r in results:
            print(f"--- {r['prompt']!r} ({len(r['token_ids'])} tokens, {r['finish_reason']})")
            print(r["text"])
    return 0
