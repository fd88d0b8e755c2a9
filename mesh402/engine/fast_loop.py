"""Fast mode's layer loop as TorchScript: the ops eager Python ran, in the same order, with less Python.

A decode step of the bundled model is ~750 small aten calls (30 layers x ~25); in eager Python each
costs ~2.7 µs of interpreter and dispatch on top of its kernel, ~2 ms of a ~5.7 ms step. TorchScript's
interpreter runs the same calls from C++ (the layer loop measured 4.5 -> 3.7 ms per token). The graph
executor's optimizations (profiling, fusion) are turned off, so every op is the aten kernel eager mode
calls, with the same operands: the bits do not change (tests/engine/test_fast_loop.py compares this
loop scripted and run as plain Python, bit for bit), and neither does the device signature.

TorchScript is deprecated in torch 2.13 (pinned here) in favour of torch.compile / torch.export, whose
fused kernels would change the bits; where it is missing the same module runs as plain Python, slower.
One module per stage, built lazily from its blocks (:meth:`FastLoop.of`); a stage whose packed weights
change after load (the test harness's cheats) drops it with ``Stage.repacked()``.
"""

import logging
import warnings
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F

from . import qkernels
from .quant import FAST_ACT_DTYPE, fast_mm

if TYPE_CHECKING:
    from .model import Stage

__all__ = ["FastLoop", "script"]

log = logging.getLogger(__name__)

_NO_WEIGHT = -1  # the FFN slots of an MoE layer (its experts run in Python)


def script(obj: Any) -> Any:
    """``torch.jit.script(obj)``, or ``obj`` itself (run as Python) where TorchScript is unavailable."""
    # No profiling executor, no fusion: each op stays the aten kernel eager mode runs (the same bits).
    # Process-wide, and this engine is the process's only TorchScript user.
    torch._C._set_graph_executor_optimize(False)
    qkernels.ensure_ops()  # fast_mm names torch.ops.mesh402.*: they must exist before it is compiled
    try:
        with warnings.catch_warnings():
            # torch 2.13 marks TorchScript deprecated (for torch.compile / torch.export, which fuse ops and
            # so change bits); the pinned torch has it, and without it the same code runs as Python.
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(obj)
    except Exception as e:  # noqa: BLE001 - a torch without TorchScript: same ops, more Python
        log.warning("fast layer loop runs as plain Python (TorchScript unavailable: %s)", e)
        return obj


class FastLoop(torch.nn.Module):
    """The packed weights of a stage's layers, as flat lists (slot 4*layer + j: qkv, wo, gate_up, down)."""

    kinds: list[int]
    w: list[torch.Tensor]
    scales: list[Optional[torch.Tensor]]  # noqa: UP045 - TorchScript reads Optional, not X | None
    rows: list[int]
    bias: list[Optional[torch.Tensor]]  # noqa: UP045
    attn_norm: list[torch.Tensor]
    ffn_norm: list[torch.Tensor]
    q_norm: list[Optional[torch.Tensor]]  # noqa: UP045
    k_norm: list[Optional[torch.Tensor]]  # noqa: UP045

    def __init__(self, stage: "Stage") -> None:
        super().__init__()
        empty = torch.empty(0)
        self.kinds, self.w, self.scales, self.rows = [], [], [], []
        self.bias, self.attn_norm, self.ffn_norm, self.q_norm, self.k_norm = [], [], [], [], []
        for lw in stage.blocks:
            for lin in (lw.qkv, lw.wo, lw.gate_up, lw.down):
                k = lin.fast[0] if lin is not None else None
                self.kinds.append(k.kind_id if k is not None else _NO_WEIGHT)
                self.w.append(k.w if k is not None else empty)
                self.scales.append(k.scales if k is not None else None)
                self.rows.append(k.shape[0] if k is not None else 0)
            self.bias.append(lw.qkv.bias)
            self.attn_norm.append(lw.attn_norm)
            self.ffn_norm.append(lw.ffn_norm)
            self.q_norm.append(lw.q_norm)
            self.k_norm.append(lw.k_norm)
        self.nh, self.nkv, self.hd = stage.n_heads, stage.n_kv_heads, stage.head_dim
        self.eps = float(stage.eps)
        self.qk_full = bool(stage.config.qk_norm_full)
        self.gqa = stage.n_kv_heads != stage.n_heads
        # activation dtype of the packed kernels: bf16 (torch's), fp32 (VNNI, the CPU twin), fp16 (accelerators)
        first = stage.blocks[0].qkv.fast if stage.blocks else None
        self.act_dtype = first[0].dtype if first else FAST_ACT_DTYPE
        # a decode row's KV write + attention as one native call (engine.qkernels) where it is built
        # (not on the accelerator path's CPU twin, which runs the ops a GPU runs)
        self.native_attn = (stage.device.type == "cpu" and not stage.accel
                            and stage.kv_dtype == torch.float32 and self.hd % 16 == 0 and qkernels.available())

    @staticmethod
    def of(stage: "Stage") -> Any:
        """The scripted loop of a stage's current blocks (every dense linear packed)."""
        return script(FastLoop(stage))

    def _mm(self, j: int, x: torch.Tensor, batched: bool) -> torch.Tensor:
        """Slot j's packed matmul; ``batched`` False: each row on its own (kernels not row-independent)."""
        k, w, s, r = self.kinds[j], self.w[j], self.scales[j], self.rows[j]
        if batched:
            return fast_mm(k, x, w, s, r)
        return torch.cat([fast_mm(k, x[i:i + 1], w, s, r) for i in range(x.shape[0])])

    def _qk_v(self, li: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              batched: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer li's normed projection: rotated q and k rows [T, nh + nkv, hd] and the qkv rows (v after q, k)."""
        nh, nkv, hd = self.nh, self.nkv, self.hd
        qd, kd = nh * hd, nkv * hd
        T, H = h.shape[0], h.shape[1]
        eps = self.eps
        x = F.rms_norm(h, [H], self.attn_norm[li], eps).to(self.act_dtype)
        qkv = self._mm(4 * li, x, batched).float()
        b = self.bias[li]
        if b is not None:
            qkv += b
        qk = qkv[:, :qd + kd].view(T, nh + nkv, hd)
        qn, kn = self.q_norm[li], self.k_norm[li]
        if qn is not None and kn is not None:
            if self.qk_full:
                qk = torch.cat((F.rms_norm(qkv[:, :qd], [qd], qn, eps),
                                F.rms_norm(qkv[:, qd:qd + kd], [kd], kn, eps)), 1).view(T, nh + nkv, hd)
            else:
                qk = torch.cat((F.rms_norm(qk[:, :nh], [hd], qn, eps), F.rms_norm(qk[:, nh:], [hd], kn, eps)), 1)
        half = hd // 2
        rot = torch.cat((qk[..., half:].neg(), qk[..., :half]), dim=-1)
        return qk * cos + rot * sin, qkv

    @torch.jit.export
    def attention(self, li: int, h: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, start: int,
                  cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
        """Layer li's attention half for T rows of one session at [start, start + T), added into h."""
        nh, nkv, hd = self.nh, self.nkv, self.hd
        qd, kd = nh * hd, nkv * hd
        T = h.shape[0]
        L = start + T
        qk, qkv = self._qk_v(li, h, cos, sin, True)
        kc, vc = kk[li], vv[li]
        if T == 1 and mask is None and self.native_attn:
            o1 = torch.ops.mesh402.attn_decode_rows(qk, qkv[:, qd + kd:], [kk], [vv], [start], li)
            h += self._mm(4 * li + 1, o1.to(self.act_dtype), True)
            return h
        kc[:, start:L].copy_(qk[:, nh:].transpose(0, 1))
        vc[:, start:L].copy_(qkv[:, qd + kd:].view(T, nkv, hd).transpose(0, 1))
        q = qk[:, :nh].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(q, kc[None, :, :L], vc[None, :, :L], attn_mask=mask,
                                           enable_gqa=self.gqa)
        h += self._mm(4 * li + 1, o[0].transpose(0, 1).reshape(T, qd).to(self.act_dtype), True)
        return h

    @torch.jit.export
    def attention_rows(self, li: int, h: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
                       pos: list[int], kr: list[torch.Tensor], vr: list[torch.Tensor],
                       kw: list[torch.Tensor], vw: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                       masks: list[Optional[torch.Tensor]], batched: bool, native: bool) -> torch.Tensor:  # noqa: UP045
        """Layer li's attention half for B one-row steps, row i at position pos[i] of the session whose
        KV is ks[i] / vs[i], with the KV write and attention a 1-row step makes (same values and shapes).
        ``native``: every row takes the native decode attention (one call for all rows). Otherwise the
        views are cut once per step (:meth:`rows_all`): kr[i] / vr[i] the session's K / V rows
        [layers, nkv, p + 1, hd], kw[i] / vw[i] its position-p slots [layers, nkv, hd]."""
        nh, nkv, hd = self.nh, self.nkv, self.hd
        qd, kd = nh * hd, nkv * hd
        B = h.shape[0]
        qk, qkv = self._qk_v(li, h, cos, sin, batched)
        if native:
            # each row computed as a 1-row step computes it (one call, rows and KV heads over the threads)
            o = torch.ops.mesh402.attn_decode_rows(qk, qkv[:, qd + kd:], ks, vs, pos, li)
            h += self._mm(4 * li + 1, o.to(self.act_dtype), batched)
            return h
        knew, vnew = qk[:, nh:].unbind(0), qkv[:, qd + kd:].view(B, nkv, hd).unbind(0)  # B x [nkv, hd]
        qs = qk[:, :nh].unsqueeze(2).split(1)  # B x [1, nh, 1, hd]
        outs: list[torch.Tensor] = []
        for i in range(B):
            m = masks[i]
            if m is None and self.native_attn:
                o1 = torch.ops.mesh402.attn_decode_rows(qk[i:i + 1], qkv[i:i + 1, qd + kd:], [ks[i]], [vs[i]],
                                                        [pos[i]], li)
                outs.append(o1.view(1, nh, 1, hd))
                continue
            kw[i][li].copy_(knew[i])
            vw[i][li].copy_(vnew[i])
            outs.append(F.scaled_dot_product_attention(qs[i], kr[i][li:li + 1], vr[i][li:li + 1],
                                                       attn_mask=masks[i], enable_gqa=self.gqa))
        h += self._mm(4 * li + 1, torch.cat(outs).transpose(1, 2).reshape(B, qd).to(self.act_dtype), batched)
        return h

    @torch.jit.export
    def ffn(self, li: int, h: torch.Tensor, batched: bool) -> torch.Tensor:
        """Layer li's dense SwiGLU half, added into h."""
        x = F.rms_norm(h, [h.shape[1]], self.ffn_norm[li], self.eps).to(self.act_dtype)
        gu = self._mm(4 * li + 2, x, batched)
        ff = gu.shape[-1] // 2
        h += self._mm(4 * li + 3, F.silu(gu[:, :ff]) * gu[:, ff:], batched)
        return h

    @torch.jit.export
    def chunk(self, h: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, start: int, cos: torch.Tensor,
              sin: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:  # noqa: UP045
        """Every layer (all dense) for T rows of one session at [start, start + T)."""
        h = h.clone()
        for li in range(len(self.attn_norm)):
            h = self.attention(li, h, kk, vv, start, cos, sin, mask)
            h = self.ffn(li, h, True)
        return h

    @torch.jit.export
    def rows_all(self, h: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor], pos: list[int],
                 cos: torch.Tensor, sin: torch.Tensor, masks: list[Optional[torch.Tensor]],  # noqa: UP045
                 batched: bool) -> torch.Tensor:
        """Every layer (all dense) for B one-row steps of any sessions: row i at pos[i] of the session whose
        KV is ks[i] / vs[i] (see :meth:`attention_rows`)."""
        h = h.clone()
        native = self.native_attn and all([m is None for m in masks])
        kr: list[torch.Tensor] = []
        vr: list[torch.Tensor] = []
        kw: list[torch.Tensor] = []
        vw: list[torch.Tensor] = []
        if not native:
            kr = [ks[i][:, :, :pos[i] + 1] for i in range(len(pos))]
            vr = [vs[i][:, :, :pos[i] + 1] for i in range(len(pos))]
            kw = [ks[i][:, :, pos[i]] for i in range(len(pos))]
            vw = [vs[i][:, :, pos[i]] for i in range(len(pos))]
        for li in range(len(self.attn_norm)):
            h = self.attention_rows(li, h, ks, vs, pos, kr, vr, kw, vw, cos, sin, masks, batched, native)
            h = self.ffn(li, h, batched)
        return h
