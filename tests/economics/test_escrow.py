"""MeshEscrow on a real local chain (`mesh402 chain dev`, anvil): an entry's vouchers pay a worker up to what
the entry signed, once, and only from escrow the entry cannot take back while vouchers are outstanding.
One chain for the module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from web3.logs import DISCARD

from mesh402.economics.contractcall import BoundContract
from tests.support.work_contracts import USDC, Actor, WorkEnv, reverts, work_env



class VaultContract(BoundContract):
    NAME = "EscrowVault"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkEnv]:
    with work_env(tmp_path_factory.mktemp("escrow")) as e:
        yield e


def funded_entry(env: WorkEnv, free: int, locked: dict[str, int]) -> Actor:
    """An entry that deposited `free + sum(locked)` and locked `locked` per worker."""
    entry = env.actor(free + sum(locked.values()))
    env.record("deposit", env.escrow.deposit(entry.key, free + sum(locked.values())))
    if locked:
        env.record(f"lock({len(locked)} worker)", env.escrow.lock(entry.key, locked))
    return entry


def test_chain_dev_deploys_the_work_contracts(env: WorkEnv) -> None:
    c = env.chain.dep.contracts
    for name in ("MeshEscrow", "MeshStaking", "SpotCheckQuorum"):
        assert env.w3.eth.get_code(c[name]), name
    assert env.staking.fn.slasher().call() == c["SpotCheckQuorum"]
    assert env.quorum.fn.staking().call() == c["MeshStaking"]
    assert env.quorum.fn.treasury().call() == env.deployer
    assert env.escrow.fn.token().call() == env.staking.fn.token().call() == env.chain.dep.asset.address
    assert env.staking.unbonding_delay > env.quorum.params().longest_check_s


def test_python_voucher_is_the_contracts_eip712_message(env: WorkEnv) -> None:
    from eth_account import Account

    from mesh402.economics.escrow import Voucher, sign_voucher, voucher_signer
    entry, worker = Account.create(), Account.create()
    v = sign_voucher(entry.key.hex(), env.escrow.chain_id, env.escrow.address, worker.address, 12_345)
    digest = env.escrow.fn.voucherDigest(entry.address, worker.address, 12_345).call()
    assert Account._recover_hash(digest, signature=v.signature) == entry.address
    assert voucher_signer(v, env.escrow.chain_id, env.escrow.address) == entry.address
    assert Voucher.from_json(v.to_json()) == v
    # bound to the chain and the contract
    assert voucher_signer(v, env.escrow.chain_id + 1, env.escrow.address) != entry.address
    assert voucher_signer(v, env.escrow.chain_id, env.staking.address) != entry.address
    with pytest.raises(ValueError):
        Voucher.from_json({"entry": entry.address})


def test_vouchers_pay_up_to_the_signed_cumulative_amount_once(env: WorkEnv) -> None:
    worker, relayer = env.actor(), env.actor()
    entry = funded_entry(env, 0, {worker.address: 60 * USDC})
    v10, v25, v40 = (env.escrow.sign(entry.key, worker.address, n * USDC) for n in (10, 25, 40))
    assert env.escrow.check_voucher(v25, worker=worker.address).ok
    # anyone may submit; the tokens go to the worker; one transaction covers everything up to 25
    env.record("redeem(first)", env.escrow.redeem(relayer.key, v25))
    assert env.balance(worker.address) == 25 * USDC and env.balance(relayer.address) == 0
    reverts("AlreadyRedeemed", env.escrow.redeem, worker.key, v25)
    reverts("AlreadyRedeemed", env.escrow.redeem, worker.key, v10)  # an older, lower voucher is spent too
    rcpt = env.record("redeem", env.escrow.redeem(worker.key, v40))
    assert env.escrow.events(rcpt, "Redeemed")[0]["amount"] == 15 * USDC
    assert env.balance(worker.address) == 40 * USDC  # exactly the largest voucher signed, never more
    ch = env.escrow.channel(entry.address, worker.address)
    assert (ch.balance, ch.redeemed) == (20 * USDC, 40 * USDC)
    check = env.escrow.check_voucher(v10, worker=worker.address)
    assert not check.ok and "below what was redeemed" in check.reason


def test_redemption_beyond_escrow_reverts_and_workers_see_it_first(env: WorkEnv) -> None:
    worker = env.actor()
    entry = funded_entry(env, 5 * USDC, {worker.address: 30 * USDC})
    over = env.escrow.sign(entry.key, worker.address, 30 * USDC + 1)
    check = env.escrow.check_voucher(over, worker=worker.address)
    assert not check.ok and "exceeds the escrow's coverage" in check.reason
    err = reverts("InsufficientEscrow", env.escrow.redeem, worker.key, over)
    assert err.error_args["available"] == 30 * USDC
    # the entry's free balance is not the worker's: only what was locked for it counts
    assert env.escrow.free_balance(entry.address) == 5 * USDC
    exact = env.escrow.sign(entry.key, worker.address, 30 * USDC)
    ok = env.escrow.check_voucher(exact, worker=worker.address)
    assert ok.ok and ok.headroom == 0
    env.escrow.redeem(worker.key, exact)
    assert env.balance(worker.address) == 30 * USDC


def test_forged_inflated_and_readdressed_vouchers_revert(env: WorkEnv) -> None:
    from dataclasses import replace

    from mesh402.economics.escrow import sign_voucher
    worker, other = env.actor(), env.actor()
    entry = funded_entry(env, 0, {worker.address: 50 * USDC, other.address: 50 * USDC})
    good = env.escrow.sign(entry.key, worker.address, 10 * USDC)
    forged = replace(env.escrow.sign(env.actor().key, worker.address, 10 * USDC), entry=entry.address)
    inflated = replace(good, cumulative=good.cumulative + 1)
    readdressed = replace(good, worker=other.address)
    wrong_chain = sign_voucher(entry.key, env.escrow.chain_id + 1, env.escrow.address, worker.address, 10 * USDC)
    wrong_contract = sign_voucher(entry.key, env.escrow.chain_id, env.staking.address, worker.address, 10 * USDC)
    for bad in (forged, inflated, readdressed, wrong_chain, wrong_contract):
        assert not env.escrow.check_voucher(bad).ok
        reverts("InvalidSignature", env.escrow.redeem, worker.key, bad)
    assert not env.escrow.check_voucher(good, worker=other.address).ok  # for someone else
    env.escrow.redeem(worker.key, good)
    assert env.balance(worker.address) == 10 * USDC and env.balance(other.address) == 0


def test_entry_cannot_withdraw_below_what_it_vouchered(env: WorkEnv) -> None:
    worker = env.actor()
    entry = funded_entry(env, 10 * USDC, {worker.address: 40 * USDC})
    held = env.escrow.sign(entry.key, worker.address, 35 * USDC)  # vouchered, not redeemed yet
    # free balance comes back at once, locked never does
    reverts("InsufficientFree", env.escrow.withdraw, entry.key, 10 * USDC + 1)
    env.record("withdraw", env.escrow.withdraw(entry.key, 10 * USDC))
    reverts("InsufficientFree", env.escrow.withdraw, entry.key, 1)
    # a timed unlock of everything: coverage drops at once, the money stays until the delay has passed
    rcpt = env.record("requestUnlock", env.escrow.request_unlock(entry.key, worker.address, 40 * USDC))
    unlock_at = env.escrow.events(rcpt, "UnlockRequested")[0]["unlockAt"]
    assert unlock_at == env.now() + env.escrow.unlock_delay
    assert env.escrow.coverage(entry.address, worker.address) == 0
    assert [e["entry"] for e in env.escrow.unlock_requests(worker.address)] == [entry.address]
    assert not env.escrow.check_voucher(env.escrow.sign(entry.key, worker.address, 36 * USDC)).ok
    reverts("UnlockNotReady", env.escrow.finalize_unlock, entry.key, worker.address)
    env.advance(env.escrow.unlock_delay // 2)
    reverts("UnlockNotReady", env.escrow.finalize_unlock, entry.key, worker.address)
    env.escrow.redeem(worker.key, held)  # the worker redeems within the notice period
    env.advance(env.escrow.unlock_delay // 2)
    rcpt = env.record("finalizeUnlock", env.escrow.finalize_unlock(entry.key, worker.address))
    assert env.escrow.events(rcpt, "Unlocked")[0]["amount"] == 5 * USDC  # only what was never vouchered
    assert env.balance(worker.address) == 35 * USDC
    env.escrow.withdraw(entry.key, 5 * USDC)
    assert env.balance(entry.address) == 15 * USDC
    reverts("NoPendingUnlock", env.escrow.finalize_unlock, entry.key, worker.address)
    # a cancelled unlock restores coverage
    env.escrow.deposit(entry.key, 5 * USDC)
    env.escrow.lock(entry.key, {worker.address: 5 * USDC})
    env.escrow.request_unlock(entry.key, worker.address, 5 * USDC)
    env.record("cancelUnlock", env.escrow.cancel_unlock(entry.key, worker.address))
    assert env.escrow.coverage(entry.address, worker.address) == 40 * USDC


def test_release_needs_the_workers_signature_once(env: WorkEnv) -> None:
    from mesh402.economics.escrow import sign_release
    worker = env.actor()
    entry = funded_entry(env, 0, {worker.address: 20 * USDC})
    cid, addr = env.escrow.chain_id, env.escrow.address
    nonce = env.escrow.channel(entry.address, worker.address).release_nonce
    deadline = env.now() + 600
    sig = sign_release(worker.key, cid, addr, entry.address, 8 * USDC, nonce, deadline)
    reverts("InvalidSignature", env.escrow.release, entry.key, worker.address, 9 * USDC, deadline, sig)
    reverts("InvalidSignature", env.escrow.release, entry.key, worker.address, 8 * USDC, deadline + 1, sig)
    forged = sign_release(env.actor().key, cid, addr, entry.address, 8 * USDC, nonce, deadline)
    reverts("InvalidSignature", env.escrow.release, entry.key, worker.address, 8 * USDC, deadline, forged)
    late = env.now() + 5
    stale = sign_release(worker.key, cid, addr, entry.address, 8 * USDC, nonce, late)
    env.advance(10)
    reverts("ReleaseExpired", env.escrow.release, entry.key, worker.address, 8 * USDC, late, stale)
    env.record("release", env.escrow.release(entry.key, worker.address, 8 * USDC, deadline, sig))
    assert env.escrow.free_balance(entry.address) == 8 * USDC
    reverts("InvalidSignature", env.escrow.release, entry.key, worker.address, 8 * USDC, deadline, sig)  # used
    assert env.escrow.channel(entry.address, worker.address).balance == 12 * USDC


def test_revenue_paid_to_the_vault_lands_in_the_entrys_escrow(env: WorkEnv) -> None:
    from harness.x402_payments import decode_b64json, sign_payment
    entry, buyer, sweeper = env.actor(), env.actor(3 * USDC), env.actor()
    vault = env.escrow.vault_of(entry.address)
    assert env.w3.eth.get_code(vault) == b""  # usable as payTo before it exists
    # an x402 `exact` settlement: transferWithAuthorization to the vault, which runs no code there
    dep = env.chain.dep
    required = {"accepts": [{"payTo": vault, "amount": str(2 * USDC), "maxTimeoutSeconds": 60,
                             "network": dep.network, "asset": dep.asset.address,
                             "extra": {"name": dep.asset.name, "version": dep.asset.version}}]}
    header, auth = sign_payment(buyer.key, required, valid_before=env.now() + 3600)  # chain time ran ahead
    sig = bytes.fromhex(decode_b64json(header)["payload"]["signature"][2:])
    env.token.functions.transferWithAuthorization(
        auth["from"], auth["to"], int(auth["value"]), 0, int(auth["validBefore"]), bytes.fromhex(auth["nonce"][2:]),
        sig).transact({"from": env.deployer})
    assert env.balance(vault) == 2 * USDC
    rcpt = env.record("sweep(first: deploys the vault)", env.escrow.sweep(sweeper.key, entry.address))
    assert env.escrow.events(rcpt, "VaultSwept")[0]["amount"] == 2 * USDC
    assert env.escrow.free_balance(entry.address) == 2 * USDC and env.balance(vault) == 0
    env.mint(vault, USDC)
    env.record("sweep", env.escrow.sweep(sweeper.key, entry.address))
    assert env.escrow.free_balance(entry.address) == 3 * USDC
    # only the escrow may pull from a vault
    v = VaultContract(env.w3, vault)
    assert v.fn.escrow().call() == env.escrow.address
    reverts("OnlyEscrow", v.send, sweeper.key, v.fn.pull())


def test_redeem_batch_pays_many_entries_in_one_transaction(env: WorkEnv) -> None:
    worker = env.actor()
    entries = [funded_entry(env, 0, {worker.address: 10 * USDC}) for _ in range(3)]
    vouchers = [env.escrow.sign(e.key, worker.address, (i + 1) * USDC) for i, e in enumerate(entries)]
    bad = env.escrow.sign(entries[0].key, worker.address, 11 * USDC)
    reverts("InsufficientEscrow", env.escrow.redeem_batch, worker.key, [*vouchers[1:], bad])  # all or nothing
    assert env.balance(worker.address) == 0
    rcpt = env.record("redeemBatch(3 entries)", env.escrow.redeem_batch(worker.key, vouchers))
    assert len(env.escrow.events(rcpt, "Redeemed")) == 3
    transfers = env.token.events.Transfer().process_receipt(rcpt, errors=DISCARD)
    assert len(transfers) == 1 and transfers[0]["args"]["value"] == 6 * USDC  # one token transfer for all
    assert env.balance(worker.address) == 6 * USDC


def test_bad_input_is_refused_with_a_named_error(env: WorkEnv) -> None:
    entry = funded_entry(env, 5 * USDC, {})
    worker = env.actor()
    reverts("ZeroAmount", env.escrow.lock, entry.key, {worker.address: 0})
    reverts("ZeroWorker", env.escrow.lock, entry.key, {"0x" + "0" * 40: 1})
    reverts("InsufficientFree", env.escrow.lock, entry.key, {worker.address: 5 * USDC + 1})
    reverts("InsufficientEscrow", env.escrow.request_unlock, entry.key, worker.address, 1)
    reverts("NoPendingUnlock", env.escrow.cancel_unlock, entry.key, worker.address)
    reverts("ZeroAmount", env.escrow.withdraw, entry.key, 0)
