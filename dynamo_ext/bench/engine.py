"""Reference engine benchmark: paged engine vs a dense-KV reference on the same weights and shapes.

    dynamo-ext bench engine                                   # tiny on CPU (committed results)
    dynamo-ext bench engine --device cuda --preset llama3-70b-shape --layers 4

Measures, for the paged engine (``LlmEngine.step``: scheduling, block tables, paged attention,
sampling) and for a dense reference (same ``LlamaModel``, contiguous per-layer K/V [B, Hkv, S, D],
SDPA, greedy argmax):

  prefill  tokens/s of one step that prefills B prompts of --prompt-len tokens (B in --prefill-batches)
  decode   median time of one decode step at batch B (B in --batches) with --prompt-len tokens of context

Writes benchmarks/results/engine-<device>-<preset>.{md,json,png} (machine described: CPU model,
cores, GPU, torch version) and prints the table last. Needs torch, tokenizers, safetensors,
msgspec, matplotlib; nothing of Dynamo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from dynamo_ext.bench import results_dir
from dynamo_ext.bench._machine import cpu_model
from dynamo_ext.engine.attention import DenseKvCache
from dynamo_ext.engine.core import EngineConfig, LlmEngine
from dynamo_ext.engine.protocol import Request, SamplingParams
from dynamo_ext.engine.weights import load_model



def machine(device: str) -> dict:
    cpu = cpu_model()
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device,
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prompts(batch: int, n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 256), (batch, n), generator=g).tolist()


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.dev = args.device
        m = load_model(args.model or args.preset, device=args.device, seed=0, num_layers=args.layers, dtype=args.dtype)
        self.cfg = m.config
        bs = args.block_size
        ctx = args.prompt_len + args.warmup + args.steps + 2
        blocks = max(max(args.batches), max(args.prefill_batches)) * (-(-ctx // bs)) + 8
        self.engine = LlmEngine(m, EngineConfig(block_size=bs, num_blocks=blocks, device=args.device,
                                                max_num_seqs=1024, max_num_batched_tokens=1 << 30))
        m.weights.clear()  # the engine's model holds fused copies
        self.model = self.engine.model
        self.dtype = self.model.dtype
        self._rid = 0

    # -- paged engine --------------------------------------------------------------------------
    def _add(self, ps: list[list[int]], max_tokens: int) -> list[str]:
        rids = []
        for p in ps:
            self._rid += 1
            rid = f"b{self._rid}"
            self.engine.add_request(Request(rid, p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
            rids.append(rid)
        return rids

    def _clear(self, rids: list[str]) -> None:
        for r in rids:
            self.engine.abort(r)
        while self.engine.has_unfinished():
            self.engine.step()

    def paged_prefill(self, batch: int) -> float:
        times = []
        for rep in range(self.a.reps + 1):
            rids = self._add(prompts(batch, self.a.prompt_len, self.cfg.vocab_size, rep), 4)
            sync(self.dev)
            t = time.perf_counter()
            self.engine.step()
            sync(self.dev)
            if rep:
                times.append(time.perf_counter() - t)
            self._clear(rids)
        return batch * self.a.prompt_len / statistics.median(times)

    def paged_decode(self, batch: int) -> tuple[float, list[list[int]]]:
        a = self.a
        rids = self._add(prompts(batch, a.prompt_len, self.cfg.vocab_size, 1), a.warmup + a.steps + 2)
        toks: dict[str, list[int]] = {r: [] for r in rids}

        def step() -> None:
            for o in self.engine.step():
                toks[o.request_id] += o.new_token_ids

        step()  # prefill
        for _ in range(a.warmup):
            step()
        times = []
        for _ in range(a.steps):
            sync(self.dev)
            t = time.perf_counter()
            step()  # returns Python ints: the step has synchronised
            times.append(time.perf_counter() - t)
        self._clear(rids)
        return statistics.median(times), [toks[r] for r in rids]

    # -- dense reference ------------------------------------------------------------------------
    @torch.inference_mode()
    def _dense_prefill(self, ps: list[list[int]], cache: DenseKvCache) -> list[int]:
        b, n = len(ps), len(ps[0])
        ids = torch.tensor(ps, device=self.dev).flatten()
        pos = torch.arange(n, device=self.dev).repeat(b)
        rows = torch.arange(b, device=self.dev) * n + n - 1
        out = self.model.forward(ids, pos, cache, rows).argmax(-1).tolist()
        cache.advance(n)
        return out

    def dense_prefill(self, batch: int) -> float:
        times = []
        for rep in range(self.a.reps + 1):
            ps = prompts(batch, self.a.prompt_len, self.cfg.vocab_size, rep)
            cache = DenseKvCache(self.cfg, batch, self.a.prompt_len, self.dev, self.dtype)
            sync(self.dev)
            t = time.perf_counter()
            self._dense_prefill(ps, cache)
            sync(self.dev)
            if rep:
                times.append(time.perf_counter() - t)
            del cache
        return batch * self.a.prompt_len / statistics.median(times)

    @torch.inference_mode()
    def dense_decode(self, batch: int) -> tuple[float, list[list[int]]]:
        a = self.a
        ps = prompts(batch, a.prompt_len, self.cfg.vocab_size, 1)
        cache = DenseKvCache(self.cfg, batch, a.prompt_len + a.warmup + a.steps + 2, self.dev, self.dtype)
        cur = self._dense_prefill(ps, cache)
        out = [[t] for t in cur]
        times = []
        for i in range(a.warmup + a.steps):
            sync(self.dev)
            t = time.perf_counter()
            ids = torch.tensor(cur, device=self.dev)
            pos = torch.full((batch,), cache.len, device=self.dev)
            cur = self.model.forward(ids, pos, cache).argmax(-1).tolist()
            cache.advance(1)
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
            for o, c in zip(out, cur):
                o.append(c)
        return statistics.median(times), out


def agreement(a: list[list[int]], b: list[list[int]], n: int = 8) -> float:
    """Share of sequences whose first n greedy tokens agree with the dense reference's. fp32: all;
    bf16 with random weights: near-ties flip on rounding differences, and one flip changes the rest."""
    return sum(x[:n] == y[:n] for x, y in zip(a, b)) / max(len(a), 1)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    d = res["decode"]
    bs = [r["batch"] for r in d]
    ax1.plot(bs, [r["paged_ms"] for r in d], "o-", label="paged engine step")
    ax1.plot(bs, [r["dense_ms"] for r in d], "s--", label="dense SDPA reference")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("batch")
    ax1.set_ylabel("decode step (ms)")
    ax1.set_title(f"decode, context {res['params']['prompt_len']}")
    ax1.legend()
    p = res["prefill"]
    x = range(len(p))
    ax2.bar([i - 0.2 for i in x], [r["paged_tok_s"] for r in p], 0.4, label="paged engine")
    ax2.bar([i + 0.2 for i in x], [r["dense_tok_s"] for r in p], 0.4, label="dense reference")
    ax2.set_xticks(list(x), [f"B={r['batch']}" for r in p])
    ax2.set_ylabel("prefill tokens/s")
    ax2.set_title(f"prefill, {res['params']['prompt_len']} tokens each")
    ax2.legend()
    m = res["machine"]
    fig.suptitle(f"{res['params']['preset']} x{res['params']['layers']} layers {res['params']['dtype']} on "
                 f"{m.get('gpu') or m['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(res: dict) -> str:
    m, p = res["machine"], res["params"]
    lines = [f"# Engine benchmark: {p['preset']} ({p['layers']} layers, {p['dtype']}) on {p['device']}", "",
             f"Machine: {m.get('gpu', '')} {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}), "
             f"torch {m['torch']}, Python {m['python']}; load average at start {m.get('load_avg_1m')}.", "",
             f"Context {p['prompt_len']} tokens, block size {p['block_size']}; decode = median of {p['steps']} steps "
             f"after {p['warmup']} warm-up; prefill = median of {p['reps']} runs after one warm-up.", "",
             "| decode batch | paged step (ms) | dense step (ms) | paged / dense | paged tokens/s | same 1st token | same 8 tokens |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["decode"]:
        lines.append(f"| {r['batch']} | {r['paged_ms']:.3f} | {r['dense_ms']:.3f} | {r['ratio']:.2f} | "
                     f"{r['batch'] / r['paged_ms'] * 1000:,.0f} | {r['agree1']:.0%} | {r['agree']:.0%} |")
    lines += ["", "| prefill batch | paged tokens/s | dense tokens/s | paged / dense |", "|---:|---:|---:|---:|"]
    for r in res["prefill"]:
        lines.append(f"| {r['batch']} | {r['paged_tok_s']:,.0f} | {r['dense_tok_s']:,.0f} | "
                     f"{r['paged_tok_s'] / r['dense_tok_s']:.2f} |")
    return "\n".join(lines) + "\n"


def profile(b: Bench, dbatch: int, pbatch: int) -> int:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.dev.startswith("cuda") else [])
    key = "self_cuda_time_total" if b.dev.startswith("cuda") else "self_cpu_time_total"
    a = b.a
    for name, fn in [("paged prefill", lambda: b.paged_prefill(pbatch)), ("dense prefill", lambda: b.dense_prefill(pbatch)),
                     ("paged decode", lambda: b.paged_decode(dbatch)), ("dense decode", lambda: b.dense_decode(dbatch))]:
        fn()  # warm
        with tprof(activities=acts) as prof:
            fn()
        print(f"== {name} (whole measurement: reps={a.reps} / steps={a.steps})")
        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dynamo-ext bench engine", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--model", default=None, help="a model directory instead of a preset")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dtype", default=None, help="default: the preset's (tiny float32, llama3-* bfloat16)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prefill-batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 on CPU, 1024 on CUDA")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=str(results_dir()))
    ap.add_argument("--profile", action="store_true", help="print the top kernels of one step of each kind, then exit")
    ap.add_argument("--tag", default=None, help="file name stem (default engine-<device>-<preset>)")
    a = ap.parse_args(argv)
    a.batches = [int(x) for x in a.batches.split(",")]
    a.prefill_batches = [int(x) for x in a.prefill_batches.split(",")]
    if a.prompt_len is None:
        a.prompt_len = 1024 if a.device.startswith("cuda") else 128
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    b = Bench(a)
    if a.profile:
        return profile(b, max(a.batches), max(a.prefill_batches))
    res: dict = {"machine": machine(a.device),
                 "params": {"preset": a.model or a.preset, "layers": b.cfg.num_layers, "dtype": str(b.dtype).replace("torch.", ""),
                            "device": a.device, "prompt_len": a.prompt_len, "block_size": a.block_size,
                            "steps": a.steps, "warmup": a.warmup, "reps": a.reps,
                            "hidden": b.cfg.hidden_size, "heads": b.cfg.num_heads, "kv_heads": b.cfg.num_kv_heads},
                 "decode": [], "prefill": []}
    for bsz in a.batches:
        pm, ptoks = b.paged_decode(bsz)
        dm, dtoks = b.dense_decode(bsz)
        res["decode"].append({"batch": bsz, "paged_ms": pm * 1e3, "dense_ms": dm * 1e3, "ratio": pm / dm,
                              "agree1": agreement(ptoks, dtoks, 1), "agree": agreement(ptoks, dtoks)})
        print(f"decode B={bsz}: paged {pm * 1e3:.3f} ms, dense {dm * 1e3:.3f} ms", file=sys.stderr, flush=True)
    for bsz in a.prefill_batches:
        pt, dt = b.paged_prefill(bsz), b.dense_prefill(bsz)
        res["prefill"].append({"batch": bsz, "paged_tok_s": pt, "dense_tok_s": dt})
        print(f"prefill B={bsz}: paged {pt:,.0f} tok/s, dense {dt:,.0f} tok/s", file=sys.stderr, flush=True)
    res["wall_s"] = round(time.time() - t0, 1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.tag or f"engine-{a.device.split(':')[0]}-{a.model and Path(a.model).name or a.preset}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = table(res)
    (out / f"{stem}.md").write_text(md)
    try:
        plot(res, out / f"{stem}.png")
    except ImportError as e:  # matplotlib missing: the table still counts
        print(f"no plot: {e}", file=sys.stderr)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
