"""Our torch dequantization equals gguf-py's bit for bit, read from a synthetic GGUF file."""
import numpy as np
import pytest
import torch

import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as GT

from mesh402.engine import accel, qkernels
from mesh402.engine.quant import SUPPORTED_TYPES, _q4_affine, _q4x8_rows, from_raw, pack_fast
from mesh402.engine.weights import MappedRows
from mesh402.models.gguf_meta import read_gguf_meta
from harness.tiny_gguf import finish_gguf
from tests.support.engine import accel_device

torch.set_num_threads(1)

ROWS, COLS = 48, 512
QUANTIZABLE = [GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1, GT.Q8_0, GT.BF16]  # gguf.quants.quantize supports these
RANDOM_BLOCKS = {GT.Q4_K: (0, 2), GT.Q5_K: (0, 2), GT.Q6_K: (208,)}  # fp16 scale offsets in a block


def _random_blocks(rng, g):
    bs, ts = GGML_QUANT_SIZES[g]
    raw = rng.integers(0, 256, (ROWS, COLS // bs, ts), dtype=np.uint8)
    for off in RANDOM_BLOCKS[g]:  # keep the fp16 scales finite
        d = rng.uniform(-0.05, 0.05, (ROWS, COLS // bs)).astype(np.float16)
        raw[..., off:off + 2] = d.view(np.uint8).reshape(ROWS, COLS // bs, 2)
    return raw.reshape(ROWS, -1)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("q") / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for g in QUANTIZABLE:
        a = rng.standard_normal((ROWS, COLS)).astype(np.float32)
        w.add_tensor(f"t.{g.name}", gguf.quants.quantize(a, g), raw_dtype=g)
    for g in RANDOM_BLOCKS:
        w.add_tensor(f"t.{g.name}", _random_blocks(rng, g), raw_dtype=g)
    w.add_tensor("t.F32", rng.standard_normal((ROWS, COLS)).astype(np.float32))
    w.add_tensor("t.F16", rng.standard_normal((ROWS, COLS)).astype(np.float16))
    finish_gguf(w)
    return path


def _ours(path, name):
    meta = read_gguf_meta(path)
    t = meta.tensor(name)
    with open(path, "rb") as f:
        f.seek(t.offset)
        raw = torch.frombuffer(bytearray(f.read(t.n_bytes)), dtype=torch.uint8)
    return from_raw(raw, t.ggml_type, t.shape)


@pytest.mark.parametrize("g", QUANTIZABLE + list(RANDOM_BLOCKS) + [GT.F32, GT.F16])
def test_dequant_bit_exact(gguf_file, g):
    assert g in SUPPORTED_TYPES
    r = gguf.GGUFReader(gguf_file)
    t = next(x for x in r.tensors if x.name == f"t.{g.name}")
    ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ROWS, COLS).astype(np.float32)
    qw = _ours(gguf_file, f"t.{g.name}")
    out = qw.dequant().numpy()
    assert out.shape == (ROWS, COLS)
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))
    rows = torch.tensor([3, 0, 47, 3])  # row gather (embedding lookup) is exact too
    assert np.array_equal(qw.dequant(rows).numpy().view(np.uint32), ref[rows.numpy()].view(np.uint32))
    # raw blocks are kept quantized: memory equals the file's bytes (K-quant scales unpacked: +4 B/256)
    assert qw.nbytes <= t.n_bytes * 1.03
    # the same rows looked up from the file's pages (an embedding table that is not held) are bit-identical
    mapped = MappedRows(gguf_file, read_gguf_meta(gguf_file).tensor(f"t.{g.name}"))
    assert torch.equal(mapped.dequant(rows).view(torch.int32), qw.dequant(rows).view(torch.int32))
    with pytest.raises(IndexError):
        mapped.dequant(torch.tensor([0, ROWS]))


@pytest.mark.parametrize("block_exact", [True, False])  # False: the LM head's packing (one per-row int8 call)
@pytest.mark.parametrize("g", [GT.Q4_0, GT.Q4_1, GT.Q4_K, GT.Q8_0, GT.Q6_K])
def test_fast_pack_close(gguf_file, g, block_exact):
    qw = _ours(gguf_file, f"t.{g.name}")
    fw = pack_fast(qw, block_exact=block_exact)
    q4 = g in (GT.Q4_0, GT.Q4_1, GT.Q4_K)
    if qkernels.available():  # the native kernels keep blocks: 4-bit as they are, others as 8-bit blocks
        assert fw.kind == ("q4x8" if q4 else "q8x8")
    else:
        q8 = "q8blocks" if block_exact else "int8"
        assert fw.kind == ("int4" if q4 else q8 if g == GT.Q8_0 else "int8")
    x = torch.randn(4, COLS)
    ref = x @ qw.dequant().T
    got = fw(x.to(fw.dtype)).float()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.02, rel



@pytest.mark.parametrize("g", [GT.Q4_0, GT.Q4_1, GT.Q4_K])
def test_q4_blocks_packed_for_the_native_kernel_are_the_file_weight(gguf_file, g):
    """a * q + c of the native kernel's packed blocks is the GGUF weight exactly, each type's scales kept in
    their own form (Q4_1 fp16 scale and offset, Q4_0 the scale alone, Q4_K 6-bit scales and mins with fp16
    super-block factors), and no more bytes than the file's."""
    qw = _ours(gguf_file, f"t.{g.name}")
    q, a, c = _q4_affine(qw, 0, ROWS)
    deq = qw.dequant()
    assert torch.equal((a.unsqueeze(-1) * q.reshape(ROWS, -1, 32).float() + c.unsqueeze(-1)).reshape(ROWS, COLS), deq)
    w = _q4x8_rows(qw, 0, ROWS)
    assert w.shape[1] * ROWS <= qw.nbytes
    uq, ua, uc = qkernels._unpack_q4(w, COLS)
    packed = (ua.unsqueeze(-1) * uq.float() + uc.unsqueeze(-1)).reshape(ROWS, COLS)
    assert torch.equal(packed, deq)


@pytest.mark.skipif(not qkernels.available(), reason="no native kernels here")
@pytest.mark.parametrize("g,kind", [(GT.Q4_1, "q4x8"), (GT.Q4_K, "q4x8"), (GT.Q8_0, "q8x8"), (GT.Q6_K, "q8x8"),
                                    (GT.Q5_0, "q8x8")])
def test_native_kinds_keep_blocks(gguf_file, g, kind):
    """Q8_0 is packed as it is (quants and fp16 scales exact); 5- and 6-bit types become 8-bit blocks."""
    qw = _ours(gguf_file, f"t.{g.name}")
    fw = pack_fast(qw)
    assert fw.kind == kind and fw.scales is None and fw.dtype == torch.float32
    if g == GT.Q8_0:
        q, d = qkernels._unpack_q8(fw.w)
        assert torch.equal(q.reshape(ROWS, COLS), qw.parts["qs"].reshape(ROWS, COLS).to(torch.int32))
        assert torch.equal(d, qw.parts["d"])
    if kind == "q8x8" and g != GT.Q8_0:  # per-32-block int8: much closer than a per-row int8 requantization
        q, d = qkernels._unpack_q8(fw.w)
        back = (q.float() * d.float().unsqueeze(-1)).reshape(ROWS, COLS)
        ref = qw.dequant()
        assert ((back - ref).norm() / ref.norm()).item() < 0.01


@pytest.mark.parametrize("g,kind", [(GT.Q4_0, "q4dq"), (GT.Q4_1, "q4dq"), (GT.Q4_K, "q4dq"), (GT.Q8_0, "q8dq"),
                                    (GT.Q6_K, "q8dq"), (GT.F16, "densetile")])
def test_accel_blocks_are_the_file_weight(gguf_file, g, kind, monkeypatch):
    """Fast mode's accelerator path (engine.accel; its CPU twin unless MESH402_TEST_DEVICE names a GPU) keeps
    the blocks: dequantized they are the GGUF weight (Q4_0 / Q4_1 / Q8_0 exactly, Q4_K with its scale products
    rounded to fp16, 6-bit types as 8-bit blocks), and its matmul matches the exact one."""
    dev = accel_device(monkeypatch)
    qw = _ours(gguf_file, f"t.{g.name}")
    fw = pack_fast(qw, dev)
    assert fw.kind == kind and fw.w.device.type == torch.device(dev).type
    assert fw.nbytes <= {"q4dq": 0.63, "q8dq": 1.07, "densetile": 4}[kind] * ROWS * COLS
    deq = qw.dequant()
    if kind == "q4dq":
        back = accel.dequant_q4(fw.w, fw.scales, torch.float32).cpu()
        if g == GT.Q4_K:  # each of a and c off by at most half an fp16 ulp (2^-11 relative)
            _, a, c = _q4_affine(qw, 0, ROWS)
            bound = (2.0 ** -11) * (15 * a.abs() + c.abs()) * 1.01
            assert ((back - deq).abs().reshape(ROWS, -1, 32) <= bound.unsqueeze(-1)).all()
        else:
            assert torch.equal(back, deq)
    elif kind == "q8dq":
        back = accel.dequant_q8(fw.w, fw.scales, torch.float32).cpu()
        if g == GT.Q8_0:
            assert torch.equal(back, deq)
        else:
            assert ((back - deq).norm() / deq.norm()).item() < 0.01
    x = torch.randn(5, COLS)
    ref = x @ deq.T
    got = fw(x.to(device=fw.w.device, dtype=fw.dtype)).float().cpu()
    assert got.shape == (5, ROWS)
    assert ((got - ref).norm() / ref.norm()).item() < (0.01 if fw.dtype == torch.float32 else 0.02)
