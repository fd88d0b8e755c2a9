"""The node-side voucher classes (economics.vouchers, node.escrow_jobs) against MeshEscrow on a real local
chain (anvil, `mesh402 chain dev`): the entry's issuer signs ever-higher cumulative vouchers that survive a
restart, the worker's wallet and ledger keep only the best voucher that is really theirs and covered, and the
redeemer turns them into tokens once. What a hostile entry or worker might try — a forged signature, an
inflated amount, a voucher for another worker, redeeming twice or beyond the escrow — reverts on chain and is
refused by the wallet before it counts (issue 14, tests (c) and (f) at the contract and wrapper level)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.procs import MESH402, REPO
from mesh402.economics.vouchers import EscrowRef, VoucherBook, VoucherIssuer, VoucherWallet, WorkerLedger
from mesh402.node.escrow_jobs import Redeemer
from tests.support.work_contracts import USDC, Actor, WorkEnv, reverts, work_env


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkEnv]:
    with work_env(tmp_path_factory.mktemp("vouchers")) as e:
        yield e


def ref(env: WorkEnv) -> EscrowRef:
    return EscrowRef(env.escrow.chain_id, env.escrow.address)


def funded_entry(env: WorkEnv, locked: dict[str, int], free: int = 0) -> Actor:
    entry = env.actor(free + sum(locked.values()))
    env.escrow.deposit(entry.key, free + sum(locked.values()))
    if locked:
        env.escrow.lock(entry.key, locked)
    return entry


def test_issuer_signs_rising_totals_that_survive_a_restart(env: WorkEnv, tmp_path: Path) -> None:
    entry, worker = env.actor(), env.actor()
    issuer = VoucherIssuer(VoucherBook(tmp_path), entry.key, ref(env))
    v1 = issuer.pay(worker.address, 3 * USDC)
    v2 = issuer.pay(worker.address, 2 * USDC)
    assert (v1.cumulative, v2.cumulative) == (3 * USDC, 5 * USDC)
    assert env.escrow.check_voucher(v2).reason != "voucher signature is not the entry's"
    issuer.book.close()
    again = VoucherIssuer(VoucherBook(tmp_path), entry.key, ref(env))  # a restart never signs less than sent
    assert again.issued(worker.address) == 5 * USDC
    assert again.pay(worker.address, 1).cumulative == 5 * USDC + 1
    with pytest.raises(ValueError):
        again.pay(worker.address, -1)


def test_pay_to_total_raises_each_session_once(env: WorkEnv, tmp_path: Path) -> None:
    entry, worker = env.actor(), env.actor()
    issuer = VoucherIssuer(VoucherBook(tmp_path), entry.key, ref(env))
    a1 = issuer.pay_to_total(worker.address, "req-a", 1_500_000)  # 1.5 atomic rounds up to 2
    assert a1.cumulative == 2
    assert issuer.pay_to_total(worker.address, "req-a", 2_000_000).cumulative == 2  # already covered: same voucher
    b = issuer.pay_to_total(worker.address, "req-b", 10_000_000)  # another session adds its own total
    assert b.cumulative == 12
    a2 = issuer.pay_to_total(worker.address, "req-a", 5_000_000)
    assert a2.cumulative == 15 and issuer.issued(worker.address) == 15
    assert issuer.pay_to_total(worker.address, "req-a", 1).cumulative == 15  # a lower total never lowers


def test_wallet_keeps_the_best_voucher_and_redeems_it_once(env: WorkEnv, tmp_path: Path) -> None:
    worker, other = env.actor(), env.actor()
    entry = funded_entry(env, {worker.address: 50 * USDC})
    issuer = VoucherIssuer(VoucherBook(tmp_path / "entry"), entry.key, ref(env))
    wallet = VoucherWallet(VoucherBook(tmp_path / "worker"), worker.address, ref(env))
    v10, v30 = issuer.pay(worker.address, 10 * USDC), issuer.pay(worker.address, 20 * USDC)
    for v in (v30, v10):
        assert wallet.check(v, entry.address) is None
    assert wallet.keep(v30) and not wallet.keep(v10)  # an older, lower voucher never replaces the best
    assert wallet.held(entry.address) == v30
    wallet.work(entry.address, 35 * USDC)
    assert wallet.behind(entry.address) == 5 * USDC
    assert wallet.summary()[entry.address.lower()] == {"owed": 35 * USDC, "vouchered": 30 * USDC}

    # anyone may submit (a relayer pays the gas); the tokens go to the worker
    redeemer = Redeemer(env.escrow, wallet, other.key, every_s=3600)
    asyncio.run(redeemer.run_once())
    assert redeemer.state.last_error == "" and redeemer.state.total == 30 * USDC
    assert env.balance(worker.address) == 30 * USDC and env.balance(other.address) == 0
    asyncio.run(redeemer.run_once())  # nothing new: no second transaction, nothing paid twice
    assert redeemer.state.total == 30 * USDC and env.balance(worker.address) == 30 * USDC
    reverts("AlreadyRedeemed", env.escrow.redeem, worker.key, v30)
    reverts("AlreadyRedeemed", env.escrow.redeem, worker.key, v10)


def test_forged_inflated_and_misdirected_vouchers_are_refused_and_revert(env: WorkEnv, tmp_path: Path) -> None:
    worker, thief, mallory = env.actor(), env.actor(), env.actor()
    entry = funded_entry(env, {worker.address: 20 * USDC, thief.address: 1 * USDC})
    issuer = VoucherIssuer(VoucherBook(tmp_path), entry.key, ref(env))
    wallet = VoucherWallet(VoucherBook(tmp_path / "w"), worker.address, ref(env))
    good = issuer.pay(worker.address, 5 * USDC)

    forged = env.escrow.sign(mallory.key, worker.address, 5 * USDC)  # signed by someone else, naming the entry
    forged = dataclasses.replace(forged, entry=entry.address)
    inflated = dataclasses.replace(good, cumulative=15 * USDC)  # the entry's signature over another amount
    for_thief = issuer.pay(thief.address, 1 * USDC)
    stolen = dataclasses.replace(for_thief, worker=worker.address)  # the thief's voucher, renamed

    assert "not the entry's" in (wallet.check(forged, entry.address) or "")
    assert "not the entry's" in (wallet.check(inflated, entry.address) or "")
    assert "not this worker" in (wallet.check(for_thief, entry.address) or "")
    assert "not the entry's" in (wallet.check(stolen, entry.address) or "")
    assert "names entry" in (wallet.check(good, mallory.address) or "")
    for bad in (forged, inflated, stolen):
        reverts("InvalidSignature", env.escrow.redeem, worker.key, bad)
    # a voucher for another worker pays that worker only, whoever submits it
    env.escrow.redeem(worker.key, for_thief)
    assert env.balance(thief.address) == 1 * USDC and env.balance(worker.address) == 0


def test_ledger_counts_a_voucher_only_within_the_escrow(env: WorkEnv, tmp_path: Path) -> None:
    worker = env.actor()
    entry = funded_entry(env, {worker.address: 10 * USDC}, free=5 * USDC)
    issuer = VoucherIssuer(VoucherBook(tmp_path / "e"), entry.key, ref(env))
    wallet = VoucherWallet(VoucherBook(tmp_path), worker.address, ref(env))
    ledger = WorkerLedger(wallet, env.escrow, coverage_ttl_s=3600)

    async def run() -> None:
        assert await ledger.headroom(entry.address) == 10 * USDC
        assert await ledger.accept(entry.address, issuer.pay(worker.address, 4 * USDC).to_json()) is None
        assert ledger.held(entry.address) == 4 * USDC and await ledger.headroom(entry.address) == 6 * USDC
        over = issuer.pay(worker.address, 8 * USDC)  # 12 in total: more than the 10 locked for this worker
        why = await ledger.accept(entry.address, over.to_json())
        assert why is not None and "exceeds what the escrow covers" in why
        assert ledger.held(entry.address) == 4 * USDC  # refused: it never counted
        assert "not a voucher" in (await ledger.accept(entry.address, {"entry": entry.address}) or "")
        # the entry locks more: the cached coverage is read again because the voucher asks for more
        env.escrow.lock(entry.key, {worker.address: 5 * USDC})
        assert await ledger.accept(entry.address, over) is None
        assert ledger.held(entry.address) == 12 * USDC
    asyncio.run(run())
    # beyond the escrow reverts on chain as well (the worker cannot redeem what was never locked)
    beyond = issuer.pay(worker.address, 4 * USDC)  # 16 > 15 locked
    reverts("InsufficientEscrow", env.escrow.redeem, worker.key, beyond)
    env.escrow.redeem(worker.key, wallet.held(entry.address))
    assert env.balance(worker.address) == 12 * USDC


def test_keeper_locks_each_workers_float_above_what_was_vouchered(env: WorkEnv, tmp_path: Path) -> None:
    from mesh402.node.escrow_jobs import EscrowKeeper
    w1, w2 = env.actor(), env.actor()
    entry = funded_entry(env, {}, free=6 * USDC)
    issuer = VoucherIssuer(VoucherBook(tmp_path), entry.key, ref(env))
    keeper = EscrowKeeper(env.escrow, issuer, entry.key, lambda: {w1.address, w2.address}, float_amount=2 * USDC,
                          every_s=3600)
    asyncio.run(keeper.run_once())
    assert keeper.state.last_error == ""
    assert [env.escrow.coverage(entry.address, w) for w in (w1.address, w2.address)] == [2 * USDC, 2 * USDC]
    issuer.pay(w1.address, 1_500_000)  # w1 worked: its float is topped up, w2's is left alone
    asyncio.run(keeper.run_once())
    assert env.escrow.coverage(entry.address, w1.address) == 3_500_000
    assert env.escrow.coverage(entry.address, w2.address) == 2 * USDC
    assert keeper.needs() == {}  # nothing short: no transaction on the next round
    issuer.pay(w2.address, 4 * USDC)  # more than the free balance left (0.5): it locks what there is
    asyncio.run(keeper.run_once())
    assert env.escrow.coverage(entry.address, w2.address) == 2_500_000 and env.escrow.free_balance(entry.address) == 0
    asyncio.run(keeper.run_once())  # empty, and nothing in the vault to sweep: a clear error, nothing sent
    assert "empty" in keeper.state.last_error
    # revenue settled to the entry's vault (x402 payTo) is swept in and locked on the next round
    env.mint(env.escrow.vault_of(entry.address), 5 * USDC)
    asyncio.run(keeper.run_once())
    assert keeper.state.last_error == "" and env.escrow.coverage(entry.address, w2.address) == 6 * USDC


def test_the_redeem_command_redeems_what_the_home_holds_once_and_fails_cleanly(env: WorkEnv, tmp_path: Path) -> None:
    """`mesh402 redeem` as a worker's operator runs it: every held voucher in one transaction, paid to the
    worker whoever pays the gas; a second run sends nothing; bad input is one line and no transaction."""
    worker, relayer, other = env.actor(), env.actor(), env.actor()
    entry = funded_entry(env, {worker.address: 20 * USDC})
    entry2 = funded_entry(env, {worker.address: 5 * USDC})
    home = tmp_path / "worker"
    wallet = VoucherWallet(VoucherBook(home), worker.address, ref(env))
    for e, amount in ((entry, 7 * USDC), (entry2, 2 * USDC)):
        assert wallet.keep(VoucherIssuer(VoucherBook(tmp_path / e.address), e.key, ref(env)).pay(worker.address, amount))
    other_entry = funded_entry(env, {worker.address: 1 * USDC})  # in the book but redeemed already: not sent
    spent = VoucherIssuer(VoucherBook(tmp_path / "o"), other_entry.key, ref(env)).pay(worker.address, 1 * USDC)
    env.escrow.redeem(other.key, spent)  # anyone may submit it; the worker was paid
    assert wallet.keep(spent)
    theirs = VoucherIssuer(VoucherBook(tmp_path / "o2"), other_entry.key, ref(env)).pay(other.address, 1)
    assert not wallet.keep(theirs)  # another worker's voucher is never held, checked or not
    wallet.book.close()
    key_file = tmp_path / "gas.key"
    key_file.write_text(relayer.key)
    key_file.chmod(0o600)
    env_vars = {k: v for k, v in os.environ.items() if k != "MESH402_OWNER_KEY"}

    def redeem(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*MESH402, "redeem", *args], capture_output=True, text=True, timeout=180, cwd=REPO,
                              env=env_vars)

    ok = ("--home", str(home), "--deployment", str(env.chain.dir), "--key-file", str(key_file))
    r = redeem(*ok)
    assert r.returncode == 0 and "redeemed 2 voucher(s)" in r.stdout, r.stdout + r.stderr
    assert env.balance(worker.address) == 10 * USDC and env.balance(relayer.address) == 0
    r = redeem(*ok)
    assert r.returncode == 0 and "nothing to redeem" in r.stdout, r.stdout + r.stderr
    assert env.balance(worker.address) == 10 * USDC  # nothing paid twice
    for args, says in (
            (("--home", str(tmp_path / "empty"), *ok[2:]), "no vouchers in"),
            ((*ok[:2], "--deployment", str(tmp_path / "missing.json"), *ok[4:]), "missing.json"),
            (ok[:4], "--key-file")):
        r = redeem(*args)
        lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
        assert r.returncode != 0 and len(lines) == 1 and says in lines[0], (args, r.stdout, r.stderr)
    assert env.balance(worker.address) == 10 * USDC


def test_coverage_reads_of_a_flood_of_fresh_entry_addresses_stay_capped(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Anyone may ask a worker for work as a new entry address, and each asks for a chain read of its
    coverage: the worker's cache of those reads is capped (oldest dropped), so a flood of addresses cannot
    grow it; a recent entry's read is still served from the cache."""
    from mesh402.economics import vouchers

    monkeypatch.setattr(vouchers, "MAX_COVERAGE_CACHED", 64)
    reads: list[str] = []

    class Chain:  # no escrow for anyone: what a flood of unfunded addresses gets
        def coverage(self, entry: str, worker: str) -> int:
            reads.append(entry)
            return 0

    worker = "0x" + "11" * 20
    ledger = WorkerLedger(VoucherWallet(VoucherBook(tmp_path), worker, EscrowRef(31337, "0x" + "22" * 20)), Chain(),
                          coverage_ttl_s=3600)

    async def run() -> None:
        for i in range(1000):
            assert await ledger.headroom(f"0x{i:040x}") == 0
        assert len(ledger._coverage) == 64
        n = len(reads)
        assert await ledger.headroom(f"0x{999:040x}") == 0 and len(reads) == n  # recent: cached
        assert await ledger.headroom(f"0x{0:040x}") == 0 and len(reads) == n + 1  # evicted: read again

    asyncio.run(run())
