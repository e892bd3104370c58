"""Reference engine benchmark: paged engine vs a dense-KV reference on the same weights and shapes.

    dynamo-ext bench engine                                   # tiny on CPU (committed results)
    dynamo-ext bench engine --device cuda --preset llama3-70b-shape --layers 4

Measures, for the paged engine (``LlmEngine.step``: scheduling, block tables, paged attention,
sampling) and for a dense reference (same ``LlamaModel``, contiguous per-layer K/V [B, Hkv, S, D],
SDPA, greedy argmax):

  prefill  tokens/s of one step that prefills B prompts of --prompt-len tokens (B in --prefill-batches)
  decode   median time of one decode step at batch B (B in --batches) with --decode-len tokens of context
           (default --prompt-len); --no-dense skips the dense reference

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
        ctx = max(args.prompt_len, args.decode_len) + args.warmup + args.steps + 2
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
        rids = self._add(prompts(batch, a.decode_len, self.cfg.vocab_size, 1), a.warmup + a.steps + 2)
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
        ps = prompts(batch, a.decode_len, self.cfg.vocab_size, 1)
        cache = DenseKvCache(self.cfg, batch, a.decode_len + a.warmup + a.steps + 2, self.dev, self.dtype)
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
        t, toks = self.generate(prompts(batch, a.decode_len, vocab, 1), 1 + a.warmup + a.steps)
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


def bounds(costs: dict, lim: dict, p: dict, res: dict) -> None:
    """Adds to each row the limit its shape has on this machine (see model_costs / measure_limits)."""
    f, fa = costs["flops_per_token"], costs["attn_flops_per_token_per_ctx"]
    gemm, bw = lim["gemm_gflops"] * 1e9, lim["read_gb_s"] * 1e9
    for r in res["prefill"]:
        r["limit_tok_s"] = gemm / (f + fa * p["prompt_len"] / 2)  # causal: the mean context is half the prompt
    for r in res["decode"]:
        b, ctx = r["batch"], p["decode_len"] + p["warmup"] + p["steps"] // 2  # the measured steps' median context
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

    hf = "hf_ms" in res["decode"][0]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    d = res["decode"]
    bs = [r["batch"] for r in d]
    ax1.plot(bs, [r["paged_ms"] for r in d], "o-", label="paged engine step")
    if "dense_ms" in d[0]:
        ax1.plot(bs, [r["dense_ms"] for r in d], "s--", label="dense SDPA reference")
    if hf:
        ax1.plot(bs, [r["hf_ms"] for r in d], "^-", label="transformers generate")
    if "limit_ms" in d[0]:
        ax1.plot(bs, [r["limit_ms"] for r in d], "k:", label="machine limit")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log" if hf else "linear")
    ax1.set_xlabel("batch")
    ax1.set_ylabel("decode step (ms)")
    ax1.set_title(f"decode, context {res['params']['decode_len']}")
    ax1.legend(fontsize=8)
    p = res["prefill"]
    x = range(len(p))
    cols = [("paged_tok_s", "paged engine")] + ([("dense_tok_s", "dense reference")] if "dense_tok_s" in p[0] else [])
    cols += [("hf_tok_s", "transformers generate")] if hf else []
    cols += [("limit_tok_s", "machine limit")] if "limit_tok_s" in p[0] else []
    w = 0.8 / len(cols)
    for k, (key, label) in enumerate(cols):
        ax2.bar([i - 0.4 + w * (k + 0.5) for i in x], [r[key] for r in p], w, label=label,
                color="lightgray" if key == "limit_tok_s" else None)
    ax2.set_xticks(list(x), [f"B={r['batch']}" for r in p])
    ax2.set_ylim(0, 1.3 * max(r[key] for r in p for key, _ in cols))  # room for the legend
    ax2.set_ylabel("prefill tokens/s")
    ax2.set_title(f"prefill, {res['params']['prompt_len']} tokens each")
    ax2.legend(fontsize=8)
    m = res["machine"]
    rounds = res["params"].get("rounds", 1)
    fig.suptitle(f"{res['params']['preset']} x{res['params']['layers']} layers {res['params']['dtype']} on "
                 f"{m.get('gpu') or m['cpu']}, {m['torch_threads']} threads"
                 + (f"; medians of {rounds} rounds" if rounds > 1 else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def limits_text(res: dict) -> list[str]:
    c, lim, p = res["costs"], res["limits"], res["params"]
    ctx = p["decode_len"] + p["warmup"] + p["steps"] // 2
    f = c["flops_per_token"]
    fa = c["attn_flops_per_token_per_ctx"]
    return [
        "## Limits (written before the measurements; the machine's ceilings measured in the same run)", "",
        f"- Model: {c['params'] / 1e6:.4g} M parameters ({c['matmul_params'] / 1e6:.4g} M in matmuls per token, the "
        f"LM head included), {p['dtype']}: **{c['weight_bytes'] / 1e6:.4g} MB of weights**, every one read once per "
        f"decode step; KV {c['kv_bytes_per_token']:,} bytes per token.",
        f"- FLOPs per token: 2 x {c['matmul_params'] / 1e6:.4g} M = **{f / 1e6:.4g} MFLOP** of matmuls, plus attention "
        f"{fa:,} x context ({fa * p['prompt_len'] / 2 / 1e6:.3g} MFLOP at the mean context of a {p['prompt_len']}-token "
        f"prefill, {fa * ctx / 1e6:.3g} MFLOP per decode token at context {ctx}).",
        f"- This machine, {res['machine']['torch_threads']} torch threads: GEMM **{lim['gemm_gflops']:.0f} GFLOP/s** "
        f"({lim['gemm_shape']}, best of 5), memory read **{lim['read_gb_s']:.1f} GB/s** (sum over "
        f"{lim['read_bytes'] >> 20} MiB, best of 5).",
        f"- Prefill bound: {lim['gemm_gflops']:.0f} GFLOP/s / {(f + fa * p['prompt_len'] / 2) / 1e6:.4g} MFLOP per token "
        f"= **{res['prefill'][0]['limit_tok_s']:,.0f} tokens/s** (GEMM-bound: a prefill multiplies "
        f"{p['prompt_len']} rows by each weight).",
        f"- Decode bound at batch 1: {c['weight_bytes'] / 1e6:.4g} MB / {lim['read_gb_s']:.1f} GB/s = "
        f"**{c['weight_bytes'] / lim['read_gb_s'] / 1e6:.3g} ms** per step (memory-bound); at batch B the step also "
        f"reads B x {ctx} x {c['kv_bytes_per_token']:,} bytes of KV and does B x {(f + fa * ctx) / 1e6:.4g} MFLOP: "
        "the bound is the larger of the two times (column `limit`).", ""]


def table(res: dict) -> str:
    m, p = res["machine"], res["params"]
    hf = "hf_ms" in res["decode"][0]
    rounds = p.get("rounds", 1)
    impls = ["engine"] + (["dense"] if "dense_ms" in res["decode"][0] else []) + (["transformers"] if hf else [])
    lines = [f"# Engine benchmark: {p['preset']} ({p['layers']} layers, {p['dtype']}) on {p['device']}", "",
             f"Machine: {m.get('gpu', '')} {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}), "
             f"torch {m['torch']}, Python {m['python']}"
             + (f", transformers {m['transformers']} (attention: {m['transformers_attention']})" if hf else "")
             + f"; load average (1 min) at start {m.get('load_avg_1m')}"
             + (f", at the end {m['load_avg_1m_end']}" if m.get("load_avg_1m_end") is not None else "") + ".", "",
             f"Prefill: prompts of {p['prompt_len']} tokens; decode: context {p['decode_len']} tokens (+ the steps); "
             f"block size {p['block_size']}; decode = median of {p['steps']} steps "
             f"after {p['warmup']} warm-up; prefill = median of {p['reps']} runs after one warm-up"
             + (f"; every number is the median of {rounds} rounds (the implementations interleaved in each: "
                f"{', '.join(impls)} per shape), ratios are medians of same-round ratios" if rounds > 1 else "") + ".",
             ""] + ([f"Command: `{res['command']}`", ""] if res.get("command") else [])
    if "limits" in res:
        lines += limits_text(res) + ["## Measured", ""]
    dense = "dense_ms" in res["decode"][0]
    head = "| decode batch | paged step (ms) |" + (" dense step (ms) | paged / dense |" if dense else "")
    sep = "|---:|---:|" + ("---:|---:|" if dense else "")
    if hf:
        head += " transformers step (ms) | transformers / paged |"
        sep += "---:|---:|"
    if "limit_ms" in res["decode"][0]:
        head += " limit (ms) | paged at % of limit |"
        sep += "---:|---:|"
    head += " paged tokens/s |" + (" same 1st token | same 8 tokens |" if dense else "") + (
        " same 8 tokens as transformers |" if hf else "")
    sep += "---:|" + ("---:|---:|" if dense else "") + ("---:|" if hf else "")
    lines += [head, sep]
    for r in res["decode"]:
        row = f"| {r['batch']} | {r['paged_ms']:.3f} |" + (f" {r['dense_ms']:.3f} | {r['ratio']:.2f} |" if dense else "")
        if hf:
            row += f" {r['hf_ms']:.3f} | **{r['hf_over_paged']:.2f}** |"
        if "limit_ms" in r:
            row += f" {r['limit_ms']:.2f} ({r['limit_kind']}) | {100 * r['limit_ms'] / r['paged_ms']:.0f}% |"
        row += (f" {r['batch'] / r['paged_ms'] * 1000:,.0f} |" + (f" {r['agree1']:.0%} | {r['agree']:.0%} |" if dense else "")
                + (f" {r['agree_hf']:.0%} |" if hf else ""))
        lines.append(row)
    head = "| prefill batch | paged tokens/s |" + (" dense tokens/s | paged / dense |" if dense else "")
    sep = "|---:|---:|" + ("---:|---:|" if dense else "")
    if hf:
        head += " transformers tokens/s | paged / transformers |"
        sep += "---:|---:|"
    if "limit_tok_s" in res["prefill"][0]:
        head += " limit tokens/s | paged at % of limit |"
        sep += "---:|---:|"
    lines += ["", head, sep]
    for r in res["prefill"]:
        row = f"| {r['batch']} | {r['paged_tok_s']:,.0f} |" + (
            f" {r['dense_tok_s']:,.0f} | {r['paged_over_dense']:.2f} |" if dense else "")
        if hf:
            row += f" {r['hf_tok_s']:,.0f} | **{r['paged_over_hf']:.2f}** |"
        if "limit_tok_s" in r:
            row += f" {r['limit_tok_s']:,.0f} | {100 * r['paged_tok_s'] / r['limit_tok_s']:.0f}% |"
        lines.append(row)
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


def median_rows(rounds: list[list[dict]], ratios: dict[str, tuple[str, str]]) -> list[dict]:
    """One row per shape: the median over rounds of every number, and of same-round ratios (name: (num, den));
    the per-round values kept under ``rounds``."""
    out = []
    for rows in zip(*rounds):
        r: dict = {"batch": rows[0]["batch"]}
        for k in rows[0]:
            if k != "batch" and isinstance(rows[0][k], (int, float)):
                r[k] = statistics.median(x[k] for x in rows)
        for name, (num, den) in ratios.items():
            if num in rows[0] and den in rows[0]:
                r[name] = statistics.median(x[num] / x[den] for x in rows)
        if len(rows) > 1:
            r["rounds"] = {k: [x[k] for x in rows] for k in rows[0] if k != "batch"}
        out.append(r)
    return out


def resolve_model(a: argparse.Namespace) -> str | None:
    """``--model``: a directory, or an imported preset (``smollm2-135m-instruct``) imported into the model cache
    on first use (as ``dynamo-ext serve``); None without --model. ValueError for anything else."""
    if a.model is None:
        return None
    if Path(a.model).is_dir():
        return a.model
    from dynamo_ext.config import IMPORTED_PRESETS

    if a.model in IMPORTED_PRESETS:
        from dynamo_ext.launch.modeldir import imported_dir

        path, _how = imported_dir(a.model, a.dtype or "float32",
                                  progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        return str(path)
    raise ValueError(f"--model {a.model!r}: neither a model directory nor an imported preset "
                     f"({', '.join(IMPORTED_PRESETS)}); random-weight shapes go to --preset")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dynamo-ext bench engine", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--preset", default="tiny",
                    help="model shape preset: tiny, llama3-8b-shape, llama3-70b-shape (dynamo_ext.engine presets)")
    ap.add_argument("--model", default=None,
                    help="a model directory, or an imported preset (smollm2-135m-instruct), instead of --preset")
    ap.add_argument("--layers", type=int, default=None, help="number of layers (default: the preset's)")
    ap.add_argument("--dtype", default=None, help="default: the preset's (tiny float32, llama3-* bfloat16)")
    ap.add_argument("--batches", default="1,8,32", help="decode batch sizes, comma-separated")
    ap.add_argument("--prefill-batches", default="1,8", help="prefill batch sizes, comma-separated")
    ap.add_argument("--prompt-len", type=int, default=None, help="prefill prompt length; default 128 on CPU, 1024 on CUDA")
    ap.add_argument("--decode-len", type=int, default=None, help="context of the decode steps (default --prompt-len)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense SDPA reference")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size")
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps before the timed ones")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (the median is reported)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every measurement, interleaved; report medians")
    ap.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--compare-transformers", action="store_true",
                    help="also run transformers' generate on the same model directory, dtype and threads, and "
                         "measure the machine's GEMM and memory-bandwidth limits (needs --model)")
    ap.add_argument("--out", default=str(results_dir()), help="results directory")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of one step of each kind, then exit")
    ap.add_argument("--tag", default=None, help="file name stem (default engine-<device>-<preset>)")
    a = ap.parse_args(argv)
    try:
        a.batches = [int(x) for x in a.batches.split(",")]
        a.prefill_batches = [int(x) for x in a.prefill_batches.split(",")]
    except ValueError:
        ap.error("--batches / --prefill-batches: comma-separated integers, e.g. 1,8,32")
    if a.rounds < 1 or a.reps < 1 or a.steps < 1 or a.warmup < 0:
        ap.error("--rounds, --reps and --steps must be >= 1, --warmup >= 0")
    if a.compare_transformers and (a.model is None or a.layers is not None):
        ap.error("--compare-transformers needs --model (a model directory or an imported preset such as "
                 "smollm2-135m-instruct: transformers loads the same files) and no --layers")
    if a.prompt_len is None:
        a.prompt_len = 1024 if a.device.startswith("cuda") else 128
    if a.decode_len is None:
        a.decode_len = a.prompt_len
    if a.prompt_len < 1 or a.decode_len < 1:
        ap.error("--prompt-len and --decode-len must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        a.model_dir = resolve_model(a)
    except ValueError as e:
        ap.error(str(e))
    t0 = time.time()
    info = machine(a.device)  # the load average before anything runs
    b = Bench(a)
    if a.profile:
        return profile(b, max(a.batches), max(a.prefill_batches))
    name = Path(a.model).name if a.model else a.preset
    res: dict = {"machine": info,
                 "params": {"preset": name, "layers": b.cfg.num_layers, "dtype": str(b.dtype).replace("torch.", ""),
                            "device": a.device, "prompt_len": a.prompt_len, "decode_len": a.decode_len,
                            "block_size": a.block_size,
                            "steps": a.steps, "warmup": a.warmup, "reps": a.reps, "rounds": a.rounds,
                            "hidden": b.cfg.hidden_size, "heads": b.cfg.num_heads, "kv_heads": b.cfg.num_kv_heads},
                 "decode": [], "prefill": []}
    hf = None
    if a.compare_transformers:
        res["costs"] = model_costs(b.cfg, b.dtype)
        res["limits"] = measure_limits(a.device, b.dtype)
        print(f"limits: GEMM {res['limits']['gemm_gflops']} GFLOP/s, read {res['limits']['read_gb_s']} GB/s",
              file=sys.stderr, flush=True)
        hf = HfReference(Path(a.model_dir), b.dtype, a.device, a, b.eos)
        info.update(transformers=hf.version, transformers_attention=hf.attn)
    vocab = b.cfg.vocab_size
    dec_rounds: list[list[dict]] = []
    pre_rounds: list[list[dict]] = []
    for rnd in range(a.rounds):
        tag = f"round {rnd + 1}/{a.rounds}: " if a.rounds > 1 else ""
        rows = []
        for bsz in a.batches:
            pm, ptoks = b.paged_decode(bsz)
            row = {"batch": bsz, "paged_ms": pm * 1e3}
            msg = f"{tag}decode B={bsz}: paged {pm * 1e3:.3f} ms"
            if not a.no_dense:
                dm, dtoks = b.dense_decode(bsz)
                row.update(dense_ms=dm * 1e3, agree1=agreement(ptoks, dtoks, 1), agree=agreement(ptoks, dtoks))
                msg += f", dense {dm * 1e3:.3f} ms"
            if hf is not None:
                hm, htoks = hf.decode(bsz, vocab)
                row.update(hf_ms=hm * 1e3, agree_hf=agreement(ptoks, htoks))
                msg += f", transformers {hm * 1e3:.3f} ms"
            rows.append(row)
            print(msg, file=sys.stderr, flush=True)
        dec_rounds.append(rows)
        rows = []
        for bsz in a.prefill_batches:
            row = {"batch": bsz, "paged_tok_s": b.paged_prefill(bsz)}
            msg = f"{tag}prefill B={bsz}: paged {row['paged_tok_s']:,.0f} tok/s"
            if not a.no_dense:
                row["dense_tok_s"] = b.dense_prefill(bsz)
                msg += f", dense {row['dense_tok_s']:,.0f} tok/s"
            if hf is not None:
                row["hf_tok_s"] = hf.prefill(bsz, vocab)
                msg += f", transformers {row['hf_tok_s']:,.0f} tok/s"
            rows.append(row)
            print(msg, file=sys.stderr, flush=True)
        pre_rounds.append(rows)
    res["decode"] = median_rows(dec_rounds, {"ratio": ("paged_ms", "dense_ms"), "hf_over_paged": ("hf_ms", "paged_ms")})
    res["prefill"] = median_rows(pre_rounds, {"paged_over_dense": ("paged_tok_s", "dense_tok_s"),
                                              "paged_over_hf": ("paged_tok_s", "hf_tok_s")})
    if "limits" in res:
        bounds(res["costs"], res["limits"], res["params"], res)
    info["load_avg_1m_end"] = load_avg_1m()
    res["wall_s"] = round(time.time() - t0, 1)
    res["command"] = " ".join(["dynamo-ext bench engine", *(argv if argv is not None else sys.argv[1:])])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.tag or f"engine-{a.device.split(':')[0]}-{name}"
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
