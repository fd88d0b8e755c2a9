"""Events for the management API and the CLI: one queue per subscriber, never blocking the mesh."""

from __future__ import annotations

import asyncio
import collections

from mesh402.clock import Clock

Event = dict[str, object]


class EventBus:
    def __init__(self, clock: Clock, counters: collections.Counter[str]) -> None:
        self.clock = clock
        self.counters = counters
        self._subscribers: set[asyncio.Queue[Event]] = set()

    def subscribe(self, maxsize: int = 1000) -> asyncio.Queue[Event]:
        q: asyncio.Queue[Event] = asyncio.Queue(maxsize=maxsize)
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(q)

    def emit(self, kind: str, **data: object) -> None:
        ev: Event = {"type": kind, "ts": self.clock.time(), **data}
        for q in list(self._subscribers):
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:
                # a subscriber that does not read loses events; the mesh never waits for it
                self.counters["events.dropped"] += 1
