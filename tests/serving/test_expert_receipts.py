"""Work receipts for MoE expert-parallel requests (serving/expert_receipts.py, economics/receipts.py,
economics/workunits.py): the FLOPs split between the host (trunk + its own experts) and the expert
nodes (their rows), the expert node's bounded per-request tallies, receipt validation, the entry's
store, and the whole protocol in process (LoopbackTransport, and EXPERT frames over in-memory links).
"""
from __future__ import annotations

import asyncio
from fractions import Fraction
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from mesh402.work.receipts import ExpertReceipt, ExpertTallies, expert_errors, receipt_errors, sign_expert_receipt, sign_receipt
from mesh402.work.store import ReceiptStore
from mesh402.work.units import (  # noqa: E402
    expert_flops_per_row,
    flops_per_token,
    moe_flops,
    trunk_flops_per_token,
)
from mesh402.engine import Engine  # noqa: E402
from mesh402.engine.sampling import SamplingParams  # noqa: E402
from mesh402.mesh.identity import NodeIdentity  # noqa: E402
from mesh402.models.gguf_meta import read_gguf_meta  # noqa: E402
from mesh402.serving.expert_receipts import ExpertAccounts, ExpertHostReceipts, expert_rows  # noqa: E402
from mesh402.engine.expert_parallel import ExpertShardWorker, LoopbackTransport, RemoteExperts, encode_request
from mesh402.serving.experts import MeshExpertTransport, ExpertService
from mesh402.serving.generation import LocalModel  # noqa: E402
from mesh402.serving.stage_link import MemoryLink  # noqa: E402

from tests.support.moe_models import E, FFE, H, K, NL, SEQ, hf_moe, write_moe_gguf  # noqa: E402

HASH = "ab" * 32
PROMPTS = (SEQ[:12], SEQ[20:27])  # two requests of different lengths
N_DECODE = 4


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("moe-receipts") / "qwen2moe.gguf"
    write_moe_gguf(hf_moe("qwen2moe"), "qwen2moe", p, "Q8_0")
    return p


@pytest.fixture(scope="module")
def meta(gguf_path):
    return read_gguf_meta(gguf_path)


@pytest.fixture()
def executor():
    ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    yield ex
    ex.shutdown(wait=True)


# ---------------------------------------------------------------------------- FLOPs split

def test_expert_flops_per_row_is_one_experts_gate_up_down(meta) -> None:
    for layer in range(NL):
        assert expert_flops_per_row(meta, layer) == 2 * 3 * FFE * H
    assert expert_flops_per_row(meta, NL + 5) == 0  # no such layer: no routed experts


def test_host_and_expert_nodes_units_sum_to_one_nodes_units(meta) -> None:
    """Any split of the same rows over host and nodes sums to what one node earns (top-k rows per token)."""
    tokens = 9
    table = moe_flops(meta)
    assert trunk_flops_per_token(meta) == flops_per_token(meta, 0, NL) - NL * K * expert_flops_per_row(meta, 0)
    gen = torch.Generator().manual_seed(0)
    rows: dict[str, dict[tuple[int, int], int]] = {"host": {}, "w0": {}, "w1": {}}
    for layer in range(NL):
        for _ in range(tokens):
            for e in torch.randperm(E, generator=gen)[:K].tolist():
                who = ("host", "w0", "w1")[e % 3]
                rows[who][(layer, e)] = rows[who].get((layer, e), 0) + 1
    flat = {n: [(la, e, c) for (la, e), c in r.items()] for n, r in rows.items()}
    host = table.units(tokens, flat["host"])
    nodes = table.units(0, flat["w0"]) + table.units(0, flat["w1"])
    assert host + nodes == flops_per_token(meta, 0, NL) * tokens
    assert host > trunk_flops_per_token(meta) * tokens  # the host ran some experts itself
    assert table.units(tokens, []) == trunk_flops_per_token(meta) * tokens  # a host holding no experts


# ---------------------------------------------------------------------------- tallies and receipts

def test_expert_rows_reads_the_request_header() -> None:
    x = torch.randn(3, H)
    payload = encode_request(1, x, {2: [0, 2], 5: [1]})
    assert expert_rows(payload) == {(1, 2): 2, (1, 5): 1}
    with pytest.raises(ValueError):
        expert_rows(payload + b"x")


def test_expert_tallies_are_bounded_and_per_host() -> None:
    now = [0.0]
    t = ExpertTallies(max_open=3, max_idle_s=60.0, clock=lambda: now[0])
    for i in range(5):
        t.record("h", f"r{i}", HASH, {(0, 1): 2}, b"i", b"o")
    assert len(t) == 3 and t.dropped == 2 and t.take("h", "r0") is None  # least recently used went first
    t.record("h", "r2", HASH, {(0, 1): 1, (1, 3): 4}, b"i", b"o")
    assert t.take("other-host", "r2") is None  # only the host that sent the rows gets them signed
    got = t.take("h", "r2")
    assert got is not None and got.rows == {(0, 1): 3, (1, 3): 4}
    assert t.take("h", "r2") is None  # signed once
    now[0] = 61.0  # a host that never asks: idle tallies are dropped
    assert t.take("h", "r4") is None and len(t) == 0


def _set(host: NodeIdentity, nodes: list[NodeIdentity], rid: str = "r1") -> list[ExpertReceipt]:
    h = sign_expert_receipt(host, request_id=rid, stage=0, model_hash=HASH, host=host.node_id_hex, trunk_tokens=5,
                            rows=[(0, 1, 3)], input_hash="aa", output_hash="bb")
    return [h] + [sign_expert_receipt(n, request_id=rid, stage=i + 1, model_hash=HASH, host=host.node_id_hex,
                                      trunk_tokens=0, rows=[(0, 2, 4), (1, 7, 2)], input_hash="cc", output_hash="dd")
                  for i, n in enumerate(nodes)]


def test_expert_receipt_sets_validate() -> None:
    from dataclasses import replace
    host, a, b = NodeIdentity.generate(), NodeIdentity.generate(), NodeIdentity.generate()
    rs = _set(host, [a, b])
    assert expert_errors(rs, NL) == [] and receipt_errors(rs, NL) == []
    assert expert_errors([rs[0], rs[2]]) == []  # node a gave no receipt: the others still hold
    assert "bad signature" in " ".join(expert_errors([rs[0], replace(rs[1], rows=((0, 2, 40),))]))
    assert expert_errors(rs[1:]) == ["no host receipt (stage 0)"]
    assert expert_errors(rs, n_layers=1)  # rows of a layer the model does not have
    wrong = _set(host, [a], rid="r2")[1]
    assert expert_errors([rs[0], wrong])  # another request's receipt
    trunk = sign_expert_receipt(a, request_id="r1", stage=1, model_hash=HASH, host=host.node_id_hex,
                                trunk_tokens=5, rows=[], input_hash="", output_hash="")
    assert "only the host" in " ".join(expert_errors([rs[0], trunk]))
    stage = sign_receipt(host, request_id="r1", stage=0, model_hash=HASH, layer_start=0, layer_end=NL, tokens=5,
                         input_hash="aa", output_hash="bb")
    assert receipt_errors([stage, rs[1]]) == ["stage and expert receipts mixed in one request"]
    assert ExpertReceipt.from_json(rs[1].to_json()) == rs[1]


def test_store_keeps_expert_receipts_with_their_units(tmp_path, meta) -> None:
    host, a, b = NodeIdentity.generate(), NodeIdentity.generate(), NodeIdentity.generate()
    rs = _set(host, [a, b])
    table = moe_flops(meta)
    st = ReceiptStore(tmp_path / "r.sqlite")
    st.record(rs, revenue=10, epoch=1, n_layers=NL, expert_flops=lambda h: table)
    want = {r.node_id: table.units(r.trunk_tokens, r.rows) for r in rs}
    assert st.work_units(1) == want
    assert st.work_units(1, flops=lambda *a: 0) == want  # expert receipts keep their stored units
    assert st.work_units(1, flops=lambda *a: 0, expert_flops=lambda h: table) == want
    assert st.receipts("r1") == rs and st.count() == 3
    with pytest.raises(ValueError):
        st.record(rs[1:], revenue=0, epoch=1)
    st.close()


# ---------------------------------------------------------------------------- the protocol in process

def _split(path, host: str, nodes: list[str]):
    """Experts dealt round-robin over the host and `nodes` (each expert held once)."""
    from mesh402.engine.moe import ExpertBank
    from mesh402.engine.weights import open_source
    src = open_source(path)
    everyone = [host, *nodes]
    owners = {(la, e): (everyone[e % len(everyone)],) for la in range(NL) for e in range(E)}
    held: dict[str, list] = {}
    for ex, (n,) in owners.items():
        held.setdefault(n, []).append(ex)
    bank = ExpertBank(src, held.pop(host))
    return owners, bank, {n: ExpertShardWorker(src, exs) for n, exs in held.items()}


async def _run(model: LocalModel, interleave: bool) -> tuple[list[str], list[Any]]:
    """Two requests, steps interleaved on the engine thread (or one after the other); their request ids."""
    sp = SamplingParams(temperature=0.0, seed=1)
    a, b = await model.open(64, sp), await model.open(64, sp)
    prompts = {id(a): PROMPTS[0], id(b): PROMPTS[1]}
    for group in ([a, b],) if interleave else ([a], [b]):
        toks = {id(s): await s.prefill(prompts[id(s)]) for s in group}
        for _ in range(N_DECODE):
            for s in group:
                toks[id(s)] = await s.decode(toks[id(s)])
    return [a.request_id, b.request_id], [a, b]


def _totals(receipts: list[ExpertReceipt]) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    for r in receipts:
        for la, e, n in r.rows:
            out[(la, e)] = out.get((la, e), 0) + n
    return out


def _host_model(path, executor, sink, kill: str | None = None):
    host = NodeIdentity.generate()
    ids = {n: NodeIdentity.generate() for n in ("w0", "w1")}
    names = {ids[n].node_id_hex: n for n in ids}
    owners, bank, workers = _split(path, host.node_id_hex, list(names))
    workers = {nid: workers[nid] for nid in names}
    tr = LoopbackTransport(workers, accounts={nid: ExpertAccounts(ids[names[nid]]) for nid in names},
                           host=host.node_id_hex, content_hash=HASH)
    runner = RemoteExperts(owners, tr, local=bank, local_node=host.node_id_hex)
    eng = Engine.load(path, load_tokenizer=False, experts=runner)
    loop = asyncio.get_running_loop()
    receipts = ExpertHostReceipts(host, sink, HASH, NL, runner, tr, loop, timeout_s=5.0)
    return LocalModel(eng, executor, prefix_cache=None, receipts=receipts, step_hook=runner.begin), tr, host, names


def test_each_request_gets_the_hosts_and_every_expert_nodes_receipt(gguf_path, executor, meta) -> None:
    """Interleaved requests: each gets a receipt from the host and each expert node, and every row is
    attributed to the request it was run for (the same totals as the requests run one at a time)."""
    def once(interleave: bool) -> dict[str, list[ExpertReceipt]]:
        got: dict[str, list[ExpertReceipt]] = {}

        async def main():
            model, tr, host, names = _host_model(gguf_path, executor, lambda rs, ev=None: got.__setitem__(rs[0].request_id, rs))
            rids, steppers = await _run(model, interleave)
            for s in steppers:
                s.release()
            await asyncio.gather(*(asyncio.wrap_future(f) for f in list(model.receipts.pending)))
            assert all(len(a.tallies) == 0 for a in tr.accounts.values())  # every tally was signed and dropped
            return rids, host, names
        rids, host, names = asyncio.run(main())
        for rid, prompt in zip(rids, PROMPTS):
            rs = got[rid]
            assert expert_errors(rs, NL) == []
            assert rs[0].node_id == host.node_id_hex and rs[0].trunk_tokens == len(prompt) + N_DECODE
            assert {r.node_id for r in rs[1:]} == set(names)
        return [got[r] for r in rids]

    together, alone = once(True), once(False)
    table = moe_flops(meta)
    assert _totals(together[0]) != _totals(together[1])
    for rs_t, rs_a, prompt in zip(together, alone, PROMPTS):
        assert _totals(rs_t) == _totals(rs_a)
        per_layer = [sum(n for (la, _), n in _totals(rs_t).items() if la == layer) for layer in range(NL)]
        rows_run = per_layer[0] // K  # token rows through each MoE layer: the real ones, no prefill padding
        tokens = len(prompt) + N_DECODE
        assert per_layer == [K * rows_run] * NL and rows_run == tokens
        units = sum(table.units(r.trunk_tokens, r.rows) for r in rs_t)
        trunk = trunk_flops_per_token(meta)
        assert units == trunk * tokens + (flops_per_token(meta, 0, NL) - trunk) * rows_run
        for r in rs_t[1:]:
            assert r.rows and all(e % 3 != 0 for _, e, _ in r.rows)  # the host's own experts stay in its receipt
        assert all(e % 3 == 0 for _, e, _ in rs_t[0].rows)


def test_a_node_that_does_not_answer_earns_nothing_and_the_rest_are_kept(gguf_path, executor, tmp_path) -> None:
    from mesh402.work.store import EntryReceipts
    entry = EntryReceipts(tmp_path)
    entry.add_model(HASH, gguf_path)

    async def main():
        model, tr, host, names = _host_model(gguf_path, executor, entry._record)
        _, (a, b) = await _run(model, False)
        silent = sorted(names)[0]
        tr.dead.add(silent)  # it did its work, then stopped answering before the receipts were asked
        a.release()
        b.release()
        await asyncio.gather(*(asyncio.wrap_future(f) for f in list(model.receipts.pending)))
        return host, silent
    host, silent = asyncio.run(main())
    assert entry.kept == 2 and entry.rejected == 0
    units = entry.store.work_units(entry.store.unpaid_epochs()[0])
    assert silent not in units and host.node_id_hex in units and len(units) == 2
    assert all(u > 0 for u in units.values())


def test_an_expert_parallel_answer_ends_only_after_its_receipts_are_committed(gguf_path, executor) -> None:
    """finish() (awaited by generate before Finished) returns once the host's and the expert nodes' receipts
    are committed, so the answer's end never goes out before them."""
    from tests.support.pipeline_receipts import SlowSink

    async def main() -> bool:
        sink = SlowSink()
        model, *_ = _host_model(gguf_path, executor, sink)
        _, (a, b) = await _run(model, False)
        await a.finish()
        committed = sink.committed() and len(sink.writes) == 1
        await b.finish()
        return committed
    assert asyncio.run(main())


def test_expert_frames_over_links_carry_the_request_and_its_receipt(gguf_path) -> None:
    """MeshExpertTransport and ExpertService over in-memory links: EXPERT_RUN names the request, the
    expert node tallies it, EXPERT_RECEIPT returns its signature; an unknown request gets an error."""
    from mesh402.engine.expert_parallel import ExpertNodeDown
    node = NodeIdentity.generate()
    worker = ExpertShardWorker(gguf_path, [(0, e) for e in range(E)])

    async def main():
        here, there = MemoryLink.pair()
        svc = ExpertService(lambda *a: worker, accounts=ExpertAccounts(node))
        svc.shards[HASH] = {1: worker}
        svc.assigners[HASH] = "host-id"  # as after the host's EXPERT_ASSIGN
        task = asyncio.create_task(svc.handle("host-id", there))

        async def connect(n):
            return here
        tr = MeshExpertTransport(connect, asyncio.get_running_loop(), HASH, epoch=1, timeout=10)
        payload = encode_request(0, torch.randn(4, H), {1: [0, 3], 6: [1, 2, 3]})
        await asyncio.get_running_loop().run_in_executor(None, tr.call, "n1", payload, "req-1")
        await asyncio.get_running_loop().run_in_executor(None, tr.call, "n1", payload, "req-1")
        r = await tr.ask_receipt("n1", "req-1", 2)
        with pytest.raises(ExpertNodeDown):
            await tr.ask_receipt("n1", "req-1", 2)  # signed once
        task.cancel()
        return r
    r = asyncio.run(main())
    assert (r.request_id, r.stage, r.node_id, r.host, r.model_hash) == ("req-1", 2, node.node_id_hex, "host-id", HASH)
    assert r.rows == ((0, 1, 4), (0, 6, 6)) and r.trunk_tokens == 0
    assert expert_errors([r]) == ["no host receipt (stage 0)"]  # alone it is not a request's set


class InflatingAccounts(ExpertAccounts):
    """An expert node that signs receipts for 1,000 times the rows it ran, plus an expert it never ran."""

    def receipt(self, host: str, request_id: str, stage: int) -> ExpertReceipt | None:
        r = super().receipt(host, request_id, stage)
        if r is None:
            return None
        rows = [(la, e, n * 1000) for la, e, n in r.rows] + [(0, max(e for _, e, _ in r.rows) + 1, 10**6)]
        return sign_expert_receipt(self.signer, request_id=r.request_id, stage=r.stage, model_hash=r.model_hash,
                                   host=r.host, trunk_tokens=0, rows=[x for x in rows if x[1] < E],
                                   input_hash=r.input_hash, output_hash=r.output_hash)


def test_an_expert_node_claiming_rows_it_was_not_sent_earns_nothing(gguf_path, executor, tmp_path) -> None:
    """The host keeps an expert node's receipt only when it claims exactly the rows the host sent it and got
    answers for: an inflated receipt is dropped (logged), the host's and the honest node's are kept."""
    from mesh402.work.store import EntryReceipts
    entry = EntryReceipts(tmp_path)
    entry.add_model(HASH, gguf_path)

    async def main():
        model, tr, host, names = _host_model(gguf_path, executor, entry._record)
        cheat = sorted(names)[0]
        tr.accounts[cheat] = InflatingAccounts(tr.accounts[cheat].signer)
        _, (a, b) = await _run(model, False)
        a.release()
        b.release()
        await asyncio.gather(*(asyncio.wrap_future(f) for f in list(model.receipts.pending)))
        return host, cheat, set(names) - {cheat}
    host, cheat, honest = asyncio.run(main())
    assert entry.kept == 2 and entry.rejected == 0
    units = entry.store.work_units(entry.store.unpaid_epochs()[0])
    assert cheat not in units and set(units) == {host.node_id_hex} | honest


def _paid_expert_link(worker: Any, ledger: Any) -> tuple[ExpertService, MeshExpertTransport, "asyncio.Task[Any]"]:
    """An expert node "n1" holding `worker`'s experts for host "host-id", paid by vouchers kept in `ledger`
    (WorkerPay), and the host's transport to it over an in-memory link (call inside a running loop)."""
    from mesh402.serving.work_pay import WorkerPay
    here, there = MemoryLink.pair()
    svc = ExpertService(lambda *a: worker, accounts=ExpertAccounts(NodeIdentity.generate()), me="n1")
    svc.pay = WorkerPay(ledger)
    svc.shards[HASH] = {1: worker}
    svc.assigners[HASH] = "host-id"
    task = asyncio.create_task(svc.handle("host-id", there))

    async def connect(n):
        return here
    return svc, MeshExpertTransport(connect, asyncio.get_running_loop(), HASH, epoch=1, timeout=10), task


def test_expert_runs_paid_by_vouchers_over_links_and_refused_without_terms_or_cover(gguf_path, meta, tmp_path
                                                                                    ) -> None:
    """Issue 14, property 6 in process: a paid host's ExpertPayer and an expert node's ExpertService with the
    voucher rule (WorkerPay over the real issuer and ledger): terms on the first run, vouchers on the second
    and every 16th, the final one with the receipt ask; the node's owed work equals what it was vouchered. A run
    without terms, or from a host whose escrow does not cover the node, is refused (`unpaid`) before any work,
    and the host never vouchers a refused run. The shares of all expert nodes stay within the request's price."""
    from mesh402.engine.expert_parallel import ExpertUnavailable
    from mesh402.serving.experts import ExpertPayer
    from mesh402.serving.work_pay import WorkTerms
    from mesh402.work.units import expert_pay_shares
    from tests.support.work_pay import pay_pair
    worker = ExpertShardWorker(gguf_path, [(0, e) for e in range(E)])
    p = pay_pair(tmp_path, coverage=0)
    terms = WorkTerms(p.issuer.address, p.wallet.worker, flat=30, per_token_micro=500_000)

    async def main() -> tuple[int, int]:
        svc, tr, task = _paid_expert_link(worker, p.ledger)
        loop = asyncio.get_running_loop()
        payload = encode_request(0, torch.randn(4, H), {1: [0, 3], 6: [1, 2, 3]})  # 5 rows
        with pytest.raises(ExpertUnavailable, match="no pay terms"):  # an unpaid host: nothing runs
            await loop.run_in_executor(None, tr.call, "n1", payload, "req-0")
        tr.pay = ExpertPayer(p.issuer, {"n1": terms})
        with pytest.raises(ExpertUnavailable, match="escrow"):  # no float locked for this node yet
            await loop.run_in_executor(None, tr.call, "n1", payload, "req-1")
        assert p.issuer.issued(p.wallet.worker) == 0  # the refused run was never vouchered
        p.chain.set(p.issuer.address, p.wallet.worker, 10_000)
        for _ in range(20):  # more than VOUCHER_EVERY runs
            await loop.run_in_executor(None, tr.call, "n1", payload, "req-2")
        await tr.ask_receipt("n1", "req-2", 1)
        task.cancel()
        return p.ledger.owed(p.issuer.address), p.ledger.held(p.issuer.address)
    owed, held = asyncio.run(main())
    assert owed == 30 + -(-20 * 5 * 500_000 // 1_000_000) == held  # flat + 100 rows at half a unit, all vouchered

    # every expert once, spread over three nodes with one expert held twice: the shares never add up past 1
    experts = [(la, e) for la in range(NL) for e in range(E)]
    copies = {experts[0]: 2}
    parts = [experts[0::3] + [experts[0]], experts[1::3], experts[2::3]]
    shares = [expert_pay_shares(meta, part, copies) for part in parts]
    routed = Fraction(flops_per_token(meta, 0, NL) - trunk_flops_per_token(meta), flops_per_token(meta, 0, NL))
    assert sum(s for s, _ in shares) == routed < 1
    per_row = shares[0][1]
    assert per_row * K * NL == routed  # k rows per MoE layer per token at the per-row share: the routed part


def test_an_expert_nodes_run_is_spot_checked_against_its_own_receipt(gguf_path) -> None:
    """Issue 14, property 5 for expert work: one audited run of an expert node, re-executed on the validator's
    own expert shard, passes bit-exact when the node computed it and fails when the node sent a wrong reply;
    evidence the host edited (payload, reply, hash lists) is not backed by the node's receipt and is skipped."""
    import hashlib

    from mesh402.engine.expert_parallel import decode_reply, encode_reply
    from mesh402.serving.spot_checks import run_check
    from mesh402.work.evidence import UNVERIFIABLE, expert_check
    node = NodeIdentity.generate()
    experts = [(la, e) for la in range(NL) for e in range(E)]
    honest = ExpertShardWorker(gguf_path, experts)
    experts_for = lambda h, ex, mode: ExpertShardWorker(gguf_path, ex, mode=mode)  # noqa: E731
    gen = torch.Generator().manual_seed(3)

    def serve(cheat: bool) -> tuple[Any, list[bytes], list[bytes], list[bytes], list[bytes]]:
        accounts = ExpertAccounts(node)
        payloads, replies = [], []
        for la in range(NL):
            payload = encode_request(la, torch.randn(5, H, generator=gen), {1: [0, 3], 6: [1, 2, 4]})
            reply = honest.handle(payload)
            if cheat and la == NL - 1:  # the node returns something cheaper than the experts' output
                reply = encode_reply({e: y * 1.01 for e, y in decode_reply(reply).items()})
            accounts.record("host-id", "req-1", HASH, payload, reply)
            payloads.append(payload)
            replies.append(reply)
        r = accounts.receipt("host-id", "req-1", 1)
        return (r, [hashlib.sha256(p).digest() for p in payloads], [hashlib.sha256(y).digest() for y in replies],
                payloads, replies)

    r, ins, outs, payloads, replies = serve(cheat=False)
    for step in range(NL):
        res = run_check(expert_check(r, ins, outs, step, payloads[step], replies[step], "exact"), None, "", experts_for)
        assert res.ok and not res.skipped and res.rel_err == 0.0, res
    res = run_check(expert_check(r, ins, outs, 0, payloads[0], replies[0], "exact"), None)  # no expert loader
    assert res.skipped
    bad = encode_reply({e: y * 0.5 for e, y in decode_reply(replies[0]).items()})
    for c in (expert_check(r, ins, outs, 0, payloads[0], bad, "exact"),  # the host edits the reply
              expert_check(r, ins, outs, 0, payloads[1], replies[0], "exact"),  # or the payload
              expert_check(r, ins[:-1], outs[:-1], 0, payloads[0], replies[0], "exact")):  # or drops a run
        res = run_check(c, None, "", experts_for)
        assert res.ok and res.skipped and res.detail.startswith(UNVERIFIABLE), res

    r, ins, outs, payloads, replies = serve(cheat=True)
    step = NL - 1
    res = run_check(expert_check(r, ins, outs, step, payloads[step], replies[step], "exact"), None, "", experts_for)
    assert not res.ok and not res.skipped and res.rel_err > res.tolerance, res


def test_expert_pay_survives_requests_without_receipt_asks_and_refuses_bad_pay_params(gguf_path, tmp_path) -> None:
    """The host accrues a run as it sends it, so it and the node count the same work: a request that ends
    without a receipt ask (no token came out) is settled by the host and its final voucher rides the node's next
    first run, so the next request is not refused as behind, and the node ends holding exactly what it is owed.
    Pay params from the wire are bounded and typed: oversized or malformed terms, terms for another wallet, terms
    naming a payer other than the host's announced wallet and a malformed voucher map are refused (`unpaid`)
    before any work."""
    import json

    from mesh402.engine.expert_parallel import ExpertUnavailable
    from mesh402.serving.experts import ExpertPayer
    from mesh402.serving.work_pay import WorkTerms
    from tests.support.work_pay import pay_pair
    worker = ExpertShardWorker(gguf_path, [(0, e) for e in range(E)])
    p = pay_pair(tmp_path, coverage=10_000)
    terms = WorkTerms(p.issuer.address, p.wallet.worker, flat=30, per_token_micro=500_000)

    async def main() -> None:
        svc, tr, task = _paid_expert_link(worker, p.ledger)
        loop = asyncio.get_running_loop()
        payload = encode_request(0, torch.randn(4, H), {1: [0, 3], 6: [1, 2, 3]})  # 5 rows
        run = lambda rid: loop.run_in_executor(None, tr.call, "n1", payload, rid)  # noqa: E731
        bad = {"terms": "{" * 2000, "terms ": "x"}
        for params, why in ((bad, "no pay terms"), ({"terms": "[1]"}, "bad pay params"),
                            ({"terms": json.dumps({**terms.to_json(), "flat": -1})}, "bad pay params"),
                            ({"terms": json.dumps({**terms.to_json(), "payee": p.issuer.address})}, "not this worker")):
            with pytest.raises(ExpertUnavailable, match=why):
                await tr._call("n1", payload, "req-bad", params)
        svc.payer_of = {"host-id": "0x" + "11" * 20}.get  # the wallet the host announces on this escrow
        with pytest.raises(ExpertUnavailable, match="the terms name payer"):  # another entry's float: refused
            await tr._call("n1", payload, "req-bad", {"terms": json.dumps(terms.to_json())})
        assert svc.pay.live == {} and svc.requests == 0  # nothing opened, nothing ran
        svc.payer_of = {"host-id": p.issuer.address}.get

        tr.pay = ExpertPayer(p.issuer, {"n1": terms})
        await run("req-a")
        with pytest.raises(ExpertUnavailable, match="bad pay params"):  # a malformed voucher map: nothing runs
            await tr._call("n1", payload, "req-a", {"pay": "not json"})
        for _ in range(2):
            await run("req-a")
        assert tr.pay.settle("req-a") == 1  # the request ended with no receipt ask
        assert tr.pay.sessions == {}
        svc.pay.close("x:host-id:req-a")  # as the node does to a silent session: its work is owed
        assert p.ledger.held(p.issuer.address) < p.ledger.owed(p.issuer.address)  # the last run: not yet delivered
        for _ in range(3):  # the next request's first run re-delivers the settled voucher: not behind
            await run("req-b")
        await tr.ask_receipt("n1", "req-b", 1)
        task.cancel()
    asyncio.run(main())
    owed = p.ledger.owed(p.issuer.address)
    assert owed == 2 * (30 + -(-3 * 5 * 500_000 // 1_000_000)) == p.ledger.held(p.issuer.address)  # per request


def test_a_paid_request_that_ends_before_its_first_token_settles_its_expert_runs(gguf_path, tmp_path) -> None:
    """ExpertHostReceipts.finish on a request that produced no token (it failed in prefill): no receipt is asked,
    but the runs its expert nodes were sent are vouchered in full (ExpertPayer.settle), so the node's next first
    run carries a voucher covering them."""
    from types import SimpleNamespace

    from mesh402.serving.experts import ExpertPayer
    from mesh402.serving.work_pay import WorkTerms
    from tests.support.work_pay import pay_pair
    p = pay_pair(tmp_path, coverage=10_000)
    payer = ExpertPayer(p.issuer, {"n1": WorkTerms(p.issuer.address, p.wallet.worker, flat=30, per_token_micro=0)})
    payload = encode_request(0, torch.randn(4, H), {1: [0, 3]})
    assert "terms" in payer.run_params("n1", "req-0", payload)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        runner = SimpleNamespace(take=lambda rid: ({}, {}))
        hr = ExpertHostReceipts(NodeIdentity.generate(), None, HASH, NL, runner, SimpleNamespace(pay=payer), loop)
        assert hr.finish(hr.tally("req-0")) is None  # no token: no receipts
        while hr.pending:
            await asyncio.sleep(0.01)
    asyncio.run(main())
    assert payer.sessions == {} and p.issuer.issued(p.wallet.worker) == 30


class _CheatingShard:
    """An expert node that returns its experts' output scaled by 1.01 (and signs receipts over that reply)."""

    def __init__(self, worker: ExpertShardWorker) -> None:
        self.worker = worker

    def handle(self, payload: bytes) -> bytes:
        from mesh402.engine.expert_parallel import decode_reply, encode_reply
        return encode_reply({e: y * 1.01 for e, y in decode_reply(self.worker.handle(payload)).items()})


@pytest.mark.parametrize("cheat", [False, True], ids=["honest", "cheating-node"])
def test_the_host_audits_its_expert_nodes_runs_and_a_validator_judges_them(gguf_path, executor, cheat) -> None:
    """The host samples one run per expert node and request (its own randomness), and its auditor turns it into a
    spot check stored with the receipts; a validator's replay passes an honest node's run and fails a node that
    returned wrong outputs, while the host's other node passes."""
    from mesh402.serving.spot_checks import judge
    from mesh402.work.evidence import Auditor
    kept_checks: dict[str, list[Any]] = {}

    def sink(rs, evidence=None):
        kept_checks[rs[0].request_id] = list(evidence or [])

    async def main():
        model, tr, host, names = _host_model(gguf_path, executor, sink)
        model.receipts.auditor = Auditor(1.0, 3600)  # every request audited
        model.receipts.__post_init__()
        cheater = sorted(names)[0]
        if cheat:
            tr.workers[cheater] = _CheatingShard(tr.workers[cheater])
        _, steppers = await _run(model, False)
        for s in steppers:
            s.release()
        await asyncio.gather(*(asyncio.wrap_future(f) for f in list(model.receipts.pending)))
        return cheater
    cheater = asyncio.run(main())
    experts_for = lambda h, ex, mode: ExpertShardWorker(gguf_path, ex, mode=mode)  # noqa: E731
    checks = [c for cs in kept_checks.values() for c in cs]
    assert len(checks) == 4 and all(c.expert and c.step >= 0 for c in checks)  # 2 requests x 2 nodes
    verdict = judge(checks, lambda *a: None, "", experts_for)
    failed = {r.request_id for r in verdict.failed}
    by_node = {(c.request_id, c.node_id) for c in checks}
    if not cheat:
        assert verdict.failed == [] and verdict.checked == 4
    else:
        bad = [c for c in checks if c.node_id == cheater]
        assert {c.request_id for c in bad} == failed and len(verdict.failed) == 2, verdict.to_json()
        assert verdict.checked == 4 and len(by_node) == 4
