"""Activations on the wire: f32 is bit-identical to solo; f16/bf16 run and agree closely (measured).

Two stages in one process: the real pipeline (PipelineModel -> StageWorker over MemoryLink) for
free-running greedy tokens, and a teacher-forced pass (both stages fed the solo trajectory, the
activations round-tripped through the wire dtype) for per-step argmax agreement and max |dlogit|.
Fast mode keeps it quick; f32 exactness is also checked in exact mode on a short run.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mesh402.engine import Engine
from mesh402.engine.sampling import SamplingParams
from mesh402.engine.activations import decode_activations, encode_activations, forward_tokens
from mesh402.models.catalog import bundled_model_path
from mesh402.serving.generation import LocalModel
from mesh402.mesh.identity import NodeIdentity
from mesh402.serving.pipeline import Chain, Failover, PipelineModel
from mesh402.serving.stage_link import Hop, MemoryLink
from mesh402.serving.stage_worker import StageKey, StageWorker

PATH = bundled_model_path()
PROMPTS = ["What is the capital of France?", "Write a short poem about the sea."]
SPLIT = 15


class _NoFailover(Failover):
    async def alive(self, node: str) -> bool:
        return True


async def _greedy(model, ids: list[int], n: int) -> list[int]:
    st = await model.open(len(ids) + n, SamplingParams(temperature=0, seed=0))
    try:
        out = [await st.prefill(ids)]
        while len(out) < n:
            out.append(await st.decode(out[-1]))
        return out
    finally:
        st.release()


async def _pipeline_greedy(e0: Engine, e1: Engine, dtype: str, ids: list[int], n: int,
                           ex: ThreadPoolExecutor) -> list[int]:
    host = NodeIdentity.generate()
    worker = StageWorker("w1", ex, lambda h, a, b: e1, connect=None)  # type: ignore[arg-type]
    await worker.ensure_loaded(StageKey("h", SPLIT, 30), assigner=host.node_id_hex)

    async def connect(node: str) -> MemoryLink:
        client, server = MemoryLink.pair()
        asyncio.create_task(worker.handle(host.node_id_hex, server))
        return client

    chain = Chain("smollm2", "h", 1, SPLIT, (Hop("w1", SPLIT, 30),))
    return await _greedy(PipelineModel(e0, chain, connect, _NoFailover(), ex, wire_dtype=dtype, signer=host), ids, n)


def _teacher_forced(e0: Engine, e1: Engine, ids: list[int], trajectory: list[int], dtype: str) -> list[torch.Tensor]:
    """Logits at every step when both stages follow `trajectory`, activations through `dtype`."""
    s0, s1 = e0.new_session(len(ids) + len(trajectory) + 1), e1.new_session(len(ids) + len(trajectory) + 1)
    out = []
    C = e0.prefill_chunk
    steps = [(ids[i:i + C], C) for i in range(0, len(ids), C)] + [([t], 1) for t in trajectory[:-1]]
    pos = 0
    for chunk, pad in steps:
        payload, shape = forward_tokens(s0, chunk, pos, pad, dtype)
        x = decode_activations(payload, shape, dtype)
        logits = s1.forward(x, pos, len(chunk))
        pos += len(chunk)
        if pad == 1 or pos == len(ids):
            out.append(logits)
    s0.close()
    s1.close()
    return out


@pytest.fixture(scope="module")
def ex():
    e = ThreadPoolExecutor(1)
    yield e
    e.shutdown()


def test_wire_dtypes_f32_exact_f16_bf16_agree(ex) -> None:
    N = 16
    solo = Engine.load(PATH, mode="fast")
    e0 = Engine.load(PATH, mode="fast", layers=(0, SPLIT), load_tokenizer=False)
    e1 = Engine.load(PATH, mode="fast", layers=(SPLIT, 30), load_tokenizer=False)
    agree = {d: [0, 0] for d in ("f16", "bf16")}
    max_dlogit = {d: 0.0 for d in ("f16", "bf16")}
    free = {d: [0, 0] for d in ("f16", "bf16")}
    with torch.inference_mode():
        for p in PROMPTS:
            ids = solo.tokenizer.encode(solo.chat_template.render([{"role": "user", "content": p}]), add_special=False)
            s = solo.new_session(len(ids) + N)
            solo_logits = [s.prefill(ids)]
            ref = [int(solo_logits[-1].argmax())]
            while len(ref) < N:
                solo_logits.append(s.decode(ref[-1]))
                ref.append(int(solo_logits[-1].argmax()))
            s.close()
            assert asyncio.run(_pipeline_greedy(e0, e1, "f32", ids, N, ex)) == ref
            ref_logits = _teacher_forced(e0, e1, ids, ref, "f32")
            # f32 on the wire is lossless: the split's logits are the solo engine's, bit for bit
            assert all(torch.equal(a, b) for a, b in zip(ref_logits, solo_logits))
            for d in ("f16", "bf16"):
                got = asyncio.run(_pipeline_greedy(e0, e1, d, ids, N, ex))  # the real path runs
                assert len(got) == N
                free[d][0] += sum(1 for _ in zip(got, ref))
                same = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), N)
                free[d][1] += same
                lg = _teacher_forced(e0, e1, ids, ref, d)
                agree[d][0] += sum(int(a.argmax()) == t for a, t in zip(lg, ref))
                agree[d][1] += len(ref)
                max_dlogit[d] = max(max_dlogit[d], max(float((a - b).abs().max()) for a, b in zip(lg, ref_logits)))
    for d in ("f16", "bf16"):
        frac = agree[d][0] / agree[d][1]
        print(f"{d}: teacher-forced greedy agreement {agree[d][0]}/{agree[d][1]} = {frac:.1%}, "
              f"max |dlogit| {max_dlogit[d]:.4f}, free-running identical prefix {free[d][1]}/{free[d][0]} tokens")
        assert frac >= 0.9


def test_f32_wire_is_exact_in_exact_mode(ex) -> None:
    solo = Engine.load(PATH, mode="exact")
    ids = solo.tokenizer.encode(solo.chat_template.render([{"role": "user", "content": PROMPTS[0]}]),
                                add_special=False)
    ref = asyncio.run(_greedy(LocalModel(solo, ex), ids, 6))
    e0 = Engine.load(PATH, mode="exact", layers=(0, SPLIT))
    e1 = Engine.load(PATH, mode="exact", layers=(SPLIT, 30), load_tokenizer=False)
    assert asyncio.run(_pipeline_greedy(e0, e1, "f32", ids, 6, ex)) == ref


def test_encode_decode_round_trip() -> None:
    x = torch.randn(3, 576)
    for d, tol in (("f32", 0.0), ("f16", 1e-2), ("bf16", 5e-2)):
        raw, shape = encode_activations(x, d)
        assert len(raw) == x.numel() * (4 if d == "f32" else 2)
        y = decode_activations(raw, shape, d)
        assert y.dtype == torch.float32 and y.shape == x.shape
        assert float((y - x).abs().max()) <= tol * float(x.abs().max())
