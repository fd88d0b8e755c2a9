"""serving.stake_filter: `--min-stake` answers from its cache at once, reads the chain in the background, keeps
an unread or unstaked peer out, re-reads on its TTLs, and keeps a verdict through a chain error."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mesh402.serving.stake_filter import MAX_PENDING, StakeFilter


@dataclass(frozen=True)
class Standing:
    ok: bool
    reason: str
    agent: int | None = None
    stake: int = 0
    minimum: int = 0


class Chain:
    """What the chain says per peer; raises for peers in `down`."""

    def __init__(self) -> None:
        self.stakes: dict[str, int] = {}
        self.down: set[str] = set()
        self.reads: list[str] = []

    def __call__(self, peer: str) -> Standing:
        self.reads.append(peer)
        if peer in self.down:
            raise ConnectionError("rpc down")
        stake = self.stakes.get(peer, 0)
        return Standing(stake >= 5, "staked" if stake >= 5 else f"stake {stake} below 5", 1, stake, 5)


async def _settle(f: StakeFilter) -> None:
    for _ in range(200):
        if not f._pending:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("reads did not finish")


def test_unread_and_unstaked_peers_are_kept_out_and_staking_lets_a_peer_in_after_the_short_ttl() -> None:
    async def go() -> None:
        now = [0.0]
        chain = Chain()
        changes: list[int] = []
        with ThreadPoolExecutor(2) as pool:
            f = StakeFilter("me", chain, pool, clock=lambda: now[0], ok_ttl_s=60, bad_ttl_s=10,
                            on_change=lambda: changes.append(1))
            assert f.allows("me") and chain.reads == []  # this node's own work needs no read
            chain.stakes["staked"] = 20
            assert not f.allows("staked") and not f.allows("bare")  # not read yet: out, and a read starts
            await _settle(f)
            assert f.allows("staked") and not f.allows("bare")
            assert changes == [1]  # the reconcile is kicked when a verdict flips to allowed
            assert f.verdict("bare") is not None and "below" in f.verdict("bare").reason  # type: ignore[union-attr]
            reads = len(chain.reads)
            f.allows("bare"), f.allows("staked")
            await _settle(f)
            assert len(chain.reads) == reads  # within the TTLs nothing is read again

            chain.stakes["bare"] = 5  # the bare peer stakes: it is let in once the short TTL passed
            now[0] = 10.0
            assert not f.allows("bare")
            await _settle(f)
            assert f.allows("bare") and len(changes) == 2

            chain.stakes["staked"] = 0  # a peer that unstakes loses new work after the long TTL
            now[0] = 59.0
            assert f.allows("staked")
            await _settle(f)
            assert f.allows("staked")
            now[0] = 61.0
            f.allows("staked")
            await _settle(f)
            assert not f.allows("staked") and len(changes) == 3
    asyncio.run(go())


def test_a_chain_error_changes_no_verdict_and_reads_are_bounded() -> None:
    async def go() -> None:
        now = [0.0]
        chain = Chain()
        with ThreadPoolExecutor(2) as pool:
            f = StakeFilter("me", chain, pool, clock=lambda: now[0], ok_ttl_s=60, bad_ttl_s=10)
            chain.stakes["p"] = 20
            f.allows("p")
            await _settle(f)
            assert f.allows("p")
            chain.down = {"p", "q"}
            now[0] = 61.0
            f.allows("p"), f.allows("q")
            await _settle(f)
            assert f.allows("p")  # an RPC blip does not strip a staked peer of its work...
            assert not f.allows("q")  # ...and a peer never read stays out
            assert f.failures >= 2 and "error" in f.status()["peers"]["p"]
            # after a failure the next read comes after the short TTL, not the long one
            chain.down = set()
            reads = len(chain.reads)
            now[0] = 72.0
            f.allows("p")
            await _settle(f)
            assert len(chain.reads) == reads + 1 and f.allows("p")

            # a flood of new peer ids never has more than MAX_PENDING reads in flight
            slow = asyncio.Event()
            started = [0]

            def blocking(peer: str) -> Standing:
                started[0] += 1
                asyncio.run_coroutine_threadsafe(slow.wait(), loop).result(timeout=5)
                return Standing(False, "x")
            loop = asyncio.get_running_loop()
            with ThreadPoolExecutor(MAX_PENDING + 4) as wide:
                g = StakeFilter("me", blocking, wide)
                for i in range(100):
                    assert not g.allows(f"peer{i}")
                assert len(g._pending) == MAX_PENDING
                slow.set()
                await _settle(g)
                assert started[0] == MAX_PENDING
    asyncio.run(go())
