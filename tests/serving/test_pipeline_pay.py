"""A split request that pays its stages with escrow vouchers, in one process (real StageWorkers over in-memory
links, the real issuer, wallets and ledgers; the escrow's coverage stood in): the answer is the solo answer,
every stage ends holding a voucher for exactly the work it did, and a stage refuses (`unpaid`) an entry that
stops vouchering, a grant without pay terms, and an escrow that does not cover the first window."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mesh402.engine import Engine
from mesh402.serving.generation import LocalModel
from mesh402.serving.stage_link import StageError
from mesh402.serving.work_pay import MAX_PREPAID_STEPS, VOUCHER_EVERY
from tests.support.pipeline import build, run_gen
from tests.support.work_pay import StingySigner, pay_split

N = 2 * MAX_PREPAID_STEPS + 6  # decode steps: past several voucher rounds and past the window


@pytest.fixture(scope="module")
def prompt(solo: Engine) -> list[int]:
    text = solo.chat_template.render([{"role": "user", "content": "Name three rivers."}])
    return solo.tokenizer.encode(text, add_special=False)


@pytest.fixture(scope="module")
def solo_tokens(solo: Engine, executor, prompt) -> list[int]:
    return asyncio.run(run_gen(LocalModel(solo, executor), prompt, N))


async def settled(paid, timeout: float = 20.0) -> None:
    """Until every stage closed its sessions (CLOSE travels in a task after the answer)."""
    for _ in range(int(timeout / 0.05)):
        if all(not p.live for p in paid.pays.values()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("stages still hold paid sessions")


def test_paid_split_equals_solo_and_every_stage_is_vouchered_exactly(executor, prompt, solo_tokens,
                                                                     tmp_path: Path) -> None:
    async def main():
        model, mesh, _ = await build(executor, [0, 10, 20, 30])
        paid = pay_split(tmp_path, model, mesh.workers, 10**9)
        out = await run_gen(model, prompt, N)
        await settled(paid)
        return out, paid

    out, paid = asyncio.run(main())
    assert out == solo_tokens
    for node, wallet in paid.wallets.items():
        owed = wallet.owed(paid.issuer.address)
        assert owed > 0 and wallet.behind(paid.issuer.address) == 0, node  # vouchered exactly what it did
        assert paid.pays[node].stats.paused == 0 and paid.pays[node].stats.vouchers_kept >= N // VOUCHER_EVERY
    assert paid.issuer.totals() == {w.worker.lower(): w.owed(paid.issuer.address) for w in paid.wallets.values()}


def test_stage_refuses_an_entry_that_stops_vouchering(executor, prompt, tmp_path: Path) -> None:
    async def main():
        model, mesh, _ = await build(executor, [0, 15, 30])
        paid = pay_split(tmp_path, model, mesh.workers, 10**9)
        model.voucher_signer = StingySigner(paid.issuer, keep=2)  # OPEN's and the first step's, then no more
        with pytest.raises(StageError) as e:
            await run_gen(model, prompt, N)
        await settled(paid)
        return e.value, paid

    err, paid = asyncio.run(main())
    assert err.code == "unpaid" and "behind on vouchers" in str(err)
    wallet = paid.wallets["w0"]
    assert wallet.held(paid.issuer.address) is not None  # what it holds, it can redeem
    behind = wallet.behind(paid.issuer.address)
    assert behind > 0  # it worked at most the window ahead ...


def _sampling():
    from mesh402.engine.sampling import SamplingParams
    return SamplingParams(temperature=0, seed=1)


def test_stage_refuses_unpaid_grants_and_uncovered_escrow(executor, tmp_path: Path) -> None:
    async def main():
        model, mesh, _ = await build(executor, [0, 15, 30])
        paid = pay_split(tmp_path, model, mesh.workers, 10**9)
        terms = model.pay_terms
        model.pay_terms = None  # an entry that names no pay for the stage
        with pytest.raises(StageError) as e1:
            await model.open(64, _sampling())
        model.pay_terms = terms
        paid.chain.amounts = {k: 1 for k in paid.chain.amounts}  # the escrow covers 1 atomic unit
        with pytest.raises(StageError) as e2:
            await model.open(64, _sampling())
        return e1.value, e2.value

    e1, e2 = asyncio.run(main())
    assert e1.code == "unpaid" and "no pay terms" in str(e1)
    assert e2.code == "unpaid" and "lock a float" in str(e2)


def test_stage_refuses_terms_naming_a_payer_its_host_does_not_announce(executor, tmp_path: Path) -> None:
    """A host that names another entry's wallet as the payer (to run work on that entry's float) is refused
    before any work; the host's own announced wallet is taken."""
    async def main():
        model, mesh, _ = await build(executor, [0, 15, 30])
        paid = pay_split(tmp_path, model, mesh.workers, 10**9)
        worker = next(iter(mesh.workers.values()))
        worker.payer_of = lambda host: "0x" + "ab" * 20  # what the host announces: not the grant's payer
        with pytest.raises(StageError) as e:
            await model.open(64, _sampling())
        worker.payer_of = lambda host: paid.issuer.address
        s = await model.open(64, _sampling())
        s.release()
        return e.value
    e = asyncio.run(main())
    assert e.code == "unpaid" and "announces" in str(e)


def test_a_stage_killed_mid_request_the_others_and_its_replacement_are_paid_for_the_replay(executor, prompt,
                                                                                          solo_tokens,
                                                                                          tmp_path: Path) -> None:
    async def main():
        model, mesh, _ = await build(executor, [0, 10, 20, 30], standbys=["standby"])
        paid = pay_split(tmp_path, model, mesh.workers, 10**9)
        out = await run_gen(model, prompt, N, kill_after=VOUCHER_EVERY + 3, on_kill=lambda: mesh.kill("w1"))
        # the survivor's old session waits on the dead stage (in memory, no stream error ends it): count it live
        for _ in range(400):
            if not paid.pays["standby"].live and len(paid.pays["w0"].live) <= 1:
                break
            await asyncio.sleep(0.05)
        return out, paid, model

    out, paid, model = asyncio.run(main())
    assert out == solo_tokens and model.stats.failovers == 1
    entry = paid.issuer.address
    for node in ("w0", "standby"):  # the survivor redid the replayed steps, the standby did them first
        assert paid.pays[node].stats.sessions_paid >= 1 and paid.pays[node].stats.paused == 0, node
        assert paid.pays[node].unvouchered(entry) <= 0, node  # every session, old and new, vouchered in full
    assert paid.pays["w0"].stats.sessions_paid == 2
