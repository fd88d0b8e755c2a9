"""Proofs of holding (mesh402/serving/holdings.py): a failed proof is asked again after a backoff that starts
short and doubles to the cap, so a peer that could not answer just after joining is proven within seconds,
while one that keeps failing costs this node at most one challenge per `retry_s`."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mesh402.clock import FakeClock
from mesh402.serving.holdings import Holdings


def test_failed_proofs_back_off_from_one_second_to_the_cap_and_a_success_resets_it() -> None:
    clock = FakeClock()
    asked: list[float] = []
    answers = iter([False] * 7 + [True, False])

    async def run() -> None:
        h = Holdings("me", connect=None, path_of=lambda _ch: Path("/model"),  # type: ignore[arg-type]
                     clock=clock.monotonic, retry_s=30.0, first_retry_s=1.0)

        async def prove(peer: str, content_hash: str) -> bool:  # what the network would answer
            asked.append(clock.monotonic())
            ok = next(answers)
            h._remember((peer, content_hash), ok)
            return ok
        h.prove = prove  # type: ignore[method-assign]
        for _ in range(200):  # the reconcile loop asks every 0.5 s
            h.want("peer", "abc")
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            if h.proven("peer", "abc"):
                break
            clock.advance(0.5)
        assert h.proven("peer", "abc")
        assert h.backoff(("peer", "abc")) == 1.0  # reset by the success

    asyncio.run(run())
    gaps = [b - a for a, b in zip(asked, asked[1:])]
    assert gaps == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0], gaps
