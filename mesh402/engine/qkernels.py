"""Fast mode's CPU kernels (``csrc/fast_kernels.cpp``): built once per machine, loaded as torch ops.

``torch.ops.mesh402.q4q8_mm`` (4-bit weight blocks) and ``torch.ops.mesh402.q8q8_mm`` (8-bit weight blocks)
multiply fp32 activations, quantized per block of 32 to two int8 planes (~16 bits), by weights packed by
``quant.pack_fast``, with the block dot products in integer arithmetic (AVX-512 VNNI).
``torch.ops.mesh402.attn_decode_rows`` writes decode rows' K and V into their sessions' caches and attends
over them. Every output element is computed from its own activation row (and weight row) alone, by the same
operations whatever runs beside it (batch- and thread-invariant: the contract fast mode's exactness rests
on; see the source's header).

They are used where the CPU has AVX-512 VNNI and the build works (a C++ compiler and ninja; ~10 s, once,
cached per source, flags, torch and Python version); elsewhere fast mode keeps torch's own int4 / int8
kernels, and the device signature of the verification evidence names which set ran (:func:`kernel_set`).
``MESH402_CPU_KERNELS=0`` turns them off. Where they are off, the same op names are defined with the
reference implementations below (pure torch, slow) so the TorchScript layer loop compiles either way and
tests can check the kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

import torch

from . import accel

__all__ = ["available", "ensure_ops", "kernel_set", "pack_q4", "pack_q4_k", "pack_q8", "ref_q4q8_mm", "ref_q8q8_mm",
           "ref_attn_decode_rows", "cpu_flags_ok"]

log = logging.getLogger(__name__)

QK = 32
_SRC = Path(__file__).with_name("csrc") / "fast_kernels.cpp"
_ISA = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mf16c", "-mfma"]
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", *_ISA]  # no contraction: the fp32 order is the source's
_NEEDED_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma"}

_lock = threading.Lock()
# Module state on purpose: torch's operator registry is process-wide, so whether this process's
# torch.ops.mesh402.* are the native ops or the references is a fact about the process, decided once.
_state: dict[str, bool] = {}  # "native": True if the C++ ops are loaded, False if the references are defined


def cpu_flags_ok(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has what the kernels are compiled for (Linux /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return _NEEDED_FLAGS <= set(line.split(":", 1)[1].split())
    return False


def _build_dir() -> Path:
    what = [" ".join(_CFLAGS), torch.__version__, sys.version]
    tag = hashlib.sha256(_SRC.read_bytes() + "\n".join(what).encode()).hexdigest()[:16]
    root = os.environ.get("MESH402_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mesh402", "kernels")
    d = Path(root) / tag
    d.mkdir(parents=True, exist_ok=True)
    return d


def _load_native() -> bool:
    if os.environ.get("MESH402_CPU_KERNELS", "1") == "0" or not cpu_flags_ok():
        return False
    try:
        from torch.utils.cpp_extension import load

        # cpp_extension serialises concurrent builds of one directory (a lock file), so node processes
        # starting together build once.
        load(name="mesh402_fast_kernels", sources=[str(_SRC)], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
             build_directory=str(_build_dir()), is_python_module=False, verbose=False)
        return True
    except Exception as e:  # noqa: BLE001 - no compiler, no headers: torch's own kernels serve instead
        log.warning("fast mode's VNNI kernels unavailable (%s); using torch's int4/int8 kernels", e)
        return False


def ensure_ops() -> bool:
    """Define ``torch.ops.mesh402.*`` (native where possible, else the reference); True if native."""
    with _lock:
        if "native" not in _state:
            native = _load_native()
            if not native:
                lib = torch.library.Library("mesh402", "DEF")  # noqa: TID251 - kept alive below
                lib.define("q4q8_mm(Tensor x, Tensor w) -> Tensor")
                lib.define("q8q8_mm(Tensor x, Tensor w) -> Tensor")
                lib.impl("q4q8_mm", ref_q4q8_mm, "CompositeExplicitAutograd")
                lib.impl("q8q8_mm", ref_q8q8_mm, "CompositeExplicitAutograd")
                lib.define("attn_decode_rows(Tensor qk, Tensor v, Tensor(a!)[] kcs, Tensor(b!)[] vcs, int[] pos,"
                           " int layer) -> Tensor")
                lib.impl("attn_decode_rows", ref_attn_decode_rows, "CompositeExplicitAutograd")
                _libs.append(lib)
            _state["native"] = native
        return _state["native"]


_libs: list[torch.library.Library] = []  # a Library object unregisters its ops when collected


def available() -> bool:
    """Whether pack_fast uses these kernels in this process (native build loaded)."""
    return ensure_ops()


def kernel_set(device_type: str = "cpu") -> str:
    """The fast kernels this process runs on a device kind, for the device signature of the verification
    evidence (bump a name whenever its numbers change): the native set (4- and 8-bit blocks with two-plane
    int8 activations, one-call decode attention) or torch's (int4 group-32 layers, Q8_0 layers block-exact, a
    per-row int8 LM head); on accelerators and the CPU twin, engine.accel's dequantize-on-the-fly set."""
    twin = accel.kernel_set(device_type)  # accelerators, or their CPU twin where asked for
    if twin is not None:
        return twin
    return "k4-vnni-q4q8-q8q8-attn1" if available() else "k2-int4g32-q8blk-int8head"


# -- reference implementations (pure torch): the same numbers, for tests and machines without the build --

def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x fp32 [M, K] -> the kernels' activation quants [M, K/32, 32] (q1 + q2 / 256, as fp32: exact) and
    per-block scales [M, K/32] (max|x| / 127): t = x * 127 / max|x|, q1 = round(t), q2 = round(256 (t - q1))."""
    M, K = x.shape
    xb = x.reshape(M, K // QK, QK)
    bad = ~torch.isfinite(xb).all(dim=-1)  # a non-finite block: quants 0, scale NaN (as the kernel)
    xb = torch.where(bad.unsqueeze(-1), torch.zeros_like(xb), xb)
    amax = xb.abs().amax(dim=-1)
    d = torch.where(bad, torch.full_like(amax, float("nan")), amax / 127.0)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    t = xb * inv.unsqueeze(-1)
    q1 = torch.round(t).clamp_(-128, 127)  # round half to even, as cvtps2dq
    q2 = torch.round((t - q1) * 256.0).clamp_(-128, 127)
    return q1 + q2 / 256.0, d


_GB = 16  # blocks per group in the kernels' layout (one int32 lane per block)


def _q4_quants(q: torch.Tensor) -> torch.Tensor:
    """Quants q in [0, 16) uint8 [N, K] -> the row's quant bytes [N, K/2]: groups of 16 blocks, 256 bytes each
    (vector v (64 bytes), lane l = block l, byte k holds quant 4v + k (low nibble) and 16 + 4v + k (high)), then
    the tail's blocks, 16 bytes each (byte i: quant i | quant 16 + i << 4)."""
    N, K = q.shape
    nb = K // QK
    G = nb // _GB
    qb = q.reshape(N, nb, QK)
    full = qb[:, :G * _GB].reshape(N, G, _GB, 2, 4, 4)  # [N, g, lane, half, v, k]
    nib = (full[:, :, :, 0] | (full[:, :, :, 1] << 4)).permute(0, 1, 3, 2, 4).reshape(N, G * 256)
    return torch.cat((nib, accel.block_nibbles(qb[:, G * _GB:])), dim=1)


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def pack_q4(q: torch.Tensor, a: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """q4q8_mm's weight rows from quants q in [0, 16) uint8 [N, K] and per-block a, c [N, K/32] (w = a * q + c):
    the quant bytes (:func:`_q4_quants`), then a and c as fp16 (Q4_1: uint8 [N, K/2 + K/8]); with ``c`` None,
    c = -8 a and only a is kept (Q4_0: [N, K/2 + K/16])."""
    parts = [_q4_quants(q), _u8(a.half())]
    if c is not None:
        parts.append(_u8(c.half()))
    return torch.cat(parts, dim=1).contiguous()


def pack_q4_k(q: torch.Tensor, sc: torch.Tensor, mn: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor
              ) -> torch.Tensor:
    """q4q8_mm's rows of a Q4_K weight, its scales as the file has them: quants [N, K], 6-bit scales and mins
    uint8 [N, K/32], fp16 d and dmin [N, K/256]; a = d * sc, c = -(dmin * mn) (exact in fp32).
    uint8 [N, K/2 + K/16 + K/64]: 2.5 bytes of scales a block, not 4."""
    parts = [_q4_quants(q), sc.to(torch.uint8), mn.to(torch.uint8), _u8(d.half()), _u8(dmin.half())]
    return torch.cat(parts, dim=1).contiguous()


def pack_q8(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """q8q8_mm's weight rows from int8 quants [N, K] and fp16 scales [N, K/32]: uint8 [N, K + K/16].
    Groups of 16 blocks, 512 bytes each: vector v, lane l = block l, quants 4v..4v+3 (+128); then the tail's
    blocks, 32 bytes each; then the scales."""
    N, K = q.shape
    nb = K // QK
    G = nb // _GB
    u = (q.to(torch.int16) + 128).to(torch.uint8).reshape(N, nb, QK)
    full = u[:, :G * _GB].reshape(N, G, _GB, 8, 4).permute(0, 1, 3, 2, 4).reshape(N, G * 512)
    tail = u[:, G * _GB:].reshape(N, -1)
    return torch.cat((full, tail, d.half().contiguous().view(torch.uint8)), dim=1).contiguous()


def _unpack_q4(w: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q4q8_mm's rows for K columns -> quants [N, K/32, 32] and fp32 a, c [N, K/32] (the kernel's values)."""
    N, B = w.shape
    nb = K // QK
    G = nb // _GB
    full = w[:, :G * 256].reshape(N, G, 4, _GB, 4).permute(0, 1, 3, 2, 4)  # [N, g, lane, v, k]
    fq = torch.stack((full & 0x0F, full >> 4), dim=3).reshape(N, G * _GB, QK)  # [.., half, v, k] -> 32 quants
    tail = w[:, G * 256:K // 2].reshape(N, nb - G * _GB, 16)
    tq = torch.cat((tail & 0x0F, tail >> 4), dim=-1)
    s = w[:, K // 2:]

    def f16(lo: int, n: int) -> torch.Tensor:
        return s[:, lo:lo + 2 * n].contiguous().view(torch.float16).float()

    if B == K // 2 + 4 * nb:
        a, c = f16(0, nb), f16(2 * nb, nb)
    elif B == K // 2 + 2 * nb:
        a = f16(0, nb)
        c = a * -8.0
    elif nb % 8 == 0 and 2 * B == K + 5 * nb:
        d, dmin = f16(2 * nb, nb // 8), f16(2 * nb + nb // 4, nb // 8)
        a = d.repeat_interleave(8, dim=1) * s[:, :nb].float()
        c = 0.0 - dmin.repeat_interleave(8, dim=1) * s[:, nb:2 * nb].float()
    else:
        raise ValueError(f"no 4-bit layout of {K} columns has {B} bytes a row")
    return torch.cat((fq, tq), dim=1), a, c


def _unpack_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    N, B = w.shape
    K = B // 34 * 32
    nb = K // QK
    G = nb // _GB
    full = w[:, :G * 512].reshape(N, G, 8, _GB, 4).permute(0, 1, 3, 2, 4).reshape(N, G * _GB, QK)
    tail = w[:, G * 512:K].reshape(N, nb - G * _GB, QK)
    q = torch.cat((full, tail), dim=1).to(torch.int32) - 128
    return q, w[:, K:].contiguous().view(torch.float16)


def ref_q4q8_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reference for ``q4q8_mm`` (fp64 sums of exact integer block dots; agrees to fp32 rounding)."""
    q, d = _quantize_rows(x.float())
    wq, a, c = _unpack_q4(w, x.shape[1])  # [N, nb, 32]
    sumi = torch.einsum("mbk,nbk->mnb", q.double(), wq.double())
    dd = d.double()
    y = (sumi * (a.double().unsqueeze(0) * dd.unsqueeze(1))).sum(-1)
    y += (dd * q.double().sum(-1)) @ c.double().t()
    return y.float()


def ref_q8q8_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Reference for ``q8q8_mm``."""
    q, dx = _quantize_rows(x.float())
    wq, d = _unpack_q8(w)
    sumi = torch.einsum("mbk,nbk->mnb", q.double(), wq.double())
    return (sumi * (d.double().unsqueeze(0) * dx.double().unsqueeze(1))).sum(-1).float()


def ref_attn_decode_rows(qk: torch.Tensor, v: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor],
                         pos: list[int], layer: int) -> torch.Tensor:
    """Reference for ``attn_decode_rows`` (the library's attention; agrees to fp32 rounding)."""
    kcs, vcs = [k[layer] for k in ks], [x[layer] for x in vs]
    nkv, _cap, hd = kcs[0].shape
    nh = qk.shape[1] - nkv
    outs = []
    for b, p in enumerate(pos):
        kcs[b][:, p] = qk[b, nh:]
        vcs[b][:, p] = v[b].view(nkv, hd)
        o = torch.nn.functional.scaled_dot_product_attention(qk[b, :nh].unsqueeze(1)[None], kcs[b][None, :, :p + 1],
                                                             vcs[b][None, :, :p + 1], enable_gqa=nh != nkv)
        outs.append(o.reshape(1, nh * hd))
    return torch.cat(outs)
