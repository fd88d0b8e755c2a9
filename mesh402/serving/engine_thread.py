"""The engine's thread: one worker that every engine call of a node runs on, and a way to skip it.

Engine calls must not overlap (sessions share the stage's KV pool, workspaces and kernel thread pool), and
the one-worker executor is what keeps them apart. Handing a call to that thread and back costs two thread
wake-ups; on a VM whose idle vCPUs halt that is ~0.35 ms a call (stop 31: ~0.1 ms for the worker to start a
call after ~20 ms idle, ~0.25 ms for the event loop to resume after it), paid on every token a pipeline stage
serves. ``run_here`` runs a call on the caller's thread instead when the engine thread has nothing running or
waiting to run, under the same lock every submitted call holds, so calls still never overlap and never jump
ahead of a call submitted before them.
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
        self._queued = 0  # submitted calls that have not taken the lock yet
        self._count = threading.Lock()  # guards _queued
        self.ran_here = 0  # calls run by run_here (tests)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with self._count:
            self._queued += 1
        try:
            fut = super().submit(self._locked, fn, args, kwargs)
        except BaseException:  # shut down: the call will never run
            self._dequeue()
            raise
        fut.add_done_callback(self._cancelled)
        return fut

    def _cancelled(self, fut: Future) -> None:
        if fut.cancelled():  # cancelled before it started (a caller gave up, or shutdown): it never runs
            self._dequeue()

    def _dequeue(self) -> None:
        with self._count:
            self._queued -= 1

    def _locked(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        with self._busy:
            self._dequeue()
            return fn(*args, **kwargs)

    def run_here(self, fn: Callable[..., T], *args: Any) -> tuple[bool, T | None]:
        """(True, fn(*args)) run on this thread if no engine call is running or waiting to, else (False, None)
        and nothing runs. Calls submitted earlier always go first: a caller running calls here back to back
        would otherwise starve them (a waiting thread's wake-up takes longer than the gap between two such
        calls), and an earlier call of the same session must not be overtaken."""
        if self._queued or not self._busy.acquire(blocking=False):
            return False, None
        if self._queued:  # submitted (and started waiting) just now: it goes first
            self._busy.release()
            return False, None
        try:
            self.ran_here += 1
            return True, fn(*args)
        finally:
            self._busy.release()
