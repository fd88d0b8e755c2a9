"""Work receipts on the wire: a split model over in-memory links (the real StageWorker and PipelineModel),
every stage signs a receipt per request, the entry gets the whole chain back on release and stores it;
the chain verifies, survives a stage failover, and the epoch split follows the GGUF work units."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mesh402.work.receipts import chain_errors
from mesh402.work.store import ReceiptStore
from mesh402.mesh.identity import NodeIdentity
from tests.support.pipeline import HASH, build, run_gen
from tests.support.pipeline_receipts import N, SlowSink, run_with_receipts
from harness.tamper import FORGED_TOKENS, RECEIPT_CHEATS, cheat_receipts


def test_every_stage_signs_and_the_chain_verifies(executor, prompt, tmp_path: Path) -> None:
    receipts, ids, _ = asyncio.run(run_with_receipts(executor, prompt, [0, 10, 20, 30]))
    assert chain_errors(receipts, 30) == []
    assert [r.node_id for r in receipts] == [ids[n].node_id_hex for n in ("entry", "w0", "w1")]
    assert [(r.layer_start, r.layer_end) for r in receipts] == [(0, 10), (10, 20), (20, 30)]
    assert {r.tokens for r in receipts} == {len(prompt) + N - 1}  # prefill + fed-back decode tokens
    assert {r.model_hash for r in receipts} == {HASH}
    st = ReceiptStore(tmp_path / "receipts.sqlite")
    st.record(receipts, revenue=30_000, epoch=1, n_layers=30)
    from mesh402.work.units import flops_per_token, split_pro_rata
    from mesh402.models.catalog import bundled_model_path
    from mesh402.models.gguf_meta import read_gguf_meta
    meta = read_gguf_meta(bundled_model_path())
    units = st.work_units(1, lambda h, a, b: flops_per_token(meta, a, b))
    pay = split_pro_rata(st.revenue(1), units)
    assert units[ids["w1"].node_id_hex] > units[ids["w0"].node_id_hex] == units[ids["entry"].node_id_hex]
    assert sum(pay.values()) == 30_000 and pay[ids["w1"].node_id_hex] > pay[ids["w0"].node_id_hex]


def test_receipts_after_a_stage_failover_name_the_replacement(executor, prompt) -> None:
    receipts, ids, model = asyncio.run(run_with_receipts(executor, prompt, [0, 10, 20, 30], kill="w1",
                                                         standbys=("standby",)))
    assert model.stats.failovers == 1
    assert chain_errors(receipts, 30) == []
    assert receipts[2].node_id == ids["standby"].node_id_hex  # the replayed work is the standby's


def test_entry_sink_keeps_receipts_with_units_from_the_tensor_table(executor, prompt, tmp_path: Path) -> None:
    import time

    from mesh402.work.store import EntryReceipts, epoch_of
    from mesh402.work.units import flops_per_token
    from mesh402.models.catalog import bundled_model_path
    from mesh402.models.gguf_meta import read_gguf_meta
    entry = EntryReceipts(tmp_path, epoch_s=3600)
    entry.add_model(HASH, bundled_model_path())

    async def main() -> list[Any]:
        receipts, _, _ = await run_with_receipts(executor, prompt, [0, 15, 30], also=entry)
        for _ in range(200):
            if entry.kept:
                break
            await asyncio.sleep(0.02)
        return receipts

    receipts = asyncio.run(main())
    assert entry.kept == 1 and entry.rejected == 0
    meta = read_gguf_meta(bundled_model_path())
    units = entry.store.work_units(epoch_of(time.time(), 3600))
    assert units == {r.node_id: flops_per_token(meta, r.layer_start, r.layer_end) * r.tokens for r in receipts}


def test_solo_request_on_a_paid_entry_gets_one_receipt_for_all_layers(executor, prompt) -> None:
    """A model served whole: the entry's own work counts in the epoch split (one receipt, all 30 layers)."""
    from mesh402.work.receipts import SoloReceipts
    from mesh402.engine import Engine
    from mesh402.models.catalog import bundled_model_path
    from mesh402.serving.generation import LocalModel
    got: list[tuple[list[Any], Any]] = []
    me = NodeIdentity.generate()
    eng = Engine.load(bundled_model_path(), mode="exact")
    model = LocalModel(eng, executor, prefix_cache=None,
                       receipts=SoloReceipts(me, lambda rs, ev=None: got.append((rs, ev)), HASH, 30))
    asyncio.run(run_gen(model, prompt, N))
    (receipts, evidence), = got
    assert evidence is None and chain_errors(receipts, 30) == []
    r = receipts[0]
    assert (r.node_id, r.layer_start, r.layer_end, r.model_hash) == (me.node_id_hex, 0, 30, HASH)
    assert r.tokens == len(prompt) + N - 1


async def committed_at_finish(model: Any, prompt: list[int], sink: SlowSink) -> bool:
    """Whether the request's receipts were committed when generate() handed out Finished, i.e. before the
    API could send the answer's last byte (the finish chunk, [DONE], or the whole JSON body)."""
    import contextlib

    from mesh402.engine.sampling import SamplingParams
    from mesh402.serving.generation import Finished, GenerationRequest, generate
    sampling = SamplingParams(temperature=0, seed=1)
    stepper = await model.open(len(prompt) + N, sampling)
    async with contextlib.aclosing(generate(GenerationRequest(prompt, N, sampling), stepper, model.tokenizer, [])) as evs:
        async for ev in evs:
            if isinstance(ev, Finished):
                return sink.committed()
    raise AssertionError("no Finished event")


def test_a_split_answer_ends_only_after_its_receipts_are_committed(executor, prompt) -> None:
    """Split: the stages' receipts come back on the CLOSE acknowledgement and are committed before the
    answer ends, so a kill -9 of the entry right after an answer loses none of its work units."""
    async def main() -> bool:
        model, mesh, _ = await build(executor, [0, 15, 30])
        sink = SlowSink()
        model.receipt_sink = sink  # signed by the host that assigned the ranges
        return await committed_at_finish(model, prompt, sink)
    assert asyncio.run(main())


def test_a_solo_answer_ends_only_after_its_receipt_is_committed(executor, prompt) -> None:
    from mesh402.work.receipts import SoloReceipts
    from mesh402.engine import Engine
    from mesh402.models.catalog import bundled_model_path
    from mesh402.serving.generation import LocalModel
    eng = Engine.load(bundled_model_path(), mode="exact")

    async def main() -> bool:
        sink = SlowSink()
        model = LocalModel(eng, executor, prefix_cache=None, receipts=SoloReceipts(NodeIdentity.generate(), sink, HASH, 30))
        return await committed_at_finish(model, prompt, sink)
    assert asyncio.run(main())


@pytest.mark.parametrize("how", RECEIPT_CHEATS)
def test_a_middle_stage_cheating_on_receipts_gets_nothing_stored(executor, prompt, tmp_path: Path, how: str) -> None:
    """The middle stage of three answers CLOSE with a chain of its own: its receipt claiming the last stage's
    layers too (that stage's receipt dropped), or a whole chain signed with throwaway keys claiming 10^9
    tokens. The entry keeps only what is bound to the request as it planned and fed it (its own stage-0
    receipt); the answer itself is unaffected."""
    import time

    from mesh402.models.catalog import bundled_model_path
    from mesh402.work.store import EntryReceipts, epoch_of
    entry = EntryReceipts(tmp_path, epoch_s=3600)
    entry.add_model(HASH, bundled_model_path())

    async def main() -> tuple[list[Any], list[int], Any]:
        model, mesh, _ = await build(executor, [0, 10, 20, 30])
        cheat_receipts(mesh.workers["w0"], how)
        got: list[list[Any]] = []
        model.receipt_sink = lambda rs, ev=None: (got.append(rs), entry(rs, ev))[1]
        out = await run_gen(model, prompt, N)
        for _ in range(200):
            if entry.kept + entry.rejected:
                break
            await asyncio.sleep(0.02)
        return got[0], out, model

    receipts, out, model = asyncio.run(main())
    honest, _, _ = asyncio.run(run_with_receipts(executor, prompt, [0, 10, 20, 30]))
    assert [r.node_id for r in receipts] == [model.signer.node_id_hex] and receipts[0].layer_end == 10
    units = entry.store.work_units(epoch_of(time.time(), 3600))
    assert list(units) == [model.signer.node_id_hex]  # nothing for the cheat, nothing forged
    stored = entry.store.receipts(receipts[0].request_id)
    assert [(r.stage, r.tokens) for r in stored] == [(0, honest[0].tokens)] and FORGED_TOKENS not in {r.tokens for r in stored}
    assert len(out) == N
