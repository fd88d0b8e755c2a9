"""The voucher rule between an entry and its workers (serving.work_pay) with the real issuer, wallet and
ledger (economics.vouchers) and a stand-in for the escrow's coverage on chain: the entry vouchers on the
first step, every VOUCHER_EVERY steps and at CLOSE; a worker works at most its live sessions' last window of
steps ahead of covered vouchers, pauses an entry that falls behind (`unpaid` on the wire), and opens nothing
the escrow cannot cover."""

from __future__ import annotations

import asyncio
from fractions import Fraction
from pathlib import Path

import pytest

from mesh402.serving.work_pay import (MAX_PREPAID_STEPS, MICRO, VOUCHER_EVERY, EntrySessionPay, WorkerPay, WorkTerms,
                                      micro_to_atomic, share_terms)
from tests.support.work_pay import PayPair, pay_pair

ROWS = 4  # tokens per decode-like step in these tests
RATE = 250_000  # per_token_micro: a quarter of an atomic unit per token


def terms(p: PayPair, *, flat: int = 3, rate: int = RATE) -> WorkTerms:
    return WorkTerms(p.issuer.address, p.wallet.worker, flat, rate)


def session(p: PayPair, key: str = "req-1", **kw: int) -> tuple[EntrySessionPay, WorkerPay, WorkTerms]:
    t = terms(p, **kw)
    return EntrySessionPay(p.issuer, {"w": t}, key), WorkerPay(p.ledger, rows_per_step=ROWS), t


async def run_steps(entry: EntrySessionPay, worker: WorkerPay, key: str, n: int, *, pay: bool = True) -> str | None:
    """n steps as the stage link runs them: the entry's vouchers ride the step, the worker keeps its own
    voucher, then accounts the step. The first refusal, else None."""
    for _ in range(n):
        attached = entry.step(ROWS)
        why = await worker.vouchers(key, attached if pay else None, "w")
        why = why or worker.step(key, ROWS)
        if why is not None:
            return why
    return None


def test_terms_are_bounded_and_shares_never_overpay() -> None:
    a, b = "0x" + "1" * 40, "0x" + "2" * 40
    ok = WorkTerms.from_json({"payer": a, "payee": b, "flat": 5, "per_token_micro": 7})
    assert ok == WorkTerms(a, b, 5, 7) and WorkTerms.from_json(ok.to_json()) == ok
    for bad in ({"payer": a}, {"payer": a, "payee": "0x12"}, {"payer": a, "payee": b, "flat": -1},
                {"payer": a, "payee": b, "flat": 1 << 64}, {"payer": a, "payee": b, "flat": True},
                {"payer": a, "payee": b, "per_token_micro": 1.5}, [a, b], None):
        with pytest.raises(ValueError):
            WorkTerms.from_json(bad)
    shares = [Fraction(1, 3), Fraction(1, 3), Fraction(1, 3)]
    got = [share_terms(a, b, s, 1000, 7) for s in shares]
    assert sum(t.flat for t in got) <= 1000 and sum(t.per_token_micro for t in got) <= 7 * MICRO // 1000
    assert got[0].flat == 333 and got[0].per_token_micro == 2333
    with pytest.raises(ValueError):
        share_terms(a, b, Fraction(3, 2), 1, 1)
    assert micro_to_atomic(1) == 1 and micro_to_atomic(MICRO) == 1 and micro_to_atomic(0) == 0


def test_entry_vouchers_first_step_every_window_and_close(tmp_path: Path) -> None:
    p = pay_pair(tmp_path, 10**9)
    entry, _, t = session(p)
    sent = [i for i in range(1, 50) if entry.step(ROWS) is not None]
    assert sent == [1, VOUCHER_EVERY, 2 * VOUCHER_EVERY, 3 * VOUCHER_EVERY]
    final = entry.vouchers()
    assert final is not None
    owed = t.flat * MICRO + 49 * ROWS * t.per_token_micro
    assert int(final["w"]["cumulativeAmount"]) == micro_to_atomic(owed)
    # the same session's vouchers raise one running total; another session adds its own on top
    other = EntrySessionPay(p.issuer, {"w": t}, "req-2")
    other.step(ROWS)
    assert p.issuer.issued(p.wallet.worker) == micro_to_atomic(owed) + micro_to_atomic(t.flat * MICRO + ROWS * RATE)
    assert EntrySessionPay(p.issuer, {}, "free").step(ROWS) is None  # no paid workers: nothing attached


def test_a_paying_entry_is_never_paused_and_settles_exactly(tmp_path: Path) -> None:
    p = pay_pair(tmp_path, 10**9)
    entry, worker, t = session(p)

    async def main() -> None:
        assert await worker.open("req-1", t, (entry.opening() or {})["w"]) is None
        assert await run_steps(entry, worker, "req-1", 5 * VOUCHER_EVERY + 3) is None
        assert await worker.vouchers("req-1", entry.vouchers(), "w") is None  # CLOSE
        worker.close("req-1")
    asyncio.run(main())
    assert p.wallet.behind(p.issuer.address) == 0  # owed == vouchered: nothing lost, nothing extra
    assert worker.status()["paused"] == 0 and worker.status()["live_sessions"] == 0


def test_an_entry_that_stops_vouchering_is_paused_after_the_window(tmp_path: Path) -> None:
    p = pay_pair(tmp_path, 10**9)
    entry, worker, t = session(p, flat=0)

    async def main() -> None:
        assert await worker.open("req-1", t) is None
        assert await run_steps(entry, worker, "req-1", 1) is None  # the first step's voucher
        # from here on the vouchers are dropped: a window of steps is allowed, the next is refused
        assert await run_steps(entry, worker, "req-1", MAX_PREPAID_STEPS, pay=False) is None
        why = await run_steps(entry, worker, "req-1", 1, pay=False)
        assert why is not None and "behind on vouchers" in why
        worker.close("req-1")
        # a new session from the same entry is refused while it is behind ...
        entry2, worker_same, _ = EntrySessionPay(p.issuer, {"w": t}, "req-2"), worker, t
        refused = await worker_same.open("req-2", t)
        assert refused is not None and "behind on vouchers" in refused
        # ... and admitted once the entry's voucher covers what it owes (e.g. a lost CLOSE, sent at OPEN)
        p.issuer.pay(p.wallet.worker, micro_to_atomic((MAX_PREPAID_STEPS + 1) * ROWS * RATE))
        assert await worker_same.open("req-2", t, (entry2.opening() or {})["w"]) is None
    asyncio.run(main())
    assert worker.status()["paused"] == 2


def test_the_window_is_per_live_session_and_shared_per_entry(tmp_path: Path) -> None:
    p = pay_pair(tmp_path, 10**9)
    t = terms(p, flat=0)
    a, b = EntrySessionPay(p.issuer, {"w": t}, "a"), EntrySessionPay(p.issuer, {"w": t}, "b")
    worker = WorkerPay(p.ledger, rows_per_step=ROWS)

    async def main() -> None:
        assert await worker.open("a", t) is None and await worker.open("b", t) is None
        assert await worker.open("a", t) is not None  # one session key, one accrual
        assert await run_steps(a, worker, "a", 1) is None and await run_steps(b, worker, "b", 1) is None
        # both sessions stop paying: together they get their two windows, not more
        for _ in range(MAX_PREPAID_STEPS):
            assert await run_steps(a, worker, "a", 1, pay=False) is None
            assert await run_steps(b, worker, "b", 1, pay=False) is None
        assert await run_steps(a, worker, "a", 1, pay=False) is not None
    asyncio.run(main())


def test_a_worker_opens_nothing_the_escrow_cannot_cover(tmp_path: Path) -> None:
    need = micro_to_atomic(3 * MICRO + MAX_PREPAID_STEPS * ROWS * RATE)  # the first window of work
    p = pay_pair(tmp_path, need - 1)
    entry, worker, t = session(p)

    async def main() -> None:
        why = await worker.open("req-1", t)
        assert why is not None and "lock a float" in why
        p.chain.set(p.issuer.address, p.wallet.worker, need)
        assert await worker.open("req-1", t) is None
        # a voucher beyond the escrow does not count: the entry is paused
        p.issuer.pay(p.wallet.worker, need)
        why = await run_steps(entry, worker, "req-1", 1)
        assert why is not None and "exceeds what the escrow covers" in why
        assert p.ledger.held(p.issuer.address) == 0
    asyncio.run(main())


def test_grant_for_another_wallet_and_foreign_vouchers_are_refused(tmp_path: Path) -> None:
    p, q = pay_pair(tmp_path / "p", 10**9), pay_pair(tmp_path / "q", 10**9)
    worker = WorkerPay(p.ledger, rows_per_step=ROWS)
    stranger = WorkTerms(p.issuer.address, q.wallet.worker, 0, RATE)

    async def main() -> None:
        why = await worker.open("s", stranger)
        assert why is not None and "not this worker's wallet" in why
        t = terms(p)
        assert await worker.open("s", t) is None
        # a voucher signed by another entry for this worker, and one for another worker, never count
        wrong_entry = q.issuer.pay(p.wallet.worker, 5).to_json()
        why = await worker.vouchers("s", {"w": wrong_entry}, "w")
        assert why is not None and "names entry" in why
        other_worker = p.issuer.pay(q.wallet.worker, 5).to_json()
        why = await worker.vouchers("s", {"w": other_worker}, "w")
        assert why is not None and "not this worker" in why
        assert await worker.vouchers("s", {"other-node": other_worker}, "w") is None  # not ours: passes by
        assert await worker.vouchers("s", {"w": {"junk": 1}}, "w") is not None
    asyncio.run(main())
    assert p.ledger.held(p.issuer.address) == 0


def test_grant_terms_are_signed_with_the_grant() -> None:
    import json

    from mesh402.mesh.identity import NodeIdentity
    from mesh402.serving.stage_link import Hop, OpenGrant, StageError
    host = NodeIdentity.generate()
    a, b = "0x" + "1" * 40, "0x" + "2" * 40
    grant = OpenGrant("rid", "ch", 1, (Hop("w0", 0, 15),), 64, "{}", False, "n1", {"w0": WorkTerms(a, b, 5, 7)})
    params = grant.sign(host)
    got, signer = OpenGrant.verify(params)
    assert got == grant and signer == host.node_id_hex
    body = json.loads(params["grant"])
    body["pay"]["w0"]["per_token_micro"] = 7_000_000  # a raise the host never signed
    with pytest.raises(StageError) as e:
        OpenGrant.verify({**params, "grant": json.dumps(body, separators=(",", ":"), sort_keys=True)})
    assert e.value.code == "bad_grant"
    # a grant without terms signs the same bytes as before terms existed (older hosts and workers agree)
    plain = OpenGrant("rid", "ch", 1, (Hop("w0", 0, 15),), 64, "{}", False, "n1")
    assert b'"pay"' not in plain.payload()
    bad = json.loads(plain.payload())
    bad["pay"] = {"w0": {"payer": a, "payee": b, "flat": -1}}
    raw = json.dumps(bad, separators=(",", ":"), sort_keys=True).encode()
    with pytest.raises(StageError):
        OpenGrant.verify({"grant": raw.decode(), "host": host.node_id_hex, "sig": host.sign(raw).hex()})


def test_routed_requests_are_prepaid_netted_and_never_admitted_beyond_the_voucher(tmp_path: Path) -> None:
    """A routed host (RoutedPay) with the entry's issuer (VoucherIssuer.routed): each request's voucher covers
    what the host earned plus the most the requests in flight can cost; the host's report nets the prepayment;
    an uncovered, inflated, malformed or concurrent-beyond-cover request is refused before any work."""
    import json

    from mesh402.serving.work_pay import MAX_ROUTED_LIVE, RoutedPay
    p = pay_pair(tmp_path, coverage=1_000)
    host = RoutedPay(p.ledger)
    w = p.wallet.worker
    hdr = lambda v: json.dumps(v.to_json())  # noqa: E731

    async def go() -> None:
        v1 = p.issuer.routed(w, 100)  # the most request 1 can cost
        entry, why = await host.admit("r1", hdr(v1), 100)
        assert why is None and entry == p.issuer.address.lower()
        assert host.earned(entry) == 100  # in flight at its most
        # a second request in flight with a voucher that does not add its own most is refused
        _, why = await host.admit("r2", hdr(v1), 50)
        assert why is not None and "needs 150" in why
        host.done("r1", 60)  # it cost less than its most
        assert p.ledger.owed(entry) == 60 and host.earned(entry) == 60
        p.issuer.routed_earned(w, host.earned(entry))
        v2 = p.issuer.routed(w, 100)  # netted: 60 earned + 100 at most, above the 100 vouchered before
        assert v2.cumulative == 160
        assert (await host.admit("r3", hdr(v2), 100))[1] is None
        host.done("r3", 500)  # a cost above what was admitted is capped at it
        assert p.ledger.owed(entry) == 160
        # the host overstating what it earned gets no more than the entry already vouchered
        assert p.issuer.routed_earned(w, 10**9) == 160 and p.issuer.routed(w, 0).cumulative == 160
        # bad input: refused, nothing admitted
        for raw in ("{", "x" * 5000, json.dumps({"entry": "nobody"}), json.dumps([1])):
            assert (await host.admit("bad", raw, 1))[1] is not None
        inflated = {**v2.to_json(), "cumulativeAmount": str(10_000)}
        assert "voucher refused" in ((await host.admit("bad", json.dumps(inflated), 1))[1] or "")
        p.chain.set(p.issuer.address, w, 200)  # the escrow covers less than a new voucher would ask
        v3 = p.issuer.routed(w, 100)
        assert "escrow covers" in ((await host.admit("r4", hdr(v3), 100))[1] or "")
        assert host.live == {} and host.stats.admitted == 2
        host.done("unknown", 5)  # an id never admitted changes nothing
        assert p.ledger.owed(entry) == 160
        assert MAX_ROUTED_LIVE >= 64
    asyncio.run(go())


def test_a_routed_voucher_is_taken_only_from_the_member_that_announces_its_entry_wallet(tmp_path: Path) -> None:
    """A voucher is public once redeemed: replayed through the tunnel by another member (or by a member that
    announces no wallet on this escrow) it buys nothing, even where the entry's prepayment has room for it."""
    import json

    from mesh402.serving.work_pay import RoutedPay
    p = pay_pair(tmp_path, coverage=1_000)
    entry = p.issuer.address.lower()
    announced = {"entry-node": p.issuer.address, "evil-node": "0x" + "ee" * 20}
    host = RoutedPay(p.ledger, payer_of=announced.get)
    raw = json.dumps(p.issuer.routed(p.wallet.worker, 100).to_json())

    async def go() -> None:
        for peer in ("evil-node", "unknown-node", ""):
            got, why = await host.admit("r-" + peer, raw, 10, peer)
            assert got is None and why is not None and "announces" in why, why
        assert host.live == {} and p.ledger.held(entry) == 0  # nothing kept from a refused sender
        got, why = await host.admit("r1", raw, 10, "entry-node")
        assert why is None and got == entry
        host.done("r1", 10)  # 90 of the prepayment left unused: still only the entry's own member may use it
        assert (await host.admit("r2", raw, 10, "evil-node"))[0] is None
        assert (await host.admit("r3", raw, 10, "entry-node"))[1] is None
    asyncio.run(go())
