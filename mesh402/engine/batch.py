"""Batched decode: one forward for the decode rows of many sessions, each row bit-identical to 1-row decode.

Continuous batching reads every weight once for all active sessions instead of once per session. It must
change no answer: a row's logits (and so its tokens, its activations and a verification replay of its
step) are the ones a 1-row ``Session.decode`` gives, whatever else shares the step. What that takes:

- matmuls: torch's fp32 GEMM (MKL/oneDNN) picks a different blocking for M=1 than for M>1, so a row's
  sums change with the batch size (measured: every exact-mode linear differs at M=2..16). Exact mode
  therefore dequantizes each weight block once for the whole batch and multiplies it row by row
  (M=1 each, the very call 1-row decode makes): the dequantization, which dominates exact decode, is
  shared. Fast mode's packed kernels (int4 group-32, int8, q8 blocks) compute each output row on its
  own on the CPUs we measured; :func:`rows_independent` probes that at load for every width up to the
  batch cap and, if any kernel disagrees, the stage falls back to row-by-row calls too.
- attention runs per row against the row's own session KV, with the same ops and shapes as 1-row decode;
- norms (a reduction over each row's own hidden vector), RoPE, the embedding lookup and the elementwise
  ops act on each row alone, so they run on all rows at once (checked by the tests, bit for bit).

MoE stages are not batched here (the engine decodes their rows one by one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .kv import KVCache
from .model import (  # the same dequantization blocks, so the same M=1 matmuls
    _WS_ELEMS,
    Linear,
    Stage,
    _rms_norm,
)
from .quant import QWeight, Workspace

__all__ = ["batchable", "forward_rows", "rows_independent"]




def batchable(stage: Stage) -> bool:
    """Whether :func:`forward_rows` covers this stage (dense FFNs; MoE layers decode row by row)."""
    return not stage.moe_layers


def rows_independent(stage: Stage, widths: int) -> bool:
    """Whether the stage's packed fast kernels give each row the same bits at every batch width in
    [1, widths] and in every slot (probed on random rows; exact mode's fp32 GEMM does not, so it is
    never asked)."""
    if stage.mode != "fast":
        return False
    gen = torch.Generator().manual_seed(0)
    kernels = [lin.fast[0] for L in stage.blocks[:1] for lin in (L.qkv, L.wo, L.gate_up, L.down)
               if lin is not None and lin.fast is not None]
    if stage.head_fast is not None:
        kernels.append(stage.head_fast)
    if not kernels:
        return False
    for k in kernels:
        cols = k.shape[1]
        x = torch.randn(widths, cols, generator=gen).to(k.dtype)
        one = k(x[:1])
        for m in range(2, widths + 1):
            y = k(x[:m])
            if not torch.equal(y[:1], one):
                return False
        full = k(x)
        for s in range(widths):
            if not torch.equal(k(x[s:s + 1]), full[s:s + 1]):
                return False
    return True


def _linear_rows(lin: Linear, x: torch.Tensor, ws: Workspace | None, batched: bool) -> torch.Tensor:
    """``lin(x)`` with each row computed as ``lin(x[i:i+1])`` computes it."""
    if lin.fast is not None:
        if batched:
            return lin(x, ws)
        return torch.cat([lin(x[i:i + 1], ws) for i in range(x.shape[0])])
    y = _blocked_rows(x, lin.exact, ws)
    if lin.bias is not None:
        y = y + lin.bias
    return y


def _blocked_rows(x: torch.Tensor, weights: list[QWeight], ws: Workspace | None) -> torch.Tensor:
    """model._blocked_linear with the dequantized block shared by all rows and multiplied one row at a
    time: the same M=1 matmul (same operands, same output strides) 1-row decode runs."""
    B = x.shape[0]
    n_out = sum(w.shape[0] for w in weights)
    out = torch.empty((B, n_out), dtype=torch.float32, device=x.device)
    c0 = 0
    for w in weights:
        rows, cols = w.shape
        if w.gtype == 0:
            wt = w.parts["w"].t()
            for i in range(B):
                torch.matmul(x[i:i + 1], wt, out=out[i:i + 1, c0:c0 + rows])
            c0 += rows
            continue
        step = max(1, _WS_ELEMS // cols)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            d = w.dequant(slice(r0, r1), ws=ws).t()
            for i in range(B):
                torch.matmul(x[i:i + 1], d, out=out[i:i + 1, c0 + r0:c0 + r1])
        c0 += rows
    return out


def _rope_rows(stage: Stage, pos: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    cs = [stage._rope(p, 1) for p in pos]
    return torch.cat([c for c, _ in cs]), torch.cat([s for _, s in cs])


@torch.inference_mode()
def forward_rows(stage: Stage, kvs: Sequence[KVCache], pos: Sequence[int], x: torch.Tensor, *,
                 batched: bool, logits: bool = True) -> torch.Tensor:
    """Row ``i`` of ``x`` (a token id on the first stage, an fp32 hidden row otherwise) is position ``pos[i]``
    of the session whose KV is ``kvs[i]``; a session's rows may repeat, at consecutive positions (each row
    attends to the ones before it, as successive 1-row decodes would). Returns hidden rows ``[B, hidden]``, or on the last
    stage fp32 logits ``[B, vocab]`` (``logits=False``: the final-normed hidden rows). ``batched``: the fast
    kernels may take all rows at once (see :func:`rows_independent`)."""
    B = x.shape[0]
    if not (len(kvs) == len(pos) == B):
        raise ValueError("one KV cache and one position per row")
    nxt: dict[int, int] = {}  # a session's rows follow each other (speculative verification): p, p+1, ...
    for kv, p in zip(kvs, pos):
        if id(kv) in nxt and p != nxt[id(kv)]:
            raise ValueError(f"rows of one session must take consecutive positions ({p} after {nxt[id(kv)] - 1})")
        if p < 0 or p > nxt.get(id(kv), kv.length):
            raise ValueError(f"position {p} beyond KV length {kv.length}")
        nxt[id(kv)] = p + 1
        kv.ensure(p + 1)
    with stage._lock:
        if stage.first:
            h = stage._embed(x.to(device=stage.device, dtype=torch.long))
        else:
            h = x.to(device=stage.device, dtype=torch.float32)
        stage._n_real = 1
        h = (_fast_rows if stage._all_fast else _exact_rows)(stage, kvs, pos, h, batched)
        for kv, p in zip(kvs, pos):
            kv.length = p + 1
        if not stage.last:
            return h
        normed = _rms_norm(h, stage.norm, stage.eps)
        if not logits:
            return normed
        if stage.head_fast is not None:
            if batched:
                return stage._head(normed)
            return torch.cat([stage._head(normed[i:i + 1]) for i in range(B)])
        return _blocked_rows(normed, [stage.head_exact], stage.ws)


def _exact_rows(stage: Stage, kvs: Sequence[KVCache], pos: Sequence[int], h: torch.Tensor,
                batched: bool) -> torch.Tensor:
    """Model._layers for B one-row steps at once (its T=1 case, op for op)."""
    nh, nkv, hd, g = stage.n_heads, stage.n_kv_heads, stage.head_dim, stage.group
    qd, kd = nh * hd, nkv * hd
    eps = stage.eps
    B = h.shape[0]
    cos, sin = _rope_rows(stage, pos)
    cos_q, sin_q = cos[:, None, :], sin[:, None, :]
    masks = [stage._mask(p, 1) for p in pos]
    half = hd // 2
    ws = stage.ws
    for li, lw in enumerate(stage.blocks):
        x = _rms_norm(h, lw.attn_norm, eps)
        qkv = _linear_rows(lw.qkv, x, ws, batched)
        q = qkv[:, :qd].reshape(B, nh, hd)
        k = qkv[:, qd:qd + kd].reshape(B, nkv, hd)
        v = qkv[:, qd + kd:].reshape(B, nkv, hd)
        if lw.q_norm is not None and stage.config.qk_norm_full:
            q = _rms_norm(qkv[:, :qd], lw.q_norm, eps).view(B, nh, hd)
            k = _rms_norm(qkv[:, qd:qd + kd], lw.k_norm, eps).view(B, nkv, hd)
        elif lw.q_norm is not None:
            q = _rms_norm(q, lw.q_norm, eps)
            k = _rms_norm(k, lw.k_norm, eps)
        q = q * cos_q + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin_q
        k = k * cos_q + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin_q
        outs = []
        for i, (kv, p) in enumerate(zip(kvs, pos)):
            L = p + 1
            kc, vc = kv.k[li], kv.v[li]
            kc[:, p:L].copy_(k[i:i + 1].transpose(0, 1))
            vc[:, p:L].copy_(v[i:i + 1].transpose(0, 1))
            K, Vv = kc[:, :L], vc[:, :L]
            qg = q[i:i + 1].view(1, nkv, g, hd).permute(1, 2, 0, 3).reshape(nkv, g, hd)
            s = torch.bmm(qg, K.transpose(1, 2)) * stage.scale
            if masks[i] is not None:
                s = (s.view(nkv, g, 1, L) + masks[i]).view(nkv, g, L)
            pr = torch.softmax(s, dim=-1)
            outs.append(torch.bmm(pr, Vv).view(nkv, g, 1, hd).permute(2, 0, 1, 3).reshape(1, qd))
        h = h + _linear_rows(lw.wo, torch.cat(outs), ws, batched)
        x = _rms_norm(h, lw.ffn_norm, eps)
        gu = _linear_rows(lw.gate_up, x, ws, batched)
        ff = gu.shape[-1] // 2
        h = h + _linear_rows(lw.down, F.silu(gu[:, :ff]) * gu[:, ff:], ws, batched)
    return h


def _fast_rows(stage: Stage, kvs: Sequence[KVCache], pos: Sequence[int], h: torch.Tensor,
               batched: bool) -> torch.Tensor:
    """Model._layers_fast for B one-row steps at once (its T=1 case, op for op), in the stage's
    TorchScript loop: per row, the 1-row decode's KV write and attention on the same values and shapes
    (Python per row per layer was a fifth of a wide step on 2 cores)."""
    cos, sin = _rope_rows(stage, pos)
    cos, sin = cos[:, None, :], sin[:, None, :]
    masks = [stage._mask(p, 1) for p in pos]
    masks = [m[None] if m is not None else None for m in masks]
    ks, vs = [kv.k for kv in kvs], [kv.v for kv in kvs]
    return stage.fast_loop().rows_all(h, ks, vs, list(pos), cos, sin, masks, batched)
