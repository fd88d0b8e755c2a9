"""Continuous batching of a local model's generation steps.

Every request's stepper hands its next step (a prompt to prefill, or one sampled token to decode) to the
model's :class:`StepScheduler` instead of running it alone. The scheduler runs *steps* on the node's engine
thread; one step is

- prefill: waiting prompts, oldest first, one chunk (``prefill_chunk`` positions, chunk-aligned as the
  engine always chunks) at a time, while the step's token budget (``step_tokens``) lasts — so a long
  prompt is spread over several steps and never stalls the running streams for more than one budget;
- decode: one row for each waiting decode, up to ``max_batch`` rows, oldest wait first (a request left out
  of a full step is first in the next one: no starvation), run as one batched forward
  (``Engine.decode_batch``: each row bit-identical to its 1-row decode, so batching changes no answer).

Before a step the scheduler waits a moment (``gather_s``) for the streams that decoded in the previous step
to hand in their next token, so the batch does not fragment into stragglers. Sessions join and leave
between steps. Admission (how many sessions exist, and the 503 beyond that) stays with the engine's
session cap and KV budget.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["BatchedStep", "StepScheduler", "gather"]


class BatchedStep(Protocol):
    """What the scheduler needs of a stepper (generation.LocalStepper)."""

    session: Any

    def prefill_begin(self, ids: list[int]) -> list[int]:
        """Engine thread: restore any cached prefix; return the ids still to prefill."""

    def prefill_end(self, ids: list[int], logits: Any) -> int:
        """Engine thread: the prompt is in; sample its first token."""

    def decode_end(self, rows: list[int], logits: Any) -> int:
        """Engine thread: the rows (a token, then any speculative drafts) are in; sample the next token."""


@dataclass
class _Prefill:
    stepper: BatchedStep
    ids: list[int]
    future: asyncio.Future
    rest: list[int] | None = None  # ids still to run (None: the prefix cache not consulted yet)
    logits: Any = None


@dataclass
class _Decode:
    stepper: BatchedStep
    rows: list[int]  # the token sampled last, then any drafts after it
    future: asyncio.Future
    t: float = field(default_factory=time.monotonic)


class StepScheduler:
    def __init__(self, engine: Any, executor: Executor, *, max_batch: int = 8, step_tokens: int = 128,
                 gather_s: float = 0.003) -> None:
        if max_batch < 1 or step_tokens < 1:
            raise ValueError("max_batch and step_tokens must be >= 1")
        self.engine = engine
        self.executor = executor
        self.max_batch = max_batch
        self.step_tokens = step_tokens
        self.gather_s = gather_s
        self.chunk = int(getattr(engine, "prefill_chunk", 32))
        self._prefills: deque[_Prefill] = deque()
        self._decodes: deque[_Decode] = deque()
        self._decoding: set[int] = set()  # steppers that decoded in the last step and have not left
        self._wake = asyncio.Event()
        self._driver: asyncio.Task | None = None
        self.steps = 0  # counters for tests and benchmarks
        self.rows = 0
        self.widest = 0

    # ------------------------------------------------------------------ requests' side
    async def prefill(self, stepper: BatchedStep, ids: list[int]) -> int:
        job = _Prefill(stepper, list(ids), asyncio.get_running_loop().create_future())
        self._prefills.append(job)
        return await self._submit(job.future)

    async def decode(self, stepper: BatchedStep, rows: list[int]) -> int:
        job = _Decode(stepper, [int(t) for t in rows], asyncio.get_running_loop().create_future())
        self._decodes.append(job)
        return await self._submit(job.future)

    def leave(self, stepper: BatchedStep) -> None:
        """The stepper will send no more steps (finished or released)."""
        self._decoding.discard(id(stepper))
        self._wake.set()

    async def _submit(self, fut: asyncio.Future) -> int:
        self._wake.set()
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        return await fut

    # ------------------------------------------------------------------ the step loop
    async def _gather(self) -> None:
        """Wait (at most gather_s) until every stream of the last step has handed in its next token."""
        def ready() -> bool:
            waiting = {id(j.stepper) for j in self._decodes}
            return bool(self._prefills) or len(waiting) >= self.max_batch or self._decoding <= waiting

        await gather(self._wake, ready, self.gather_s)

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        while self._prefills or self._decodes:
            await self._gather()
            decodes = [self._decodes.popleft() for _ in range(min(self.max_batch, len(self._decodes)))]
            prefills = list(self._prefills)
            try:
                await loop.run_in_executor(self.executor, self._step, prefills, decodes)
            except BaseException as e:
                for j in decodes:
                    if not j.future.done():
                        j.future.set_exception(e if isinstance(e, Exception) else RuntimeError(str(e)))
                if not isinstance(e, Exception):
                    raise
            for p in prefills:
                if p.future.done():
                    self._prefills.remove(p)
            self._decoding = {id(j.stepper) for j in decodes if j.future.done() and not j.future.cancelled()
                              and j.future.exception() is None}
            self._decoding |= {id(p.stepper) for p in prefills if p.future.done() and not p.future.cancelled()
                               and p.future.exception() is None}

    # ------------------------------------------------------------------ engine thread
    def _step(self, prefills: list[_Prefill], decodes: list[_Decode]) -> None:
        budget = self.step_tokens
        for p in prefills:
            if budget <= 0:
                break
            budget = self._prefill_some(p, budget)
        live: list[_Decode] = []
        for j in decodes:
            if j.future.cancelled():
                continue
            s = j.stepper.session
            if s.closed or len(s) + len(j.rows) > s.max_len:
                _fail(j.future, self._check_error(s))
                continue
            live.append(j)
        if not live:
            return
        sessions = [j.stepper.session for j in live for _ in j.rows]
        logits = self.engine.decode_batch(sessions, [t for j in live for t in j.rows])
        self.steps += 1
        self.rows += len(sessions)
        self.widest = max(self.widest, len(live))
        a = 0
        for j in live:
            lg, a = logits[a:a + len(j.rows)], a + len(j.rows)
            try:
                tok = j.stepper.decode_end(j.rows, lg)
            except Exception as e:  # noqa: BLE001 - this request's sampling failed; the others go on
                _fail(j.future, e)
                continue
            _resolve(j.future, tok)

    def _prefill_some(self, p: _Prefill, budget: int) -> int:
        """Run chunks of one waiting prompt while the budget lasts; resolve it when the prompt is in."""
        if p.future.cancelled():
            return budget
        try:
            if p.rest is None:
                p.rest = p.stepper.prefill_begin(p.ids)
            s = p.stepper.session
            C = self.chunk
            while p.rest and budget > 0:
                n = min(len(p.rest), C - len(s) % C)  # up to the next chunk boundary: the engine's own chunks
                p.logits = s.prefill(p.rest[:n], logits=n == len(p.rest))  # only the prompt's last chunk's head
                p.rest = p.rest[n:]
                budget -= self._rows(n)
            if not p.rest:
                _resolve(p.future, p.stepper.prefill_end(p.ids, p.logits))
        except Exception as e:  # noqa: BLE001 - this prompt failed; the others go on
            _fail(p.future, e)
        return budget

    def _rows(self, n: int) -> int:
        """What a chunk of n real tokens costs the step's budget: the rows the engine computes for it (fast mode
        skips a chunk's padding, so short prompts share a step; exact mode computes all C)."""
        rows = getattr(self.engine, "prefill_rows", None)
        return int(rows(n)) if rows is not None else self.chunk

    @staticmethod
    def _check_error(session: Any) -> Exception:
        try:
            session._check(1)
        except Exception as e:  # noqa: BLE001 - the engine's own error (closed, context too long)
            return e
        return RuntimeError("session cannot decode")


async def gather(wake: asyncio.Event, ready: Callable[[], bool], seconds: float, quiet: float | None = None) -> None:
    """Wait until `ready()` (checked whenever `wake` is set) or `seconds` have passed, or (`quiet`) until
    `wake` stays unset that long: the burst of arrivals is over."""
    deadline = time.monotonic() + seconds
    while not ready():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        wake.clear()
        try:
            await asyncio.wait_for(wake.wait(), left if quiet is None else min(left, quiet))
        except TimeoutError:
            return


def _resolve(fut: asyncio.Future, value: int) -> None:
    fut.get_loop().call_soon_threadsafe(_set, fut, value, None)


def _fail(fut: asyncio.Future, e: Exception) -> None:
    fut.get_loop().call_soon_threadsafe(_set, fut, None, e)


def _set(fut: asyncio.Future, value: Any, e: Exception | None) -> None:
    if fut.done():
        return
    if e is not None:
        fut.set_exception(e)
    else:
        fut.set_result(value)
