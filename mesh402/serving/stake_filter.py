"""Which peers may get this node's paid work: those whose ERC-8004 agent has the mesh's minimum stake at risk
(`serve --min-stake`; docs/verification.md, "Stake before paid work").

A stage, an expert node or a routed host that cheats is slashed by the validator quorum, which needs stake to
take; a node with none risks nothing. So an entry with a minimum gives layers, experts and routed requests only
to peers whose stake it read on chain (MeshStaking.stakeOf of the agent whose node binding names the peer) at or
above the minimum. Chain reads block, so they run in the background: `allows` answers at once from the cache,
a peer never checked (or whose check failed) is kept out until a read says otherwise, and verdicts are read
again after `ok_ttl_s` (a peer that unstakes loses new work within it) or `bad_ttl_s` (a peer that stakes gets
work within it). The chain side is injected (`StakeLookup`): serving never imports economics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

OK_TTL_S = 60.0
BAD_TTL_S = 10.0
MAX_TRACKED = 4096  # peers whose verdict is remembered (least recently asked dropped first)
MAX_PENDING = 8  # chain reads in flight at once


class StakeVerdict(Protocol):
    """A peer's standing as read on chain (economics.staking.Standing)."""

    @property
    def ok(self) -> bool: ...

    @property
    def reason(self) -> str:
        """Why not, or "staked"."""
        ...

    @property
    def agent(self) -> int | None: ...

    @property
    def stake(self) -> int:
        """Active stake, atomic units."""
        ...

    @property
    def minimum(self) -> int: ...


class StakeLookup(Protocol):
    def __call__(self, node_id_hex: str) -> StakeVerdict:
        """Read the peer's agent and stake on chain (blocking); raises on a chain error."""
        ...


@dataclass
class _Entry:
    verdict: StakeVerdict | None  # None: never read successfully
    read_at: float
    error: str = ""


class StakeFilter:
    def __init__(self, me: str, lookup: StakeLookup, executor: Any, *, clock: Callable[[], float] = time.monotonic,
                 ok_ttl_s: float = OK_TTL_S, bad_ttl_s: float = BAD_TTL_S,
                 on_change: Callable[[], None] | None = None) -> None:
        self.me, self.lookup, self.executor, self.clock = me, lookup, executor, clock
        self.ok_ttl_s, self.bad_ttl_s = ok_ttl_s, bad_ttl_s
        self.on_change = on_change
        self._seen: OrderedDict[str, _Entry] = OrderedDict()
        self._pending: dict[str, asyncio.Future[StakeVerdict]] = {}
        self.reads = self.failures = 0

    def allows(self, peer: str) -> bool:
        """Whether `peer` may get paid work now (never blocks; asks the chain in the background when due)."""
        if peer == self.me:
            return True  # this node's own work is paid from its own revenue
        entry = self._seen.get(peer)
        if entry is not None:
            self._seen.move_to_end(peer)
        good = entry is not None and entry.verdict is not None and entry.verdict.ok and not entry.error
        ttl = self.ok_ttl_s if good else self.bad_ttl_s
        if entry is None or self.clock() - entry.read_at >= ttl:
            self._read(peer)
        return entry is not None and entry.verdict is not None and entry.verdict.ok

    def verdict(self, peer: str) -> StakeVerdict | None:
        entry = self._seen.get(peer)
        return entry.verdict if entry is not None else None

    def _read(self, peer: str) -> None:
        if peer in self._pending or len(self._pending) >= MAX_PENDING:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): the next call from the loop reads it
        fut = loop.run_in_executor(self.executor, self.lookup, peer)
        self._pending[peer] = fut
        fut.add_done_callback(lambda f: self._done(peer, f))

    def _done(self, peer: str, fut: asyncio.Future[StakeVerdict]) -> None:
        self._pending.pop(peer, None)
        self.reads += 1
        old = self._seen.get(peer)
        before = old is not None and old.verdict is not None and old.verdict.ok
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            # A chain that does not answer changes no verdict: the peer keeps what it had (an RPC blip must not
            # strip a staked node of its work, and an unread peer stays out); read again after bad_ttl_s.
            self.failures += 1
            log.warning("stake of %s not read: %r", peer[:12], exc)
            self._store(peer, _Entry(old.verdict if old else None, self.clock(), error=repr(exc)[:200]))
            return
        verdict = fut.result()
        self._store(peer, _Entry(verdict, self.clock()))
        if verdict.ok != before:
            log.info("stake of %s: %s (agent %s, stake %d, minimum %d)", peer[:12], verdict.reason,
                     verdict.agent, verdict.stake, verdict.minimum)
            if self.on_change is not None:
                self.on_change()

    def _store(self, peer: str, entry: _Entry) -> None:
        self._seen[peer] = entry
        self._seen.move_to_end(peer)
        while len(self._seen) > MAX_TRACKED:
            self._seen.popitem(last=False)

    def status(self) -> dict[str, Any]:
        peers = {}
        for peer, e in list(self._seen.items())[-64:]:  # the most recently asked: status stays small
            v = e.verdict
            peers[peer] = {"ok": bool(v and v.ok), "reason": v.reason if v else "not read yet",
                           "agent": v.agent if v else None, "stake": v.stake if v else 0,
                           **({"error": e.error} if e.error else {})}
        return {"peers": peers, "reads": self.reads, "failures": self.failures}
