"""EpochCloser (automatic epoch payouts) driven by a fake clock and a fake pay function: each epoch with
receipts is paid once, in order, only after its end plus the grace; a failure is retried; an epoch with no
receipts is never paid; one already published elsewhere is not retried."""

from __future__ import annotations

import asyncio

from mesh402.clock import FakeClock
from mesh402.economics.payout import AlreadyPaid, NoReceipts, PayoutError
from mesh402.node.payouts import EpochCloser

E, GRACE = 100, 25


class FakeBook:
    """Epochs with receipts, and a pay function that records calls and can be told to fail."""

    def __init__(self, epochs: set[int]) -> None:
        self.unpaid = set(epochs)
        self.calls: list[int] = []
        self.fail: dict[int, BaseException] = {}

    def pending(self) -> list[int]:
        return sorted(self.unpaid)

    async def pay(self, epoch: int) -> None:
        self.calls.append(epoch)
        await asyncio.sleep(0)
        if epoch in self.fail:
            raise self.fail.pop(epoch)
        self.unpaid.discard(epoch)  # what save_payout's `epochs` row does


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def _at(clock: FakeClock, t: float) -> None:
    """Advance the fake clock to wall time t."""
    clock.advance(t - clock.time())


def test_epochs_paid_once_in_order_after_the_grace_with_retry_and_skips() -> None:
    async def run() -> None:
        clock = FakeClock(start=10 * E + 50)  # in epoch 10
        book = FakeBook({7, 8, 10})  # 9 had no receipts
        closer = EpochCloser(E, GRACE, book.pending, book.pay, clock=clock, retry_s=30)
        book.fail[8] = PayoutError("RPC down")
        closer.start()
        await _settle()
        assert book.calls == [7, 8]  # the past epochs at once, oldest first; 10 is not over
        assert closer.state.paid == [7] and "RPC down" in closer.state.failures[8]
        _at(clock, 10 * E + 79)  # the retry is due after 30 s: not yet
        await _settle()
        assert book.calls == [7, 8]
        _at(clock, 10 * E + 81)
        await _settle()
        assert book.calls == [7, 8, 8] and closer.state.paid == [7, 8] and not closer.state.failures
        _at(clock, 11 * E + GRACE - 1)  # epoch 10 ended, the grace has not
        await _settle()
        assert book.calls == [7, 8, 8]
        _at(clock, 11 * E + GRACE + 1)
        await _settle()
        assert book.calls == [7, 8, 8, 10] and closer.state.paid == [7, 8, 10]
        for k in range(2, 5):  # later epochs without receipts: nothing to pay, nothing paid twice
            _at(clock, (10 + k) * E + GRACE + 1)
            await _settle()
        assert book.calls == [7, 8, 8, 10]
        await closer.stop()
    asyncio.run(run())


def test_no_receipts_and_already_published_are_not_retried() -> None:
    async def run() -> None:
        clock = FakeClock(start=5 * E + GRACE + 1)
        book = FakeBook({3, 4})
        book.fail[3] = NoReceipts("epoch 3: no receipts")
        book.fail[4] = AlreadyPaid("epoch 4 is already published")
        closer = EpochCloser(E, GRACE, book.pending, book.pay, clock=clock, retry_s=10)
        closer.start()
        await _settle()
        for _ in range(3):
            clock.advance(E)
            await _settle()
        assert book.calls == [3, 4] and closer.state.skipped == {3, 4} and not closer.state.failures
        await closer.stop()
    asyncio.run(run())


def test_next_delay_wakes_at_each_close_or_at_the_retry() -> None:
    closer = EpochCloser(E, GRACE, list, lambda e: asyncio.sleep(0), retry_s=30)
    assert abs(closer.next_delay(10 * E + 50) - (11 * E + GRACE - (10 * E + 50))) < 0.1
    assert abs(closer.next_delay(10 * E + 10) - (GRACE - 10)) < 0.1  # still inside epoch 9's grace
    closer.state.failures[9] = "x"
    assert abs(closer.next_delay(10 * E + 50) - 30) < 0.1


def test_payout_key_settings_refuse_what_cannot_pay(tmp_path, monkeypatch) -> None:
    import os

    import pytest
    from eth_account import Account

    from mesh402.settings import PaymentsConfig, TrustConfig
    from mesh402.cli.payment_flags import auto_payout_config
    acct, other = Account.create(), Account.create()
    kf = tmp_path / "payout.key"
    kf.write_text(acct.key.hex())
    os.chmod(kf, 0o600)
    monkeypatch.delenv("MESH402_PAYOUT_KEY", raising=False)
    trust = TrustConfig(rpc_url="http://127.0.0.1:1", registries={"IdentityRegistry": "0x1"})

    def cfg(pay_to: str, price: int = 10_000) -> PaymentsConfig:
        return PaymentsConfig(price_per_request=price, pay_to=pay_to)
    paid = auto_payout_config(cfg(acct.address), trust, payout_key_file=kf, rewards="0xR", deployment=None)
    assert paid.auto_payout and paid.rewards == "0xR" and paid.grace_s == 60.0
    assert cfg(acct.address).auto_payout is False  # no key: payouts stay with `mesh402 payout`
    with pytest.raises(ValueError, match="not of --pay-to"):
        auto_payout_config(cfg(other.address), trust, payout_key_file=kf, rewards="0xR", deployment=None)
    with pytest.raises(ValueError, match="needs a priced node"):
        auto_payout_config(cfg(acct.address, price=0), trust, payout_key_file=kf, rewards="0xR", deployment=None)
    with pytest.raises(ValueError, match="--deployment or --network"):
        auto_payout_config(cfg(acct.address), TrustConfig(), payout_key_file=kf, rewards="0xR", deployment=None)
    with pytest.raises(ValueError, match="--rewards"):
        auto_payout_config(cfg(acct.address), trust, payout_key_file=kf, rewards=None, deployment=None)
    monkeypatch.setenv("MESH402_PAYOUT_KEY", acct.key.hex())  # the env var alone leaves a free node alone
    assert not auto_payout_config(PaymentsConfig(), trust, payout_key_file=None, rewards=None, deployment=None).auto_payout
    short = PaymentsConfig(price_per_request=1, epoch_s=20)
    assert short.grace_s == 5.0
