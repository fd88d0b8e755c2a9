"""Fast mode on accelerators (CUDA, MPS): weights stay in their 4- or 8-bit blocks in device memory and are
dequantized on the fly, one slab of rows at a time, into the compute dtype for a plain matmul.

Why this shape:

- Memory: a quantized model must fit where it did on the CPU (a 4-bit weight costs 0.625 bytes a value here,
  its nibbles plus an fp16 scale and offset per block of 32), so weights are never held dequantized; a slab's
  temporary is bounded (``SLAB`` values).
- Exactness under batching: a GEMM library (cuBLAS, MKL) picks its kernel, and so the order of each output's
  sums, from the problem's shape. Every matmul here therefore runs on tiles of exactly ``TILE`` activation
  rows (zero-padded), so a decode row meets the same kernel shape alone, beside 15 others, or inside a
  prefill chunk; which slot of the tile it lands in must not matter either, which
  ``engine.batch.rows_independent`` checks at load (else the engine multiplies rows one by one).
- Testability without a GPU: the same functions run on the CPU (the "CPU twin", ``MESH402_FAST_KERNELS=twin``)
  with fp32 compute, so CI exercises packing, dequantization, tiling, the scripted layer loop and batch
  invariance; only the library GEMM differs on a GPU. The kernel set is named in the device signature
  (:func:`kernel_set`), so verification never compares the twin with a GPU.

What it is not (yet): a fused dequantize-and-multiply kernel (each step reads a weight's blocks once and
writes and reads its dequantized slab once: ~8x the bytes of a fused int4 kernel), nor CUDA graphs for
decode. It has not run on GPU hardware: ``benchmarks/device.sh`` is the prepared check for when a GPU is lent.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

__all__ = ["TILE", "SLAB", "enabled", "compute_dtype", "kernel_set", "pack_q4", "block_nibbles", "pack_q8",
           "dequant_q4", "dequant_q8", "tiled_linear", "mm_q4", "mm_q8"]


# Functions, not module constants: TorchScript (which compiles these into fast mode's layer loop) reads no
# module-level ints.
def tile() -> int:
    """Activation rows per matmul call: every call has this shape, whatever the batch."""
    return 16


def slab() -> int:
    """Weight values dequantized at once (16 MiB of fp32 temporaries at most)."""
    return 1 << 22


TILE = tile()
SLAB = slab()


def _twin() -> bool:
    return os.environ.get("MESH402_FAST_KERNELS", "") == "twin"


def enabled(device: torch.device) -> bool:
    """Whether fast mode packs for these kernels on ``device``: any accelerator, and the CPU when the twin
    is asked for (``MESH402_FAST_KERNELS=twin``: tests and the device script's reference)."""
    return device.type != "cpu" or _twin()


def compute_dtype(device: torch.device) -> torch.dtype:
    """fp16 on accelerators (tensor-core GEMMs; a dequantized weight is rounded once, from fp32, to fp16's 11
    bits); fp32 on the CPU twin (CPU fp16 GEMMs are slow or absent)."""
    return torch.float32 if device.type == "cpu" else torch.float16


def kernel_set(device_type: str) -> str | None:
    """The set's name for the device signature, or None where it is not in use."""
    if device_type == "cpu":
        return "a1-dequant-f32-tile16" if _twin() else None
    return "a1-dequant-f16-tile16"


def pack_q4(q: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit quants q in [0, 16) uint8 [N, K] and fp32 a, c [N, K/32] (w = a * q + c) -> (nibbles uint8
    [N, K/2], byte i of a block = quant i | quant 16 + i << 4, the layout of ggml's Q4_0; fp16 [N, K/32, 2]
    holding a and c)."""
    N, K = q.shape
    return block_nibbles(q.reshape(N, K // 32, 32)).contiguous(), torch.stack((a, c), dim=-1).half().contiguous()


def block_nibbles(qb: torch.Tensor) -> torch.Tensor:
    """Blocks of 32 quants in [0, 16), uint8 [N, nb, 32] -> [N, nb * 16] bytes in ggml's Q4_0 order: byte i of a
    block holds quant i (low nibble) and quant 16 + i (high). engine.qkernels packs its rows' tails this way too."""
    N, nb, _ = qb.shape
    halves = qb.reshape(N, nb, 2, 16)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(N, nb * 16)


def pack_q8(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit quants int8 [N, K] and scales [N, K/32] -> (int8 [N, K], fp16 [N, K/32])."""
    return q.to(torch.int8).contiguous(), d.half().contiguous()


def dequant_q4(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows of :func:`pack_q4` -> [n, K] in ``dtype``: a * q + c in fp32, rounded once to ``dtype``."""
    n = w.shape[0]
    wb = w.view(n, -1, 16)  # a block's 16 bytes
    q = torch.cat((wb & 0x0F, wb >> 4), dim=-1).float()  # [n, K/32, 32]
    sf = s.float()
    # c + q * a: q * a is exact in fp32 (4-bit times 11-bit), so a fused multiply-add rounds the same as two ops
    return torch.addcmul(sf[:, :, 1:2], q, sf[:, :, 0:1]).reshape(n, -1).to(dtype)


def dequant_q8(w: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows of :func:`pack_q8` -> [n, K] in ``dtype``: q * d in fp32, rounded once to ``dtype``."""
    n = w.shape[0]
    return (w.view(n, -1, 32).float() * d.float().unsqueeze(-1)).reshape(n, -1).to(dtype)


def _tiles(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] zero-padded to a whole number of tiles: [ceil(M / TILE) * TILE, K]."""
    T = tile()
    pad = (-x.shape[0]) % T
    if pad == 0:
        return x
    return torch.cat((x, torch.zeros((pad, x.shape[1]), dtype=x.dtype, device=x.device)))


def tiled_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w[n, K].T with every GEMM call on exactly TILE rows (see the module's docstring)."""
    M = x.shape[0]
    xp = _tiles(x.to(w.dtype))
    T = tile()
    ys = [F.linear(xp[t:t + T], w) for t in range(0, xp.shape[0], T)]
    return torch.cat(ys)[:M]


def _slab_rows(rows: int, cols: int) -> int:
    return max(1, min(rows, slab() // max(1, cols)))


def mm_q4(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [M, K] (compute dtype) times a :func:`pack_q4` weight [N, K] -> [M, N], slab by slab."""
    N = w.shape[0]
    K = w.shape[1] * 2
    step = _slab_rows(N, K)
    outs = [tiled_linear(x, dequant_q4(w[r:r + step], s[r:r + step], x.dtype)) for r in range(0, N, step)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def mm_q8(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """x [M, K] (compute dtype) times a :func:`pack_q8` weight [N, K] -> [M, N], slab by slab."""
    N, K = w.shape
    step = _slab_rows(N, K)
    outs = [tiled_linear(x, dequant_q8(w[r:r + step], d[r:r + step], x.dtype)) for r in range(0, N, step)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
