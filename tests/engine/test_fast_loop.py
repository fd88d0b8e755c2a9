"""Fast mode's TorchScript layer loop (engine.fast_loop) gives the bits the same loop gives as plain Python.

The scripted loop exists to cut interpreter overhead, not to change numbers: the graph executor's
optimizations are off, so each op is the aten kernel eager mode calls. Each case runs one engine twice on
the same tokens (prefill, 1-row decodes, a batched decode step of several sessions): once with the stage's
scripted loop, once with the same ``FastLoop`` left unscripted (its methods run as ordinary Python), and
compares every logit bit for bit. The cases cover each packed kind the loop dispatches (int4, q8blocks,
dense bf16), q/k norms, and an MoE model (scripted attention halves, experts from Python).
"""

from __future__ import annotations

import pytest
import torch

from mesh402.engine import Engine, qkernels
from mesh402.engine.fast_loop import FastLoop

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from tests.support.dense_models import SEQ, _hf_model, _write_gguf  # noqa: E402
from tests.support.engine import smollm2_gguf  # noqa: E402
from tests.support.moe_models import SEQ as MOE_SEQ  # noqa: E402
from tests.support.moe_models import hf_moe, write_moe_gguf  # noqa: E402


def _run(eng: Engine, seq: list[int]) -> list[torch.Tensor]:
    """Logits of a prefill, three 1-row decodes and two batched steps over three sessions."""
    ss = [eng.new_session(len(seq) + 16) for _ in range(3)]
    try:
        out = [ss[0].prefill(seq[:20]), ss[1].prefill(seq[5:8]), ss[2].prefill(seq[:33])]
        for t in seq[20:23]:
            out.append(ss[0].decode(t))
        for k in range(2):
            out.append(eng.decode_batch(ss, [seq[k], seq[k + 1], seq[k + 2]]))
        return out
    finally:
        for s in ss:
            s.close()


def _scripted_equals_eager(eng: Engine, seq: list[int]) -> None:
    assert all(st._all_fast for st in eng.stages), "the case must take the fast loop"
    scripted = _run(eng, seq)
    assert all(isinstance(st._fast_loop, torch.jit.ScriptModule) for st in eng.stages)
    for st in eng.stages:
        st._fast_loop = FastLoop(st)  # the same module, its methods run by the Python interpreter
    eager = _run(eng, seq)
    assert len(scripted) == len(eager)
    for a, b in zip(scripted, eager):
        assert torch.equal(a, b)
    assert any(not torch.equal(scripted[0], x) for x in scripted[1:])  # the case is not degenerate


def test_bundled_model_packed_4bit_layers() -> None:
    eng = Engine.load(smollm2_gguf(), mode="fast", max_sessions=4)
    native = qkernels.available()
    assert {lin.fast[0].kind for L in eng.stages[0].blocks for lin in (L.qkv, L.down)} == {"q4x8" if native else "int4"}
    assert eng.stages[0].head_fast.kind == ("q8x8" if native else "int8")  # Q8_0 head: block-exact natively
    seq = eng.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
    _scripted_equals_eager(eng, seq)


@pytest.mark.parametrize("arch,qname,kind", [("llama", "Q8_0", "q8blocks"), ("qwen3", "F32", "dense")])
def test_tiny_dense_models(arch, qname, kind, tmp_path) -> None:
    if kind == "q8blocks" and qkernels.available():
        kind = "q8x8"
    m = _hf_model(arch, rope_scaling=False)
    p = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(m, arch, p, gguf.GGMLQuantizationType[qname])
    eng = Engine.load(p, mode="fast", load_tokenizer=False)
    assert eng.stages[0].blocks[0].qkv.fast[0].kind == kind
    if arch == "qwen3":
        assert eng.stages[0].blocks[0].q_norm is not None
    _scripted_equals_eager(eng, SEQ)


def test_tiny_moe_model(tmp_path) -> None:
    m = hf_moe("qwen2moe")
    p = tmp_path / "tiny-qwen2moe.gguf"
    write_moe_gguf(m, "qwen2moe", p, "Q4_0")
    eng = Engine.load(p, mode="fast", load_tokenizer=False)
    assert eng.stages[0].moe_layers
    _scripted_equals_eager(eng, MOE_SEQ)


def test_repacked_stage_rebuilds_its_loop() -> None:
    """A stage whose blocks change after load (the harness's cheats do) runs the new blocks once told."""
    eng = Engine.load(smollm2_gguf(), mode="fast", max_sessions=4)
    st = eng.stages[0]
    ids = eng.tokenizer.encode("Hello there")
    before = _run(eng, ids * 12)[0]
    del st.blocks[3]
    st.repacked()
    after = _run(eng, ids * 12)[0]
    assert not torch.equal(before, after)


def test_row_by_row_fallback_equals_batched_rows() -> None:
    """Where the packed kernels are not row-independent the loop multiplies row by row (batched=False); on
    a CPU where they are, both ways give the same bits, so the fallback computes what a batch computes."""
    from mesh402.engine.batch import forward_rows

    eng = Engine.load(smollm2_gguf(), mode="fast", max_sessions=8, load_tokenizer=False)
    st = eng.stages[0]
    assert eng.rows_batched(3)

    def step(batched: bool) -> torch.Tensor:
        ss = [eng.new_session(64) for _ in range(3)]
        try:
            for i, s in enumerate(ss):
                s.prefill([5 + i, 17, 300 + i, 9][: i + 2])
            kvs = [s.kvs[0] for s in ss]
            return forward_rows(st, kvs, [len(s) for s in ss], torch.tensor([11, 12, 13]), batched=batched)
        finally:
            for s in ss:
                s.close()

    assert torch.equal(step(True), step(False))


def test_dense_fp16_weights_take_fp16_activations(tmp_path) -> None:
    """On an accelerator pack_fast keeps dense weights in fp16 (bf16 on CPU); the loop feeds each kernel its
    weights' dtype. The CPU twin: a tiny dense model's packed weights turned fp16 decode close to bf16's."""
    m = _hf_model("qwen3", rope_scaling=False)
    p = tmp_path / "tiny-qwen3.gguf"
    _write_gguf(m, "qwen3", p, gguf.GGMLQuantizationType.F32)
    eng = Engine.load(p, mode="fast", load_tokenizer=False)
    bf16 = _run(eng, SEQ)
    for st in eng.stages:
        for L in st.blocks:
            for lin in (L.qkv, L.wo, L.gate_up, L.down):
                k = lin.fast[0]
                k.w, k.dtype = k.w.to(torch.float16), torch.float16
                lin.fast_dtype = torch.float16
        st.repacked()
    fp16 = _run(eng, SEQ)  # a bf16 activation against an fp16 weight would raise here
    assert not torch.equal(bf16[0], fp16[0])
    for a, b in zip(bf16, fp16):
        assert torch.allclose(a, b, atol=0.15, rtol=0.05)


def test_fast_mode_does_not_compute_a_chunks_padding_rows() -> None:
    """A prompt's last chunk is padded to the chunk size (exact mode's GEMMs keep one shape). Fast mode's
    kernels are row-independent, so it runs only the real rows: the same bits as the unpadded rows, padding
    rows zero, nothing written past them; exact mode still computes its padding."""
    path = smollm2_gguf()
    toks = torch.tensor([1, 9690, 198, 2683, 359] + [0] * 27)  # 5 real tokens padded to a 32-row chunk
    for mode in ("fast", "exact"):
        eng = Engine.load(path, mode=mode, layers=(0, 10), load_tokenizer=False)
        with eng.new_session(64) as a, eng.new_session(64) as b:
            padded = a.forward(toks, 0, 5)
            alone = b.forward(toks[:5], 0, 5)
            assert padded.shape == (32, eng.config.hidden) and len(a) == 5
            for bad in (0, 33):  # an upstream's n_real out of [1, T]: refused before any KV is written
                with pytest.raises(ValueError):
                    a.forward(toks, 5, bad)
            assert len(a) == 5
            if mode == "fast":
                assert torch.equal(padded[:5], alone) and not padded[5:].any()
                assert torch.equal(a.kvs[0].k[:, :, :5], b.kvs[0].k[:, :, :5])
            else:
                assert padded[5:].abs().sum() > 0
