"""Fast mode's native CPU kernels (engine.qkernels, csrc/fast_kernels.cpp): the numbers the reference
implementation gives, each row's bits independent of the batch, the thread count and the row's place in it,
weights packed exactly, bad operands refused with an error, and torch's kernels serving where they are off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mesh402.engine import qkernels

ROOT = Path(__file__).resolve().parents[2]
native = pytest.mark.skipif(not qkernels.available(), reason="no AVX-512 VNNI CPU or no build here")

# shapes: K with whole 16-block groups only, with a tail only (< 16 blocks), and both; M across tile edges
SHAPES = [(1, 512, 64), (3, 576, 100), (8, 1536, 48), (9, 96, 40), (17, 160, 33), (1, 2048, 17), (5, 768, 40)]
# the q4 scale sections: fp16 scale and offset (Q4_1), scale alone (Q4_0), Q4_K's own (K a multiple of 256)
FORMS = ["ac", "a", "k"]
SHAPE_FORMS = [(*s, f) for s in SHAPES for f in FORMS if f != "k" or s[1] % 256 == 0]


def _q4(N: int, K: int, gen: torch.Generator, form: str = "ac") -> torch.Tensor:
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
    nb = K // 32
    if form == "k":
        sc, mn = (torch.randint(0, 64, (N, nb), dtype=torch.uint8, generator=gen) for _ in range(2))
        return qkernels.pack_q4_k(q, sc, mn, torch.rand(N, nb // 8, generator=gen) * 0.002,
                                  torch.rand(N, nb // 8, generator=gen) * 0.003)
    c = (torch.rand(N, nb, generator=gen) - 0.5) * 0.1 if form == "ac" else None
    return qkernels.pack_q4(q, torch.rand(N, nb, generator=gen) * 0.02, c)


def _q8(N: int, K: int, gen: torch.Generator) -> torch.Tensor:
    q = torch.randint(-127, 128, (N, K), generator=gen)
    return qkernels.pack_q8(q, torch.rand(N, K // 32, generator=gen) * 0.01)


def _x(M: int, K: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(M, K, generator=gen) * (torch.rand(M, 1, generator=gen) * 4)
    x[0, :32] = 0.0  # an all-zero block (scale 0) must not turn into NaN
    x[-1, 5] = 40.0  # an outlier
    return x


def test_cpu_flags_parse() -> None:
    flags = "avx512f avx512bw avx512vl avx512dq avx512_vnni f16c fma sse2"
    assert qkernels.cpu_flags_ok(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert not qkernels.cpu_flags_ok("flags\t\t: avx2 fma f16c\n")
    assert not qkernels.cpu_flags_ok("model name: something\n")


def test_pack_round_trips() -> None:
    gen = torch.Generator().manual_seed(1)
    for K in (96, 512, 576, 1536):
        q = torch.randint(0, 16, (3, K), dtype=torch.uint8, generator=gen)
        a, c = torch.randn(3, K // 32, generator=gen), torch.randn(3, K // 32, generator=gen)
        uq, ua, uc = qkernels._unpack_q4(qkernels.pack_q4(q, a, c), K)
        assert torch.equal(uq.reshape(3, K), q)
        assert torch.equal(ua, a.half().float()) and torch.equal(uc, c.half().float())
        w0 = qkernels.pack_q4(q, a, None)  # Q4_0: the scale alone, offset -8 scale
        assert w0.shape[1] == K // 2 + K // 16
        uq, ua, uc = qkernels._unpack_q4(w0, K)
        assert torch.equal(uq.reshape(3, K), q) and torch.equal(ua, a.half().float()) and torch.equal(uc, -8 * ua)
        if K % 256 == 0:  # Q4_K: 6-bit scales and mins, fp16 factors per 8 blocks
            sc, mn = (torch.randint(0, 64, (3, K // 32), dtype=torch.uint8, generator=gen) for _ in range(2))
            d, dm = torch.rand(3, K // 256, generator=gen), torch.rand(3, K // 256, generator=gen)
            wk = qkernels.pack_q4_k(q, sc, mn, d, dm)
            assert wk.shape[1] == K // 2 + K // 16 + K // 64
            uq, ua, uc = qkernels._unpack_q4(wk, K)
            assert torch.equal(uq.reshape(3, K), q)
            assert torch.equal(ua, d.half().float().repeat_interleave(8, 1) * sc.float())
            assert torch.equal(uc, -(dm.half().float().repeat_interleave(8, 1) * mn.float()))
        q8 = torch.randint(-127, 128, (3, K), generator=gen)
        u8, d = qkernels._unpack_q8(qkernels.pack_q8(q8, a.abs()))
        assert torch.equal(u8.reshape(3, K), q8.to(torch.int32)) and torch.equal(d, a.abs().half())


@native
@pytest.mark.parametrize("M,K,N,form", SHAPE_FORMS)
def test_matmuls_match_the_reference(M, K, N, form) -> None:
    gen = torch.Generator().manual_seed(M * 1000 + K + N)
    x = _x(M, K, gen)
    for op, ref, w in ((torch.ops.mesh402.q4q8_mm, qkernels.ref_q4q8_mm, _q4(N, K, gen, form)),
                       (torch.ops.mesh402.q8q8_mm, qkernels.ref_q8q8_mm, _q8(N, K, gen))):
        y, r = op(x, w), ref(x, w)
        assert not torch.isnan(y).any()
        assert ((y - r).abs().max() / r.abs().max()).item() < 1e-5


@native
@pytest.mark.parametrize("M,K,N,form", SHAPE_FORMS)
def test_each_row_is_batch_and_thread_invariant(M, K, N, form) -> None:
    gen = torch.Generator().manual_seed(7 + M + K)
    x = _x(M, K, gen)
    threads = torch.get_num_threads()
    try:
        for op, w in ((torch.ops.mesh402.q4q8_mm, _q4(N, K, gen, form)), (torch.ops.mesh402.q8q8_mm, _q8(N, K, gen))):
            torch.set_num_threads(1)
            full = op(x, w)
            torch.set_num_threads(2)
            assert torch.equal(op(x, w), full)
            for i in range(M):  # alone, and at another place in another batch
                assert torch.equal(op(x[i:i + 1].contiguous(), w), full[i:i + 1])
                other = torch.cat((torch.randn(2, K, generator=gen), x[i:i + 1]))
                assert torch.equal(op(other, w)[2:], full[i:i + 1])
    finally:
        torch.set_num_threads(threads)


@native
def test_a_non_finite_row_stays_non_finite_and_alone() -> None:
    """A NaN or inf from a hostile or broken upstream reaches that row's output as non-finite (so the
    sampler and the pipeline refuse it), and every other row of the batch keeps its bits."""
    gen = torch.Generator().manual_seed(11)
    x = _x(4, 576, gen)
    for op, w in ((torch.ops.mesh402.q4q8_mm, _q4(24, 576, gen)), (torch.ops.mesh402.q8q8_mm, _q8(24, 576, gen))):
        clean = op(x, w)
        bad = x.clone()
        bad[1, 40] = float("nan")
        bad[2, 3] = float("inf")
        y = op(bad, w)
        assert torch.isnan(y[1]).all() and not torch.isfinite(y[2]).any()
        assert torch.equal(y[0], clean[0]) and torch.equal(y[3], clean[3])


def _attn_case(B: int, nh: int, nkv: int, hd: int, cap: int, gen: torch.Generator):
    qk = torch.randn(B, nh + nkv, hd, generator=gen)
    qkv_v = torch.randn(B, nkv * hd + 7, generator=gen)[:, 7:]  # a strided view, as the loop passes it
    ks = [torch.randn(2, nkv, cap, hd, generator=gen) for _ in range(B)]  # two layers; the calls use layer 1
    vs = [torch.randn(2, nkv, cap, hd, generator=gen) for _ in range(B)]
    pos = [int(p) for p in torch.randint(0, cap, (B,), generator=gen)]
    pos[0] = 0
    return qk, qkv_v, ks, vs, pos


@native
@pytest.mark.parametrize("nh,nkv,hd", [(9, 3, 64), (8, 8, 128), (32, 8, 64), (4, 1, 80)])
def test_decode_attention_matches_the_library_and_is_row_independent(nh, nkv, hd) -> None:
    gen = torch.Generator().manual_seed(nh + hd)
    qk, v, ks, vs, pos = _attn_case(5, nh, nkv, hd, 300, gen)
    k2, v2 = [k.clone() for k in ks], [x.clone() for x in vs]
    out = torch.ops.mesh402.attn_decode_rows(qk, v, ks, vs, pos, 1)
    ref = qkernels.ref_attn_decode_rows(qk, v, k2, v2, pos, 1)
    assert all(torch.equal(a, b) for a, b in zip(ks, k2)) and all(torch.equal(a, b) for a, b in zip(vs, v2))
    assert (out - ref).abs().max().item() < 1e-5
    for i in range(5):  # one row alone: the same bits (the K/V it writes are the same values again)
        alone = torch.ops.mesh402.attn_decode_rows(qk[i:i + 1], v[i:i + 1], [ks[i]], [vs[i]], [pos[i]], 1)
        assert torch.equal(alone, out[i:i + 1])


@native
def test_bad_operands_are_refused_not_run() -> None:
    gen = torch.Generator().manual_seed(3)
    w = _q4(16, 576, gen)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.mesh402.q4q8_mm(torch.randn(1, 512), w)
    with pytest.raises(RuntimeError, match="columns"):
        torch.ops.mesh402.q4q8_mm(torch.randn(1, 575), w)
    with pytest.raises(RuntimeError, match="bytes a row"):
        torch.ops.mesh402.q4q8_mm(torch.randn(1, 576), w[:, :-3].contiguous())
    with pytest.raises(RuntimeError, match="fp32"):
        torch.ops.mesh402.q4q8_mm(torch.randn(1, 576, dtype=torch.float64), w)
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.mesh402.q8q8_mm(torch.randn(1, 576), torch.zeros(16, 611, dtype=torch.uint8))
    qk, v, ks, vs, _ = _attn_case(1, 9, 3, 64, 16, gen)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.mesh402.attn_decode_rows(qk, v, ks, vs, [16], 0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.mesh402.attn_decode_rows(qk, v, ks, vs, [-1], 0)
    with pytest.raises(RuntimeError, match="layer 2 outside"):
        torch.ops.mesh402.attn_decode_rows(qk, v, ks, vs, [1], 2)
    with pytest.raises(RuntimeError, match="one cache pair"):
        torch.ops.mesh402.attn_decode_rows(qk, v, ks, vs, [1, 2], 0)
    with pytest.raises(RuntimeError, match="cache shape"):
        torch.ops.mesh402.attn_decode_rows(qk, v, [torch.zeros(1, 3, 16, 32)], [torch.zeros(1, 3, 16, 32)], [1], 0)


_FALLBACK = """
import json, torch
from mesh402.engine import Engine, qkernels
from mesh402.engine.replay import device_signature
from tests.support.engine import smollm2_gguf
eng = Engine.load(smollm2_gguf(), mode="fast", max_sessions=4, load_tokenizer=False)
kinds = sorted({lin.fast[0].kind for L in eng.stages[0].blocks for lin in (L.qkv, L.wo, L.gate_up, L.down)})
ss = [eng.new_session(64) for _ in range(3)]
for i, s in enumerate(ss):
    s.prefill([5 + i, 17, 300 + i, 9][: i + 2])
print(json.dumps({"native": qkernels.available(), "kinds": kinds, "head": eng.stages[0].head_fast.kind,
                  "signature": device_signature("cpu"), "batched": eng.rows_batched(3),
                  "native_attn": eng.stages[0].fast_loop().native_attn}))
"""


def test_torch_kernels_serve_where_the_native_ones_are_off() -> None:
    """MESH402_CPU_KERNELS=0 (as on a CPU without AVX-512 VNNI or a compiler): fast mode packs for torch's
    int4 / int8 kernels, the loop compiles against the reference op definitions, batching stays row-exact,
    and the device signature names the other kernel set."""
    env = {**os.environ, "MESH402_CPU_KERNELS": "0", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _FALLBACK], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["native"] is False and r["native_attn"] is False
    assert r["kinds"] == ["int4"] and r["head"] == "int8"
    assert r["signature"].endswith(":k2-int4g32-q8blk-int8head")
    assert r["batched"] is True
    if qkernels.available():
        from mesh402.engine.replay import device_signature

        assert device_signature("cpu").endswith(":k4-vnni-q4q8-q8q8-attn1")
