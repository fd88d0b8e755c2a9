"""The node's background jobs for escrow payments (docs/payments.md, "Escrow, vouchers and stake").

- `Redeemer` (a worker): redeems the best voucher it holds from every entry, in one transaction, whenever
  what it could redeem passes a threshold, at least every `every_s`, and at once when an entry asks for its
  float back (an `UnlockRequested` for one of this worker's channels: it must redeem before the unlock
  completes).
- `EscrowKeeper` (an entry): keeps each worker's channel covering what it has vouchered plus a float, moving
  settled revenue from its vault into its escrow account (`sweep`) and locking top-ups (`lock`), one
  transaction for many workers.

Chain calls block: they run in a thread. Time comes from an injectable clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mesh402.clock import Clock, SystemClock

log = logging.getLogger(__name__)


@dataclass
class JobState:
    runs: int = 0
    last_tx: str = ""
    last_error: str = ""
    total: int = 0  # atomic units redeemed (worker) or locked (entry) by this job since start
    log: list[str] = field(default_factory=list)  # the last few outcomes, for status


class PeriodicJob:
    """Runs `step()` in a thread every `every_s`, sooner when kicked; keeps the last outcome for status."""

    def __init__(self, name: str, every_s: float, clock: Clock | None = None) -> None:
        self.name = name
        self.every_s = every_s
        self.clock = clock or SystemClock()
        self.state = JobState()
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def step(self) -> str:
        """One round (in a thread); what it did, for the log."""
        raise NotImplementedError

    def kick(self) -> None:
        self._kick.set()

    async def run_once(self) -> None:
        self.state.runs += 1
        try:
            done = await asyncio.get_running_loop().run_in_executor(None, self.step)
            self.state.last_error = ""
        except Exception as e:  # a chain hiccup: logged, retried on the next round
            log.warning("%s failed: %s", self.name, e)
            done = f"error: {type(e).__name__}: {e}"
            self.state.last_error = done
        if done:
            self.state.log = (self.state.log + [done])[-8:]

    async def _loop(self) -> None:
        while True:
            await self.run_once()
            self._kick.clear()
            try:
                await asyncio.wait_for(self._kick.wait(), self.every_s)
            except asyncio.TimeoutError:
                pass

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None

    def status(self) -> dict[str, Any]:
        return {"runs": self.state.runs, "last_tx": self.state.last_tx, "last_error": self.state.last_error,
                "total": self.state.total, "recent": list(self.state.log)}


class Redeemer(PeriodicJob):
    """A worker's redemptions: every voucher it holds that raises what its channel has paid out."""

    def __init__(self, escrow: Any, wallet: Any, key: str, *, every_s: float = 300.0, min_amount: int = 0,
                 clock: Clock | None = None) -> None:
        super().__init__("redeemer", every_s, clock)
        self.escrow = escrow  # economics.escrow.Escrow
        self.wallet = wallet  # economics.vouchers.VoucherWallet
        self.key = key  # pays the gas; the tokens go to the worker the vouchers name
        self.min_amount = min_amount
        self._unlock_block = 0
        self.free_balance: int | None = None  # this wallet's own free escrow balance (as an entry), last read

    def _unlocks_pending(self) -> bool:
        """An entry asked one of this worker's channels for its float back: redeem before it completes."""
        got = self.escrow.unlock_requests(self.wallet.worker, from_block=self._unlock_block)
        if got:
            self._unlock_block = max(int(u["blockNumber"]) for u in got) + 1
        return bool(got)

    def step(self) -> str:
        self.free_balance = self.escrow.free_balance(self.wallet.worker)
        due = [(v, v.cumulative - self.escrow.channel(v.entry, v.worker).redeemed) for v in self.wallet.best()]
        due = [(v, amount) for v, amount in due if amount > 0]
        urgent = self._unlocks_pending()
        total = sum(a for _, a in due)
        if not due or (total < self.min_amount and not urgent):
            return ""
        from mesh402.economics.evm import tx_hex  # lazy: web3 helpers, loaded with the escrow already

        rcpt = self.escrow.redeem_batch(self.key, [v for v, _ in due])
        tx = tx_hex(rcpt["transactionHash"])
        for v, _ in due:
            self.wallet.note_redeemed(v, tx)
        self.state.last_tx, self.state.total = tx, self.state.total + total
        return f"redeemed {total} from {len(due)} entr{'y' if len(due) == 1 else 'ies'} in {tx}"


class EscrowKeeper(PeriodicJob):
    """An entry's float: every worker's channel covers what it vouchered plus `float_amount`."""

    def __init__(self, escrow: Any, issuer: Any, key: str, workers: Callable[[], set[str]], *, float_amount: int,
                 every_s: float = 60.0, clock: Clock | None = None) -> None:
        super().__init__("escrow-keeper", every_s, clock)
        self.escrow = escrow  # economics.escrow.Escrow
        self.issuer = issuer  # economics.vouchers.VoucherIssuer
        self.key = key
        self.workers = workers  # the wallets of the workers this entry uses now
        self.float_amount = float_amount

    def needs(self) -> dict[str, int]:
        """Top-ups per worker: what keeps coverage >= vouchered + the float."""
        out: dict[str, int] = {}
        # one key per wallet: the issuer's book is lower-case, callers may pass checksummed addresses
        for w in sorted({x.lower() for x in self.workers()} | set(self.issuer.totals())):
            ch = self.escrow.channel(self.issuer.address, w)
            short = self.issuer.issued(w) + self.float_amount - ch.coverage
            if short > self.float_amount // 2:  # top up in steps, not on every token
                out[w] = short
        return out

    def step(self) -> str:
        need = self.needs()
        if not need:
            return ""
        from mesh402.economics.evm import tx_hex  # lazy: web3 helpers, loaded with the escrow already

        me = self.issuer.address
        if self.escrow.free_balance(me) < sum(need.values()) and self.escrow.vault_balance(me) > 0:
            self.escrow.sweep(self.key, me)  # the vault holds the revenue x402 settled to it
        free = self.escrow.free_balance(me)
        if free <= 0:
            raise RuntimeError(f"the escrow account of {me} is empty: deposit or wait for revenue "
                               f"({sum(need.values())} needed)")
        grant, left = {}, free
        for w, amount in need.items():  # what the free balance allows, in worker order
            take = min(amount, left)
            if take > 0:
                grant[w], left = take, left - take
        rcpt = self.escrow.lock(self.key, grant)
        tx = tx_hex(rcpt["transactionHash"])
        self.state.last_tx, self.state.total = tx, self.state.total + sum(grant.values())
        return f"locked {sum(grant.values())} for {len(grant)} worker(s) in {tx}"
