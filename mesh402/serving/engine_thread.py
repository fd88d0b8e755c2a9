"""The engine's thread: one worker that every engine call of a node runs on, and a way to skip it.

Engine calls must not overlap (sessions share the stage's KV pool, workspaces and kernel thread pool), and
the one-worker executor is what keeps them apart. Handing a call to that thread and back costs two thread
wake-ups; on a VM whose idle vCPUs halt that is ~0.35 ms a call (stop 31: ~0.1 ms for the worker to start a
call after ~20 ms idle, ~0.25 ms for the event loop to resume after it), paid on every token a pipeline stage
serves. ``run_here`` runs a call on the caller's thread instead when the engine thread has nothing running,
under the same lock every submitted call holds, so calls still never overlap.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["EngineThread"]

T = TypeVar("T")


class EngineThread(ThreadPoolExecutor):
    def __init__(self, thread_name_prefix: str = "engine") -> None:
        super().__init__(max_workers=1, thread_name_prefix=thread_name_prefix)
        self._busy = threading.Lock()  # held by whichever thread runs an engine call
        self.ran_here = 0  # calls run by run_here (tests)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return super().submit(self._locked, fn, args, kwargs)

    def _locked(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        with self._busy:
            return fn(*args, **kwargs)

    def run_here(self, fn: Callable[..., T], *args: Any) -> tuple[bool, T | None]:
        """(True, fn(*args)) run on this thread if no engine call is running, else (False, None) and nothing
        runs. A call submitted but not yet started waits for this one (its lock): engine calls of different
        sessions commute, and a session's own calls are awaited one after another, so none is reordered
        against an earlier call of its session."""
        if not self._busy.acquire(blocking=False):
            return False, None
        try:
            self.ran_here += 1
            return True, fn(*args)
        finally:
            self._busy.release()
