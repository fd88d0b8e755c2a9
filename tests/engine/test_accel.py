"""Fast mode's accelerator path (engine.accel): 4- and 8-bit blocks dequantized on the fly, every matmul on
fixed tiles of rows. It runs on its CPU twin here (fp32 compute, ``MESH402_FAST_KERNELS=twin``) and on the GPU
that MESH402_TEST_DEVICE names when benchmarks/device.sh runs these tests on a GPU machine. Batched decode,
stage batches and speculative rows on this path are in test_batch.py ("accel"); packing in test_dequant.py."""

from __future__ import annotations

import pytest
import torch

from harness.tamper import stage_outputs, upstream_inputs
from mesh402.engine import Engine, accel, qkernels
from mesh402.engine.activations import decode_activations, encode_activations
from mesh402.engine.replay import device_signature, replay
from tests.support.engine import accel_device, smollm2_gguf


def test_tiled_linear_gives_each_row_its_bits_alone_or_beside_any_rows(monkeypatch) -> None:
    """Every GEMM call has TILE rows (zero-padded), so a row's sums do not depend on how many rows share the
    call, nor on its slot; a prefill-sized block spans several tiles."""
    dev = accel_device(monkeypatch)
    dt = accel.compute_dtype(torch.device(dev))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 576, generator=g).to(device=dev, dtype=dt)
    x = torch.randn(40, 576, generator=g).to(device=dev, dtype=dt)
    alone = torch.cat([accel.tiled_linear(x[i:i + 1], w) for i in range(40)])
    assert torch.equal(accel.tiled_linear(x, w), alone)
    for m in (2, 7, 16, 17, 33):
        assert torch.equal(accel.tiled_linear(x[:m], w), alone[:m])
    perm = torch.randperm(40, generator=g)
    assert torch.equal(accel.tiled_linear(x[perm], w), alone[perm])
    ref = x.double() @ w.double().T
    assert ((alone.double() - ref).norm() / ref.norm()).item() < (1e-6 if dt == torch.float32 else 1e-3)


def test_weights_larger_than_a_slab_are_multiplied_slab_by_slab(monkeypatch) -> None:
    """A weight of more values than one slab is dequantized a slab of rows at a time (bounded temporaries);
    the result is the whole weight's product."""
    dev = accel_device(monkeypatch)
    dt = accel.compute_dtype(torch.device(dev))
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (3000, 2048), dtype=torch.uint8, generator=g)
    a, c = torch.rand(3000, 64, generator=g) * 0.01, torch.rand(3000, 64, generator=g) * -0.08
    w, s = (t.to(dev) for t in accel.pack_q4(q, a, c))
    assert w.shape[0] * 2048 > accel.SLAB  # two slabs
    x = torch.randn(3, 2048, generator=g).to(device=dev, dtype=dt)
    whole = accel.tiled_linear(x, accel.dequant_q4(w, s, dt))
    assert torch.allclose(accel.mm_q4(x, w, s).float(), whole.float(), rtol=1e-3, atol=1e-3)


def test_engine_on_the_accel_path_names_it_and_agrees_with_exact_mode(monkeypatch) -> None:
    """The bundled model's layers and head are packed for the path, the device signature of the verification
    evidence names the kernel set, and greedy decoding agrees with exact mode (top-1 at every step)."""
    dev = accel_device(monkeypatch)
    eng = Engine.load(smollm2_gguf(), mode="fast", device=dev, max_sessions=2)
    st = eng.stages[0]
    assert st.accel and {lin.fast[0].kind for L in st.blocks for lin in (L.qkv, L.down)} == {"q4dq"}
    assert st.head_fast.kind == "q8dq" and not st.fast_loop().native_attn
    name = accel.kernel_set(torch.device(dev).type)
    assert name and device_signature(dev).endswith(":" + name)
    exact = Engine.load(smollm2_gguf(), mode="exact", max_sessions=2, load_tokenizer=False)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    ids = eng.tokenizer.encode(eng.chat_template.render(question))

    def greedy(e: Engine, n: int = 6) -> tuple[list[int], torch.Tensor]:
        with e.new_session(len(ids) + n + 1) as s:
            lg = [s.prefill(ids).float().cpu()]
            for _ in range(n):
                lg.append(s.decode(int(lg[-1].argmax())).float().cpu())
        return [int(x.argmax()) for x in lg], torch.stack(lg)

    (tf, lf), (te, le) = greedy(eng), greedy(exact)
    assert tf == te
    assert (lf - le).abs().max().item() < (1e-3 if dev == "cpu" else 0.5)


def test_twin_is_off_unless_asked_for(monkeypatch) -> None:
    """Without MESH402_FAST_KERNELS=twin the CPU keeps its own kernels (native or torch's)."""
    monkeypatch.delenv("MESH402_FAST_KERNELS", raising=False)
    assert not accel.enabled(torch.device("cpu")) and accel.kernel_set("cpu") is None
    assert accel.enabled(torch.device("cuda")) and accel.kernel_set("cuda") == "a1-dequant-f16-tile16"
    assert qkernels.kernel_set("cpu").startswith("k")
    assert qkernels.kernel_set("cuda") == "a1-dequant-f16-tile16"


def test_a_batched_step_replays_bit_for_bit_on_the_accel_path(monkeypatch) -> None:
    """A middle stage on the path runs two requests' decode steps as one batch; a validator on the same
    kernels replays one request's steps alone and gets the committed payload exactly."""
    dev = accel_device(monkeypatch)
    path = smollm2_gguf()
    first = Engine.load(path, mode="exact", layers=(0, 10), load_tokenizer=False)
    tokens = [[1, 9690, 198, 2683, 359, 253, 5356], [1, 504, 3458, 314, 260, 1400, 282]]
    inputs = [upstream_inputs(first, t, 4, "f32") for t in tokens]  # one prefill step, three decode steps
    mid = Engine.load(path, mode="fast", device=dev, layers=(10, 16), load_tokenizer=False)
    committed: list[list[bytes]] = [[], []]
    sessions = [mid.new_session(64) for _ in inputs]
    try:
        for k in range(len(inputs[0])):
            xs = [decode_activations(r[k]["data"], r[k]["shape"], r[k]["dtype"]) for r in inputs]
            if inputs[0][k]["kind"] == 1:  # prefill chunks one by one; decode steps as one batch
                ys = [s.forward(x, r[k]["pos"], r[k]["n_real"]) for s, x, r in zip(sessions, xs, inputs)]
            else:
                ys = mid.forward_batch(sessions, xs)
            for i, y in enumerate(ys):
                committed[i].append(encode_activations(y, "f32")[0])
    finally:
        for s in sessions:
            s.close()
    assert committed[1] == stage_outputs(mid, inputs[1], last=False, wire="f32", fp_ids=[])  # batched == alone
    validator = Engine.load(path, mode="fast", device=dev, layers=(10, 16), load_tokenizer=False)
    for k in range(len(inputs[0])):
        res = replay(validator, inputs[0][:k + 1], last=False, expected=committed[0][k], expected_dtype="f32")
        assert res.ok and res.rel_err == 0.0, res
