"""Quantized weights kept in memory as raw ggml blocks, dequantized on the fly.

A :class:`QWeight` holds one 2-D weight ``[rows, cols]`` (``nn.Linear`` layout).
For block-quantized ggml types the raw block bytes are split once at load
into contiguous component tensors (scales, mins, packed quants: the same bytes,
laid out for vectorized torch ops). ``dequant()`` reproduces
``gguf.quants.dequantize`` bit for bit (same fp32 operation order).

Fast mode packs weights for low-precision kernels (see :func:`pack_fast`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as GT

from . import accel, qkernels

__all__ = ["Workspace", "QWeight", "SUPPORTED_TYPES", "from_raw", "from_dense", "FastLinearWeight", "pack_fast"]

QK_K = 256

SUPPORTED_TYPES = {
    GT.F32, GT.F16, GT.BF16, GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1, GT.Q8_0, GT.Q4_K, GT.Q5_K, GT.Q6_K,
}
_DENSE = {GT.F32: torch.float32, GT.F16: torch.float16, GT.BF16: torch.bfloat16}


def _u8_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] uint8 -> [..., 2n] uint8: low nibbles then high nibbles."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _get_scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte Q4_K/Q5_K scales into 8 six-bit scales and mins."""
    s = scales.reshape(*scales.shape[:-1], 3, 4)
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc.contiguous(), mn.contiguous()


class QWeight:
    """A 2-D weight, either dense (``parts['w']``) or ggml block-quantized."""

    __slots__ = ("gtype", "shape", "parts")

    def __init__(self, gtype: int, shape: tuple[int, int], parts: dict[str, torch.Tensor]):
        self.gtype = GT(gtype)
        self.shape = (int(shape[0]), int(shape[1]))
        self.parts = parts

    # -- info -------------------------------------------------------------
    @property
    def type_name(self) -> str:
        return self.gtype.name

    @property
    def is_dense(self) -> bool:
        return self.gtype in _DENSE

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts.values())

    def to(self, device: torch.device | str) -> "QWeight":
        return QWeight(self.gtype, self.shape, {k: v.to(device) for k, v in self.parts.items()})

    @staticmethod
    def cat_rows(ws: list["QWeight"]) -> "QWeight":
        """Concatenate weights of the same type/cols along rows (rows are independent)."""
        g, cols = ws[0].gtype, ws[0].shape[1]
        assert all(w.gtype == g and w.shape[1] == cols for w in ws)
        parts = {k: torch.cat([w.parts[k] for w in ws], dim=0) for k in ws[0].parts}
        return QWeight(g, (sum(w.shape[0] for w in ws), cols), parts)

    # -- dequantization ---------------------------------------------------
    def dequant(self, rows: torch.Tensor | slice | None = None, ws: "Workspace | None" = None) -> torch.Tensor:
        """fp32 ``[rows, cols]`` (all rows, a slice, or an index tensor).

        With a :class:`Workspace` the result is written into (and is a view of)
        its preallocated buffers: valid until the next call using ``ws``. F32
        weights are returned as they are (no copy).
        """
        p = self.parts if rows is None else {k: v[rows] for k, v in self.parts.items()}
        g = self.gtype
        cols = self.shape[1]
        if g in _DENSE:
            w = p["w"]
            if w.dtype == torch.float32:
                return w
            if ws is None:
                return w.float()
            o = ws.f32(w.numel()).view(w.shape)
            o.copy_(w)
            return o
        n = next(iter(p.values())).shape[0]
        if ws is None:
            ws = Workspace(n * cols, device=next(iter(p.values())).device)
        o = ws.f32(n * cols)
        if g == GT.Q8_0:
            o3 = o.view(n, -1, 32)
            o3.copy_(p["qs"])
            o3.mul_(p["d"].float().unsqueeze(-1))
        elif g in (GT.Q4_0, GT.Q4_1):
            qs = p["qs"]
            u = ws.u8(0, n * cols).view(n, qs.shape[1], 32)
            torch.bitwise_and(qs, 0x0F, out=u[..., :16])
            torch.bitwise_right_shift(qs, 4, out=u[..., 16:])
            o3 = o.view(u.shape)
            o3.copy_(u)
            if g == GT.Q4_0:
                o3.sub_(8.0)
                o3.mul_(p["d"].float().unsqueeze(-1))
            else:
                o3.mul_(p["d"].float().unsqueeze(-1))
                o3.add_(p["m"].float().unsqueeze(-1))
        elif g == GT.Q4_K:
            qs = p["qs"]                                             # [n, nb, 128]
            nb = qs.shape[1]
            u = ws.u8(0, n * cols).view(n, nb, 4, 64)
            q4 = qs.view(n, nb, 4, 32)
            torch.bitwise_and(q4, 0x0F, out=u[..., :32])
            torch.bitwise_right_shift(q4, 4, out=u[..., 32:])
            o4 = o.view(n, nb, 8, 32)
            o4.copy_(u.view(n, nb, 8, 32))
            o4.mul_((p["d"].float().unsqueeze(-1) * p["sc"].float()).unsqueeze(-1))
            o4.sub_((p["dmin"].float().unsqueeze(-1) * p["mn"].float()).unsqueeze(-1))
        elif g == GT.Q6_K:
            ql, qh = p["ql"], p["qh"]                                # [n,nb,128], [n,nb,64]
            nb = ql.shape[1]
            lo = ws.u8(0, n * cols).view(n, nb, 2, 128)
            l4 = ql.view(n, nb, 2, 64)
            torch.bitwise_and(l4, 0x0F, out=lo[..., :64])
            torch.bitwise_right_shift(l4, 4, out=lo[..., 64:])
            hi = ws.u8(1, n * cols).view(n, nb, 2, 4, 32)
            h5 = qh.view(n, nb, 2, 1, 32)
            for j, sh in enumerate((0, 2, 4, 6)):
                torch.bitwise_right_shift(h5[..., 0, :], sh, out=hi[..., j, :])
            hi.bitwise_and_(3).bitwise_left_shift_(4)
            lo.view(-1).bitwise_or_(hi.view(-1))
            o4 = o.view(n, nb, 16, 16)
            o4.copy_(lo.view(n, nb, 16, 16))
            o4.sub_(32.0)
            o4.mul_((p["d"].float().unsqueeze(-1) * p["sc"].float()).unsqueeze(-1))
        else:
            o.view(n, cols).copy_(self._dequant_generic(p, n).reshape(n, cols))
        return o.view(n, cols)

    def _dequant_generic(self, p: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        g = self.gtype
        if g in (GT.Q5_0, GT.Q5_1):
            sh = torch.arange(32, dtype=torch.int32, device=p["qh"].device)
            hb = ((p["qh"].unsqueeze(-1) >> sh) & 1).to(torch.uint8)
            q = _u8_nibbles(p["qs"]) | (hb << 4)
            if g == GT.Q5_0:
                return p["d"].float().unsqueeze(-1) * (q.to(torch.int8) - 16).float()
            return p["d"].float().unsqueeze(-1) * q.float() + p["m"].float().unsqueeze(-1)
        if g == GT.Q5_K:
            d = p["d"].float().unsqueeze(-1) * p["sc"].float()     # [n, nb, 8]
            dm = p["dmin"].float().unsqueeze(-1) * p["mn"].float()
            qs = p["qs"]                                             # [n, nb, 128]
            nb = qs.shape[1]
            q = _u8_nibbles(qs.reshape(n, nb, 4, 32)).reshape(n, nb, 8, 32)
            sh = torch.arange(8, dtype=torch.uint8, device=qs.device).view(8, 1)
            q = q | (((p["qh"].unsqueeze(-2) >> sh) & 1) << 4)   # [n, nb, 8, 32]
            return d.unsqueeze(-1) * q.float() - dm.unsqueeze(-1)
        raise NotImplementedError(f"dequant of {g.name}")  # pragma: no cover


class Workspace:
    """Preallocated, growable scratch buffers for dequantization (one per stage)."""

    def __init__(self, n: int = 0, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._f32 = torch.empty(n, dtype=torch.float32, device=self.device)
        self._u8 = [torch.empty(n, dtype=torch.uint8, device=self.device) for _ in range(2)]

    @property
    def nbytes(self) -> int:
        return self._f32.numel() * 4 + sum(u.numel() for u in self._u8)

    def f32(self, n: int) -> torch.Tensor:
        if self._f32.numel() < n:
            self._f32 = torch.empty(n, dtype=torch.float32, device=self.device)
        return self._f32[:n]

    def u8(self, i: int, n: int) -> torch.Tensor:
        if self._u8[i].numel() < n:
            self._u8[i] = torch.empty(n, dtype=torch.uint8, device=self.device)
        return self._u8[i][:n]


def from_dense(w: torch.Tensor) -> QWeight:
    g = {torch.float32: GT.F32, torch.float16: GT.F16, torch.bfloat16: GT.BF16}[w.dtype]
    return QWeight(g, tuple(w.shape), {"w": w.contiguous()})


def from_raw(raw: torch.Tensor, gtype: int, shape: tuple[int, int]) -> QWeight:
    """Build a QWeight from the raw ggml bytes (uint8, any shape) of a ``[rows, cols]`` tensor."""
    g = GT(gtype)
    rows, cols = int(shape[0]), int(shape[1])
    if g not in SUPPORTED_TYPES:
        raise NotImplementedError(f"ggml type {g.name} is not supported")
    raw = raw.reshape(-1)
    if g in _DENSE:
        return QWeight(g, (rows, cols), {"w": raw.view(_DENSE[g]).reshape(rows, cols)})
    bs, ts = GGML_QUANT_SIZES[g]
    nb = cols // bs
    b = raw.reshape(rows, nb, ts)

    def f16(lo: int) -> torch.Tensor:
        return b[..., lo:lo + 2].contiguous().view(torch.float16).reshape(rows, nb)

    def u8(lo: int, hi: int) -> torch.Tensor:
        return b[..., lo:hi].contiguous()

    if g == GT.Q8_0:
        parts = {"d": f16(0), "qs": u8(2, 34).view(torch.int8)}
    elif g == GT.Q4_0:
        parts = {"d": f16(0), "qs": u8(2, 18)}
    elif g == GT.Q4_1:
        parts = {"d": f16(0), "m": f16(2), "qs": u8(4, 20)}
    elif g == GT.Q5_0:
        parts = {"d": f16(0), "qh": u8(2, 6).view(torch.int32).reshape(rows, nb), "qs": u8(6, 22)}
    elif g == GT.Q5_1:
        parts = {"d": f16(0), "m": f16(2), "qh": u8(4, 8).view(torch.int32).reshape(rows, nb),
                 "qs": u8(8, 24)}
    elif g in (GT.Q4_K, GT.Q5_K):
        sc, mn = _get_scale_min_k4(u8(4, 16))
        parts = {"d": f16(0), "dmin": f16(2), "sc": sc, "mn": mn}
        if g == GT.Q4_K:
            parts["qs"] = u8(16, 144)
        else:
            parts["qh"] = u8(16, 48)
            parts["qs"] = u8(48, 176)
    elif g == GT.Q6_K:
        parts = {"ql": u8(0, 128), "qh": u8(128, 192), "sc": u8(192, 208).view(torch.int8),
                 "d": f16(208)}
    else:  # pragma: no cover
        raise NotImplementedError(g.name)
    return QWeight(g, (rows, cols), parts)


# ---------------------------------------------------------------------------
# fast mode


# Activations of the packed kernels: torch's CPU int4/int8 kernels are only fast in bf16 (fp32 runs a
# reference path ~50x slower), so fast mode trades activation precision for speed.
FAST_ACT_DTYPE = torch.bfloat16
# The fast kernel set is named in the device signature the verification evidence carries (engine.replay):
# qkernels.kernel_set() says which set this process runs (the VNNI block kernels, or torch's int4 group-32
# layers, Q8_0 layers block-exact and a per-row int8 LM head); each row is computed on its own at every
# batch width (engine.batch.rows_independent). Bump the names there whenever fast mode's numbers change.


@dataclass
class FastLinearWeight:
    """A weight packed for a low-precision kernel.

    kind: "int4" (torch int4pack, group 32, bf16 activations), "int8" (per-row
    int8, bf16 activations), "q8blocks" (Q8_0 kept block-exact: int8 quants laid
    out [blocks, rows, 32] with per-block scales; one int8 kernel call per block
    column), "dense" (bf16/f32 matmul); with the VNNI kernels (engine.qkernels):
    "q4x8" (4-bit blocks: each row its nibbles then its scales, qkernels.pack_q4 / pack_q4_k) and "q8x8"
    (8-bit blocks: each row its quants + 128 then fp16 scales, qkernels.pack_q8), both with fp32
    activations quantized per block of 32 to two int8 planes inside the kernel; no separate scales.
    """

    kind: str
    shape: tuple[int, int]
    w: torch.Tensor
    scales: torch.Tensor | None = None
    dtype: torch.dtype = torch.bfloat16

    @property
    def nbytes(self) -> int:
        n = self.w.numel() * self.w.element_size()
        if self.scales is not None:
            n += self.scales.numel() * self.scales.element_size()
        return n

    @property
    def kind_id(self) -> int:
        return _KIND_IDS[self.kind]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, cols] in self.dtype -> [T, rows] in self.dtype."""
        return fast_mm(self.kind_id, x, self.w, self.scales, self.shape[0])


_KIND_IDS = {"int4": 0, "int8": 1, "q8blocks": 2, "dense": 3, "q4x8": 4, "q8x8": 5, "q4dq": 6, "q8dq": 7,
             "densetile": 8}


def fast_mm(kind: int, x: torch.Tensor, w: torch.Tensor, scales: Optional[torch.Tensor],  # noqa: UP045
            rows: int) -> torch.Tensor:
    """A packed weight's matmul (kind: _KIND_IDS). Plain Python for eager callers; TorchScript compiles it
    where fast mode's scripted layer loop (engine.fast_loop) calls it: one definition for both."""
    if kind == 4:
        return torch.ops.mesh402.q4q8_mm(x.float().contiguous(), w)
    if kind == 5:
        return torch.ops.mesh402.q8q8_mm(x.float().contiguous(), w)
    if kind == 6 and scales is not None:
        return accel.mm_q4(x, w, scales)
    if kind == 7 and scales is not None:
        return accel.mm_q8(x, w, scales)
    if kind == 8:
        return accel.tiled_linear(x, w)
    if kind == 3 or scales is None:
        return torch.nn.functional.linear(x.to(w.dtype), w)
    x = x.to(scales.dtype)
    if kind == 0:
        return torch._weight_int4pack_mm_for_cpu(x, w, 32, scales)
    if kind == 1:
        return torch._weight_int8pack_mm(x, w, scales)
    y = torch.zeros((x.shape[0], rows), dtype=torch.float32, device=x.device)
    for b in range(w.shape[0]):
        y += torch._weight_int8pack_mm(x[:, b * 32:(b + 1) * 32].contiguous(), w[b], scales[b])
    return y.to(x.dtype)


def _int4_kernels_ok(device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def _q4_affine(qw: QWeight, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer quants q in [0,16) [n, cols] (uint8) and per-32-block fp32 (a, b) [n, cols/32] with
    w = a * q + b exactly (in fp32)."""
    p = {k: v[r0:r1] for k, v in qw.parts.items()}
    n = r1 - r0
    g = qw.gtype
    if g in (GT.Q4_0, GT.Q4_1):
        q = _u8_nibbles(p["qs"]).reshape(n, -1)
        d = p["d"].float()
        return q, d, -8 * d if g == GT.Q4_0 else p["m"].float()
    if g == GT.Q4_K:
        nb = p["qs"].shape[1]
        q = _u8_nibbles(p["qs"].reshape(n, nb, 4, 32)).reshape(n, -1)
        s = (p["d"].float().unsqueeze(-1) * p["sc"].float()).reshape(n, -1)
        dm = (p["dmin"].float().unsqueeze(-1) * p["mn"].float()).reshape(n, -1)
        return q, s, -dm
    raise NotImplementedError(g.name)


def _int4_parts(qw: QWeight, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer quants q in [0,16) [n, cols] and (scale, zero) fp32 [n, cols/32] such that
    w = scale * (q - 8) + zero exactly (in fp32 before rounding the scales): torch's int4pack form."""
    q, a, b = _q4_affine(qw, r0, r1)
    if qw.gtype == GT.Q4_0:
        return q, a, torch.zeros_like(a)
    return q, a, b + 8 * a


def _q8_blocks(qw: QWeight, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [r0, r1) as 8-bit blocks: int8 quants [n, cols] and fp16 scales [n, cols/32]. Q8_0 as it is;
    other types requantized per block of 32 (max |w| / 127)."""
    cols = qw.shape[1]
    if qw.gtype == GT.Q8_0:
        return qw.parts["qs"][r0:r1].reshape(r1 - r0, cols), qw.parts["d"][r0:r1]
    w = qw.dequant(slice(r0, r1)).reshape(r1 - r0, cols // 32, 32)
    d = (w.abs().amax(dim=-1) / 127.0).half()
    inv = torch.where(d > 0, 1.0 / d.float(), torch.zeros_like(d, dtype=torch.float32))
    q = torch.round(w * inv.unsqueeze(-1)).clamp_(-127, 127).reshape(r1 - r0, cols).to(torch.int8)
    return q, d


def _q4x8_rows(qw: QWeight, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) for qkernels.q4q8_mm, every value the file's: Q4_1's fp16 scale and offset, Q4_0's scale
    alone (offset -8 scale), Q4_K's own 6-bit scales and mins with their fp16 super-block factors."""
    q, a, c = _q4_affine(qw, r0, r1)
    if qw.gtype == GT.Q4_1:
        return qkernels.pack_q4(q, a, c)
    if qw.gtype == GT.Q4_0:
        return qkernels.pack_q4(q, a, None)
    p = qw.parts
    return qkernels.pack_q4_k(q, p["sc"][r0:r1].reshape(r1 - r0, -1), p["mn"][r0:r1].reshape(r1 - r0, -1),
                              p["d"][r0:r1], p["dmin"][r0:r1])


def _pack_q4x8(qw: QWeight, row_chunk: int) -> FastLinearWeight:
    """4-bit blocks for qkernels.q4q8_mm (quants and scales exact; see _q4x8_rows)."""
    rows, cols = qw.shape
    parts = [_q4x8_rows(qw, r0, min(rows, r0 + row_chunk)) for r0 in range(0, rows, row_chunk)]
    return FastLinearWeight("q4x8", (rows, cols), torch.cat(parts), None, torch.float32)


def _pack_q8x8(qw: QWeight, row_chunk: int) -> FastLinearWeight:
    """8-bit blocks for qkernels.q8q8_mm: Q8_0 as it is; other types requantized per block of 32."""
    rows, cols = qw.shape
    parts = [qkernels.pack_q8(*_q8_blocks(qw, r0, min(rows, r0 + row_chunk))) for r0 in range(0, rows, row_chunk)]
    return FastLinearWeight("q8x8", (rows, cols), torch.cat(parts), None, torch.float32)


def _pack_accel(qw: QWeight, device: torch.device, row_chunk: int) -> FastLinearWeight | None:
    """Blocks for engine.accel's dequantize-on-the-fly matmuls (accelerators and their CPU twin): Q4_0 /
    Q4_1 / Q4_K as 4-bit blocks (quants exact, scale and offset fp16), other quantized types as 8-bit blocks
    (Q8_0 exact), dense weights in the compute dtype; every matmul on fixed tiles of rows."""
    rows, cols = qw.shape
    dt = accel.compute_dtype(device)
    if qw.is_dense:
        return FastLinearWeight("densetile", (rows, cols), qw.parts["w"].to(device=device, dtype=dt).contiguous(),
                                None, dt)
    if cols % 32:
        return None  # no block layout: the caller keeps the exact per-layer dequant path
    chunks = range(0, rows, row_chunk)
    if qw.gtype in (GT.Q4_0, GT.Q4_1, GT.Q4_K):
        kind, packed = "q4dq", [accel.pack_q4(*_q4_affine(qw, r0, min(rows, r0 + row_chunk))) for r0 in chunks]
    else:
        kind, packed = "q8dq", [accel.pack_q8(*_q8_blocks(qw, r0, min(rows, r0 + row_chunk))) for r0 in chunks]
    w = torch.cat([p[0] for p in packed]).to(device)
    s = torch.cat([p[1] for p in packed]).to(device)
    return FastLinearWeight(kind, (rows, cols), w, s, dt)


def pack_fast(qw: QWeight, device: torch.device | str = "cpu", row_chunk: int = 4096, *,
              block_exact: bool = True) -> FastLinearWeight | None:
    """Pack a weight for fast mode.

    With the VNNI kernels (engine.qkernels, CPU): Q4_0 / Q4_1 / Q4_K keep their blocks ("q4x8": quants
    and scales exact, each type's scales as compact as in the file); Q8_0 stays as it is and other quantized
    types are requantized to 8-bit blocks of 32 ("q8x8"), heads included (`block_exact` is moot there).
    Without them: Q4_0 / Q4_1 / Q4_K map exactly onto torch's int4 group-32 packed format
    (scales/zeros rounded to bf16). Q8_0 keeps its block scales (`q8blocks`) unless `block_exact` is
    False. Other quantized types (and Q8_0 then) are requantized to per-row int8. Dense weights become
    bf16. All but the VNNI kinds use bf16 activations.
    On an accelerator (and on the CPU with ``MESH402_FAST_KERNELS=twin``): engine.accel's blocks, dequantized
    on the fly ("q4dq", "q8dq", dense "densetile"; fp16 compute, fp32 on the twin).
    """
    device = torch.device(device)
    rows, cols = qw.shape
    if accel.enabled(device):
        return _pack_accel(qw, device, row_chunk)
    if device.type == "cpu" and not qw.is_dense and cols % 32 == 0 and qkernels.available():
        if qw.gtype in (GT.Q4_0, GT.Q4_1, GT.Q4_K):
            return _pack_q4x8(qw, row_chunk)
        return _pack_q8x8(qw, row_chunk)  # Q8_0 block-exact; 5/6-bit types to 8-bit blocks (closer than per row)
    if qw.gtype in (GT.Q4_0, GT.Q4_1, GT.Q4_K) and cols % 32 == 0 and _int4_kernels_ok(device):
        packed, sz = [], []
        for r0 in range(0, rows, row_chunk):
            r1 = min(rows, r0 + row_chunk)
            q, s, z = _int4_parts(qw, r0, r1)
            packed.append(torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
            sz.append(torch.stack((s, z), dim=-1).transpose(0, 1).to(FAST_ACT_DTYPE))  # [cols/32, n, 2]
        return FastLinearWeight("int4", (rows, cols), torch.cat(packed, 0), torch.cat(sz, 1).contiguous(),
                                FAST_ACT_DTYPE)
    if qw.gtype == GT.Q8_0 and block_exact and device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
        # Q8_0 is already int8: keep its per-32 block scales instead of requantizing per row, so the
        # rows stay exact (one int8 call per block column, each row on its own).
        qs, d = qw.parts["qs"], qw.parts["d"]
        blocks = qs.permute(1, 0, 2).contiguous()  # [cols/32, rows, 32]
        return FastLinearWeight("q8blocks", (rows, cols), blocks, d.t().contiguous().to(FAST_ACT_DTYPE))
    if not qw.is_dense and device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm"):
        ws, ss = [], []
        for r0 in range(0, rows, row_chunk):
            w = qw.dequant(slice(r0, min(rows, r0 + row_chunk)))
            amax = w.abs().amax(dim=1).clamp_min(1e-30)
            s = amax / 127.0
            ws.append(torch.round(w / s.unsqueeze(1)).clamp_(-127, 127).to(torch.int8))
            ss.append(s)
        return FastLinearWeight("int8", (rows, cols), torch.cat(ws), torch.cat(ss).to(FAST_ACT_DTYPE), FAST_ACT_DTYPE)
    if not qw.is_dense:
        return None  # no packed kernel here: the caller keeps the exact per-layer dequant path
    w = qw.parts["w"].to(device=device, dtype=FAST_ACT_DTYPE)
    return FastLinearWeight("dense", (rows, cols), w.contiguous(), None, FAST_ACT_DTYPE)
