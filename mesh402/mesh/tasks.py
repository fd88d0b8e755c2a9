"""The node's background tasks: spawned in one place, counted when they fail, cancelled together."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

log = logging.getLogger("mesh402.mesh")

T = TypeVar("T")


class TaskGroup:
    def __init__(self, counters: collections.Counter[str]) -> None:
        self.counters = counters
        self.running: set[asyncio.Task[Any]] = set()
        # Set first thing in stop(): loops end, and late failures are not counted as errors.
        self.stopping = False

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Raises RuntimeError without a running loop (callers building state by hand catch it)."""
        t = asyncio.get_running_loop().create_task(coro)
        self.running.add(t)
        t.add_done_callback(self._done)
        return t

    def _done(self, t: asyncio.Task[Any]) -> None:
        self.running.discard(t)
        if not t.cancelled() and t.exception() is not None and not self.stopping:
            self.counters["internal.task_error"] += 1
            log.warning("mesh task failed: %r", t.exception(), exc_info=t.exception())

    async def cancel_all(self) -> None:
        for t in list(self.running):
            t.cancel()
        for t in list(self.running):
            with contextlib.suppress(BaseException):
                await t


class Debounce:
    """One run of ``action`` for a burst of calls: the first call schedules it after ``wait()``, the
    calls until then join that run (gossip pushes, demand re-announcements, mesh.json writes)."""

    def __init__(self, tasks: TaskGroup, wait: Callable[[], Awaitable[None]],
                 action: Callable[[], Awaitable[None]]) -> None:
        self.tasks = tasks
        self.wait = wait
        self.action = action
        self.pending = False

    def __call__(self) -> bool:
        """Schedule the run; False when no event loop runs (state built by hand): nothing scheduled."""
        if self.pending:
            return True
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        self.pending = True
        self.tasks.spawn(self._run())
        return True

    async def _run(self) -> None:
        try:
            await self.wait()
        finally:
            self.pending = False
        await self.action()

