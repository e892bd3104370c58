"""Attention backends for ``LlamaModel.forward``: paged (over the pool's block tables) and dense references.

    SeqSlice(q_start, q_len, ctx_len, block_ids)   one sequence of a packed step: its new tokens are rows
                                                   [q_start, q_start+q_len) and sit at positions
                                                   [ctx_len-q_len, ctx_len); KV of positions < ctx_len-q_len
                                                   is already in block_ids
    PagedAttention(pool, seqs)                     per layer: write new K/V into the pool, then attend
      decode rows (q_len == 1), batched:  one gather of the batch's blocks per layer
          K = pool.k[layer].index_select(0, block_table.flatten()) -> [B, max_blocks*block_size, Hkv, D],
          key mask by ctx_len,
          one SDPA with the G = Hq/Hkv query heads of a KV head as G query rows (no K/V repeat)
      prefill rows, per sequence: fresh K/V (causal) when nothing is cached, else the pool's blocks
          with a bottom-right-aligned causal mask (prefix-cache hit: only the suffix is computed)
    DenseCausalAttention()                         reference: one sequence, contiguous K/V, causal SDPA
    PlainCausalAttention()                         reference without SDPA: softmax(QK^T/sqrt d)V in fp64
    DenseKvCache(cfg, batch, max_len, device)      reference KV cache [B, Hkv, S, D] per layer for the
                                                   benchmark: equal-length batch, prefill then decode
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .kv_pool import PagedKvPool


@dataclass(frozen=True)
class SeqSlice:
    q_start: int
    q_len: int
    ctx_len: int
    block_ids: list[int]


class PagedAttention:
    def __init__(self, pool: PagedKvPool, seqs: list[SeqSlice]):
        self.pool = pool
        lay = pool.layout
        bs = lay.block_size
        dev = pool.device
        blk: list[int] = []
        off: list[int] = []
        for s in seqs:
            need = -(-s.ctx_len // bs)
            if len(s.block_ids) < need:
                raise ValueError(f"sequence with {s.ctx_len} tokens needs {need} blocks, got {len(s.block_ids)}")
            p = s.ctx_len - s.q_len
            while p < s.ctx_len:  # one run of slots per block, not one Python step per token
                n = min(bs - p % bs, s.ctx_len - p)
                blk += [s.block_ids[p // bs]] * n
                off += range(p % bs, p % bs + n)
                p += n
        self.slot_blk = torch.tensor(blk, dtype=torch.long, device=dev)
        self.slot_off = torch.tensor(off, dtype=torch.long, device=dev)

        dec = [s for s in seqs if s.q_len == 1]
        self.prefill = [s for s in seqs if s.q_len != 1]
        self.dec_rows: torch.Tensor | None = None
        if dec:
            maxb = max(-(-s.ctx_len // bs) for s in dec)
            table = [s.block_ids[: -(-s.ctx_len // bs)] for s in dec]
            table = [t + [t[-1]] * (maxb - len(t)) for t in table]  # pad with a real block; masked out
            self.dec_rows = torch.tensor([s.q_start for s in dec], dtype=torch.long, device=dev)
            self.dec_flat = torch.tensor(table, dtype=torch.long, device=dev).flatten()
            self.dec_shape = (len(dec), maxb * bs, lay.num_kv_heads, lay.head_dim)
            ctx = torch.tensor([s.ctx_len for s in dec], dtype=torch.long, device=dev)
            self.dec_mask = (torch.arange(maxb * bs, device=dev)[None, :] < ctx[:, None])[:, None, None, :]
            self.dec_all_rows = len(dec) == len(seqs) and [s.q_start for s in dec] == list(range(len(dec)))
        self.pre_blocks = [torch.tensor(s.block_ids[: -(-s.ctx_len // bs)], dtype=torch.long, device=dev)
                           for s in self.prefill]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.pool.k[layer], self.pool.v[layer]
        kc[self.slot_blk, self.slot_off] = k.to(kc.dtype)
        vc[self.slot_blk, self.slot_off] = v.to(vc.dtype)
        hq, d = q.shape[1], q.shape[2]
        hkv = k.shape[1]
        g = hq // hkv
        out = q if self.dec_rows is not None and self.dec_all_rows else torch.empty_like(q)
        if self.dec_rows is not None:
            b = self.dec_rows.shape[0]
            qd = (q if self.dec_all_rows else q[self.dec_rows]).view(b, hkv, g, d)
            # one row gather per layer for K and V: [B*maxb, bs, Hkv, D] -> [B, Hkv, S, D]
            kk = kc.index_select(0, self.dec_flat).view(self.dec_shape).transpose(1, 2).to(q.dtype)
            vv = vc.index_select(0, self.dec_flat).view(self.dec_shape).transpose(1, 2).to(q.dtype)
            o = F.scaled_dot_product_attention(qd, kk, vv, attn_mask=self.dec_mask).reshape(b, hq, d)
            if self.dec_all_rows:
                return o
            out[self.dec_rows] = o
        for s, blocks in zip(self.prefill, self.pre_blocks):
            qs = q[s.q_start : s.q_start + s.q_len].transpose(0, 1)  # [Hq, n, D]
            if s.ctx_len == s.q_len:  # nothing cached: attend over the fresh K/V
                ks = k[s.q_start : s.q_start + s.q_len]
                vs = v[s.q_start : s.q_start + s.q_len]
                mask, causal = None, True
            else:
                ks = kc.index_select(0, blocks).flatten(0, 1)[: s.ctx_len].to(q.dtype)
                vs = vc.index_select(0, blocks).flatten(0, 1)[: s.ctx_len].to(q.dtype)
                qpos = torch.arange(s.ctx_len - s.q_len, s.ctx_len, device=q.device)
                mask = torch.arange(s.ctx_len, device=q.device)[None, :] <= qpos[:, None]
                causal = False
            # 4-D [1, H, n, D]: flash / efficient kernels take no 3-D input (the math fallback upcasts to fp32)
            ks = ks.transpose(0, 1).repeat_interleave(g, dim=0)[None]
            vs = vs.transpose(0, 1).repeat_interleave(g, dim=0)[None]
            o = F.scaled_dot_product_attention(qs[None], ks, vs, attn_mask=mask, is_causal=causal)
            out[s.q_start : s.q_start + s.q_len] = o[0].transpose(0, 1)
        return out


class DenseCausalAttention:
    """One sequence, all tokens at once, contiguous K/V: the reference paged attention must match."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        g = q.shape[1] // k.shape[1]
        kk = k.transpose(0, 1).repeat_interleave(g, dim=0)
        vv = v.transpose(0, 1).repeat_interleave(g, dim=0)
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk[None], vv[None], is_causal=True)[0].transpose(0, 1)


class PlainCausalAttention:
    """softmax(QK^T / sqrt(d)) V with an explicit causal mask, in float64 (no SDPA)."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, hq, d = q.shape
        g = hq // k.shape[1]
        qq = q.double().transpose(0, 1)
        kk = k.double().transpose(0, 1).repeat_interleave(g, dim=0)
        vv = v.double().transpose(0, 1).repeat_interleave(g, dim=0)
        s = qq @ kk.transpose(1, 2) / d**0.5
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return (s.softmax(-1) @ vv).transpose(0, 1).to(q.dtype)


class DenseKvCache:
    """Contiguous per-layer cache [B, Hkv, max_len, D] for B equal-length sequences (benchmark reference).

    Rows of a step are packed sequence-major: B sequences x n new tokens. Call ``advance(n)`` after
    each forward."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: str | torch.device, dtype: torch.dtype):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.batch = batch
        self.len = 0

    def advance(self, n: int) -> None:
        self.len += n

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, hkv, d = self.batch, k.shape[1], k.shape[2]
        hq = q.shape[1]
        n = q.shape[0] // b
        g = hq // hkv
        end = self.len + n
        self.k[layer][:, :, self.len : end] = k.view(b, n, hkv, d).transpose(1, 2)
        self.v[layer][:, :, self.len : end] = v.view(b, n, hkv, d).transpose(1, 2)
        kk, vv = self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        if n == 1:
            return F.scaled_dot_product_attention(q.view(b, hkv, g, d), kk, vv).reshape(b, hq, d)
        assert self.len == 0, "dense reference prefills from position 0 only"
        qq = q.view(b, n, hq, d).transpose(1, 2)
        o = F.scaled_dot_product_attention(qq, kk.repeat_interleave(g, dim=1), vv.repeat_interleave(g, dim=1),
                                           is_causal=True)
        return o.transpose(1, 2).reshape(b * n, hq, d)
