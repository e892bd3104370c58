"""Reference engine benchmark: paged engine vs a dense-KV reference on the same weights and shapes.

    dynamo-ext bench engine                                   # tiny on CPU (committed results)
    dynamo-ext bench engine --device cuda --preset llama3-70b-shape --layers 4

Measures, for the paged engine (``LlmEngine.step``: scheduling, block tables, paged attention,
sampling) and for a dense reference (same ``LlamaModel``, contiguous per-layer K/V [B, Hkv, S, D],
SDPA, greedy argmax):

  prefill  tokens/s of one step that prefills B prompts of --prompt-len tokens (B in --prefill-batches)
  decode   median time of one decode step at batch B (B in --batches) with --prompt-len tokens of context

With ``--compare-transformers`` (a model directory or an imported preset: ``--model smollm2-135m-instruct``)
the same shapes also run through transformers' ``generate`` (``AutoModelForCausalLM`` from the same directory,
same dtype, device and torch threads, greedy, ``min_new_tokens`` = ``max_new_tokens``; a streamer time-stamps
every step: prefill = prompt until the first token, decode step = between consecutive tokens), and the
machine's limits are measured first in the same run: fp32 GEMM GFLOP/s (``torch.mm`` 2048^3) and memory read
bandwidth (a 512 MiB sum), from which the table states the bound for each shape (prefill tokens/s <= GEMM
rate / FLOPs per token; decode step >= max(weights + KV bytes / bandwidth, FLOPs / GEMM rate)).
``--rounds R`` repeats every measurement R times, interleaved (engine, dense, transformers per shape), and
reports medians and same-round ratios; the load average is recorded at the start and at the end.

Writes benchmarks/results/engine-<device>-<preset>.{md,json,png} (machine described: CPU model,
cores, GPU, torch version) and prints the table last. Needs torch, tokenizers, safetensors,
msgspec, matplotlib (transformers for ``--compare-transformers``); nothing of Dynamo.
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

from dynamo_ext.helpfmt import HelpFormatter
from dynamo_ext.bench import results_dir
from dynamo_ext.bench._machine import cpu_model, load_avg_1m
from dynamo_ext.engine.attention import DenseKvCache
from dynamo_ext.engine.core import EngineConfig, LlmEngine
from dynamo_ext.engine.protocol import Request, SamplingParams
from dynamo_ext.engine.weights import load_model


def machine(device: str) -> dict:
    cpu = cpu_model()
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device,
            "load_avg_1m": load_avg_1m()}
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
        m = load_model(args.model_dir or args.preset, device=args.device, seed=0, num_layers=args.layers,
                       dtype=args.dtype)
        self.cfg = m.config
        self.eos = m.tokenizer.eos_token_id
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


class _StepClock:
    """A transformers streamer that time-stamps each ``put``: the prompt (before the prefill), then every step's
    tokens (the batch's, after the step)."""

    def __init__(self, device: str) -> None:
        self.dev, self.t = device, []  # type: ignore[var-annotated]

    def put(self, _value: torch.Tensor) -> None:
        sync(self.dev)
        self.t.append(time.perf_counter())

    def end(self) -> None:
        pass


class HfReference:
    """transformers' ``generate`` on the same model directory, dtype, device and threads as the engine."""

    def __init__(self, path: Path, dtype: torch.dtype, device: str, a: argparse.Namespace, eos: int | None) -> None:
        import transformers

        self.a, self.dev = a, device
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
        self.version = transformers.__version__
        self.attn = str(getattr(self.model.config, "_attn_implementation", "?"))
        self.pad = eos if eos is not None else 0

    @torch.inference_mode()
    def generate(self, ps: list[list[int]], new_tokens: int) -> tuple[list[float], list[list[int]]]:
        ids = torch.tensor(ps, device=self.dev)
        clock = _StepClock(self.dev)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=self.pad, streamer=clock)
        return clock.t, out[:, ids.shape[1]:].tolist()

    def prefill(self, batch: int, vocab: int) -> float:
        times = []
        for rep in range(self.a.reps + 1):
            t, _ = self.generate(prompts(batch, self.a.prompt_len, vocab, rep), 1)
            if rep:
                times.append(t[1] - t[0])
        return batch * self.a.prompt_len / statistics.median(times)

    def decode(self, batch: int, vocab: int) -> tuple[float, list[list[int]]]:
        a = self.a
        t, toks = self.generate(prompts(batch, a.prompt_len, vocab, 1), 1 + a.warmup + a.steps)
        steps = [t2 - t1 for t1, t2 in zip(t[1:], t[2:])]  # t[1]: after the prefill (first token)
        return statistics.median(steps[a.warmup:]), toks


def measure_limits(device: str, dtype: torch.dtype) -> dict:
    """The machine's ceilings for this run's threads: GEMM GFLOP/s (torch.mm, 2048^3, best of 5) and memory read
    bandwidth GB/s (sum of a 512 MiB tensor, best of 5)."""
    n = 2048
    x, y = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(x, y)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        torch.mm(x, y)
        sync(device)
        best = min(best, time.perf_counter() - t)
    gflops = 2 * n**3 / best / 1e9
    del x, y
    big = torch.ones(512 * 2**20 // 4, device=device, dtype=torch.float32)
    big.sum()
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        big.sum()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return {"gemm_gflops": round(gflops, 1), "read_gb_s": round(big.numel() * 4 / best / 1e9, 1),
            "gemm_shape": f"{n}x{n}x{n} {str(dtype).replace('torch.', '')}", "read_bytes": big.numel() * 4}


def model_costs(cfg, dtype: torch.dtype) -> dict:
    """Parameters, FLOPs and bytes of this Llama shape: matmul FLOPs per token = 2 x (every matmul weight,
    the LM head included); attention FLOPs per token = 4 x layers x heads x head_dim x context; a decode step
    reads every weight once (the LM head = the embedding when tied) plus the KV of every sequence."""
    d, hd, layers = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    per_layer = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2 + 3 * d * cfg.intermediate_size + 2 * d
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_word_embeddings else embed
    matmul = layers * (per_layer - 2 * d) + embed  # the LM head's matmul (tied or not) reads vocab x d
    esize = torch.empty((), dtype=dtype).element_size()
    return {"params": layers * per_layer + embed + head + d, "matmul_params": matmul,
            "flops_per_token": 2 * matmul, "attn_flops_per_token_per_ctx": 4 * layers * cfg.num_heads * hd,
            "weight_bytes": (layers * per_layer + embed + head + d) * esize,
            "kv_bytes_per_token": 2 * layers * cfg.num_kv_heads * hd * esize}


def bounds(costs: dict, lim: dict, prompt_len: int, res: dict) -> None:
    """Adds to each row the limit its shape has on this machine (see model_costs / measure_limits)."""
    f, fa = costs["flops_per_token"], costs["attn_flops_per_token_per_ctx"]
    gemm, bw = lim["gemm_gflops"] * 1e9, lim["read_gb_s"] * 1e9
    for r in res["prefill"]:
        r["limit_tok_s"] = gemm / (f + fa * prompt_len / 2)  # causal: the mean context is half the prompt
    for r in res["decode"]:
        b, ctx = r["batch"], prompt_len + 4  # context of the measured steps: prompt + warm-up steps
        mem = (costs["weight_bytes"] + b * ctx * costs["kv_bytes_per_token"]) / bw
        r["limit_ms"] = 1e3 * max(mem, b * (f + fa * ctx) / gemm)
        r["limit_kind"] = "memory" if mem * gemm >= b * (f + fa * ctx) else "compute"


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
    ap = argparse.ArgumentParser(prog="dynamo-ext bench engine", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--preset", default="tiny",
                    help="model shape preset: tiny, llama3-8b-shape, llama3-70b-shape (dynamo_ext.engine presets)")
    ap.add_argument("--model", default=None, help="a model directory instead of a preset")
    ap.add_argument("--layers", type=int, default=None, help="number of layers (default: the preset's)")
    ap.add_argument("--dtype", default=None, help="default: the preset's (tiny float32, llama3-* bfloat16)")
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes, comma-separated")
    ap.add_argument("--prefill-batches", default="1,8", help="prefill batch sizes, comma-separated")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 128 on CPU, 1024 on CUDA")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size")
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps before the timed ones")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (the median is reported)")
    ap.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=str(results_dir()), help="results directory")
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
