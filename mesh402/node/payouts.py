"""Automatic epoch payouts on a paid entry node (`mesh402 serve --payout-key-file`).

After each epoch ends, plus a grace period for the last settlements and receipts to land, the EpochCloser
pays every epoch that has receipts and no payout on record, oldest first: the validation round in-process,
then economics.payout.pay_epoch (publish the Merkle root, push the claims) in a thread, since chain calls
block. An epoch is paid once: a paid one is in the receipts store's `epochs` table; a failed one is tried
again after `retry_s` or at the next epoch's end, whichever is first. Time comes from an injectable clock.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

from mesh402.clock import Clock, SystemClock
from mesh402.economics.payout import AlreadyPaid, NoReceipts, PayoutChain, pay_epoch

if TYPE_CHECKING:
    from mesh402.serving.distributed import DistributedRuntime
    from mesh402.settings import NodeConfig

log = logging.getLogger(__name__)


@dataclass
class CloserState:
    paid: list[int] = field(default_factory=list)  # in the order paid
    skipped: set[int] = field(default_factory=set)  # no receipts after all, or published with another root
    failures: dict[int, str] = field(default_factory=dict)  # epoch -> last reason, until it is paid


class EpochCloser:
    def __init__(self, epoch_s: int, grace_s: float, pending: Callable[[], Iterable[int]],
                 pay: Callable[[int], Awaitable[Any]], *, clock: Clock | None = None, retry_s: float = 300.0) -> None:
        """`pending()`: epochs with receipts and no payout on record; `pay(epoch)`: pay it or raise."""
        self.epoch_s = int(epoch_s)
        self.grace_s = float(grace_s)
        self.retry_s = float(retry_s)
        self.pending = pending
        self.pay = pay
        self.clock = clock or SystemClock()
        self.state = CloserState()
        self._task: asyncio.Task | None = None

    def due(self, epoch: int, now: float) -> bool:
        return now >= (epoch + 1) * self.epoch_s + self.grace_s

    def next_delay(self, now: float) -> float:
        """Seconds to the next epoch's close (end + grace), or to the retry of a failure if sooner."""
        k = int((now - self.grace_s) // self.epoch_s) + 1
        wait = k * self.epoch_s + self.grace_s - now
        if self.state.failures:
            wait = min(wait, self.retry_s)
        return max(wait, 0.0) + 0.01  # just past the boundary: due() holds when it wakes

    async def tick(self) -> list[int]:
        """Pay every due, unpaid epoch, oldest first; the epochs paid now."""
        now = self.clock.time()
        done = set(self.state.paid) | self.state.skipped
        paid = []
        for epoch in sorted(e for e in set(self.pending()) if e not in done and self.due(e, now)):
            try:
                await self.pay(epoch)
            except asyncio.CancelledError:
                raise
            except NoReceipts:
                self.state.skipped.add(epoch)
                self.state.failures.pop(epoch, None)
                continue
            except AlreadyPaid as e:  # recorded, or published with another root: nothing to retry
                self.state.skipped.add(epoch)
                self.state.failures.pop(epoch, None)
                log.error("epoch %d not paid automatically: %s", epoch, e)
                continue
            except Exception as e:  # RPC down, no funds, no validator yet: try again later
                reason = str(e) or type(e).__name__
                if self.state.failures.get(epoch) != reason:
                    log.warning("epoch %d payout failed (retrying in %.0f s): %s", epoch, self.retry_s, reason)
                self.state.failures[epoch] = reason
                continue
            self.state.failures.pop(epoch, None)
            self.state.paid.append(epoch)
            paid.append(epoch)
        return paid

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # e.g. the receipts store unreadable: keep the timer alive
                log.exception("epoch payouts: tick failed")
            await self.clock.sleep(self.next_delay(self.clock.time()))

    def start(self) -> None:
        self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def status(self) -> dict[str, Any]:
        return {"epoch_s": self.epoch_s, "grace_s": self.grace_s, "paid": list(self.state.paid),
                "failures": {str(e): r for e, r in sorted(self.state.failures.items())}}


def entry_closer(dist: "DistributedRuntime", cfg: "NodeConfig", *, clock: Clock | None = None,
                 report: Callable[[str], None] = functools.partial(print, flush=True)) -> EpochCloser:
    """The EpochCloser of a paid entry node with a payout key: pays from the pay-to wallet's key, on the
    chain and registries of the node's --deployment/--network, pushing every claim."""
    pay_cfg, trust = cfg.payments, cfg.trust
    if dist.receipts is None or not (pay_cfg.payout_key and trust.rpc_url and trust.registries and pay_cfg.rewards):
        raise ValueError("automatic payouts need a paid entry, a payout key, the chain's RPC URL and registries, "
                         "and the EpochRewards address (cli.payment_flags.auto_payout_config)")
    store = dist.receipts.store
    chain = PayoutChain(trust.rpc_url, pay_cfg.rewards, dict(trust.registries))

    async def pay(epoch: int) -> None:
        if pay_cfg.payout_require_validation:  # in-process: the same round POST /api/epochs/{n}/validate runs
            for node, res in sorted((await dist.trust.run_round(store, epoch)).items()):
                if "score" in res:
                    log.info("epoch %d validation %s: score %s", epoch, node[:12], res["score"])
                else:  # its share is withheld: say why
                    log.warning("epoch %d validation %s: %s", epoch, node[:12], res.get("error", "no verdict"))
        result = await asyncio.get_running_loop().run_in_executor(None, functools.partial(
            pay_epoch, cfg.home, epoch, chain, key=pay_cfg.payout_key, epoch_s=pay_cfg.epoch_s, push=True,
            require_validation=pay_cfg.payout_require_validation, log=log.info, warn=log.warning))
        plan = result.plan
        report(f"epoch {epoch} paid: {sum(result.paid.values()) / 10 ** pay_cfg.asset_decimals:.6f} of "
               f"{plan.revenue / 10 ** pay_cfg.asset_decimals:.6f} revenue to {len(result.paid)} account(s) in {plan.tx}"
               + (f"; withheld: {', '.join(f'{n[:12]} ({why})' for n, why in sorted(plan.withheld.items()))}"
                  if plan.withheld else ""))

    def pending() -> list[int]:
        return store.unpaid_epochs()

    return EpochCloser(pay_cfg.epoch_s, pay_cfg.grace_s, pending, pay, clock=clock, retry_s=pay_cfg.payout_retry_s)
