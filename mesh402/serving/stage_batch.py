"""Batched decode rows on a pipeline stage: the steps of all the sessions a stage holds, run as one forward.

With several sessions in flight through a split, a stage receives their decode steps close together (the
entry's own stage batches its rows the same way, so they leave it as a wave). Each step hands its row here;
the batcher runs the rows waiting at once as one ``Engine.forward_batch`` call on the stage's partial model
(every row bit-identical to that session's 1-row forward, engine.batch), then finishes each row on the engine
thread (sample, fingerprint or encode for the wire) and answers that session alone. So batching changes no
answer, activation, fingerprint or receipt: a session's step computes and commits exactly what it would
running alone; only the engine call is shared.

Before a batch the batcher waits a moment (``gather_s``) for the sessions of the previous batch to hand in
their next row, so the batch does not fragment into stragglers; a stage holding one session never waits.

A stage holding one session also skips the engine thread (``here_s``): its row runs on the event loop's
thread when the engine thread is idle (serving.engine_thread) and the stage's recent steps were short, which
saves two thread wake-ups on every token a split serves. The loop is blocked meanwhile, which is why only
short steps run there: nothing else waits on a stage that has one session, pings and gossip tolerate a
step's delay, and a slow step (a large model on a slow machine) would hold the loop too long for the little
the hand-off costs beside it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from mesh402.serving.engine_thread import EngineThread
from mesh402.serving.scheduler import _set, gather

__all__ = ["RowBatcher"]


@dataclass
class _Row:
    session: Any
    x: Any  # one row: token ids on a first stage (a list), an fp32 hidden row [1, hidden] otherwise
    finish: Callable[[Any], Any]  # engine thread: the row's output -> what the session's step answers
    future: asyncio.Future


class RowBatcher:
    def __init__(self, engine: Any, executor: Executor, *, max_batch: int = 8, gather_s: float = 0.003,
                 quiet_s: float = 0.0005, here_s: float = 0.0) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        # > 0: a lone row runs on the loop's thread while batches take under this long (the module's docstring)
        self.here_s = here_s
        self._took: float | None = None  # recent batches' duration (moving average), seconds
        self.engine = engine
        self.executor = executor
        self.max_batch = max_batch
        self.gather_s = gather_s
        # rows reach a stage in bursts (the previous stage's batch answered at once): a gap this long ends
        # the wait, so a session whose next row is a round trip away costs the others little
        self.quiet_s = quiet_s
        self._rows: deque[_Row] = deque()
        self._active: set[int] = set()  # sessions of the last batch that have not left
        self._wake = asyncio.Event()
        self._driver: asyncio.Task | None = None
        self.batches = 0  # counters for tests, benchmarks and /stats
        self.rows = 0
        self.widths: Counter[int] = Counter()  # batch width -> batches run at that width

    async def step(self, session: Any, x: Any, finish: Callable[[Any], Any]) -> Any:
        """One decode row of `session` at its next position; `finish(output)` runs where the forward ran (the
        engine thread, or the loop's thread for a lone row: `_lone`)."""
        row = _Row(session, x, finish, asyncio.get_running_loop().create_future())
        if self._lone(session):
            # one turn of the loop first (no wake-up: it is running), so a row another session has ready goes
            # in before this one could: a session's rows sent back to back cannot keep the others out
            await asyncio.sleep(0)
        if self._lone(session):
            assert isinstance(self.executor, EngineThread)  # _lone checked it
            try:
                ran, answers = self.executor.run_here(self._run, [row])
            except Exception as e:  # the forward itself failed: this session's step fails, as on the engine thread
                ran, answers = True, [(row.future, None, e)]
            if ran:
                self._answer([row], answers)
                return await row.future  # resolved already: no loop iteration, no task
        self._rows.append(row)
        self._wake.set()
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())
        return await row.future

    def leave(self, session: Any) -> None:
        """The session sends no more rows (closed): the next batch does not wait for it."""
        self._active.discard(id(session))
        self._wake.set()

    def _ready(self) -> bool:
        waiting = {id(r.session) for r in self._rows}
        return len(waiting) >= self.max_batch or self._active <= waiting

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        while self._rows:
            await gather(self._wake, self._ready, self.gather_s, self.quiet_s)
            batch: list[_Row] = []
            seen: set[int] = set()
            for r in list(self._rows):  # a session's next row waits for the next batch (one row each)
                if len(batch) < self.max_batch and id(r.session) not in seen:
                    batch.append(r)
                    seen.add(id(r.session))
                    self._rows.remove(r)
            try:
                answers = await loop.run_in_executor(self.executor, self._run, batch)
            except BaseException as e:
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e if isinstance(e, Exception) else RuntimeError(str(e)))
                if not isinstance(e, Exception):
                    raise
                answers = []
            self._answer(batch, answers)

    def _answer(self, batch: list[_Row], answers: list[tuple[asyncio.Future, Any, Exception | None]]) -> None:
        """Loop thread, after the engine call has returned (and released the engine, serving.engine_thread):
        the batch's sessions are expected together next, then each row gets its answer. In this order a session
        resumed by its answer finds itself expected with the others (else its next row could run alone, see
        `_lone`), and finds the engine free for a row it may run here."""
        self._active = {id(r.session) for r in batch if not r.session.closed}
        for fut, value, err in answers:
            _set(fut, value, err)

    def _lone(self, session: Any) -> bool:
        """Whether `session`'s row may run at once on the loop's thread: no other session's row waiting or
        expected, the recent batches short, and an executor that can run a call here (serving.engine_thread,
        which refuses while the engine thread runs or has queued a call, a batch included)."""
        return (self.here_s > 0 and not self._rows and self._active <= {id(session)} and self._took is not None
                and self._took < self.here_s and isinstance(self.executor, EngineThread))

    def _run(self, batch: list[_Row]) -> list[tuple[asyncio.Future, Any, Exception | None]]:
        """Engine thread (or the loop's: see `_lone`): one forward for the rows of the batch (a row that cannot
        share it runs alone and fails only its own session, see Engine.forward_batch); each row finished on its
        own. Returns each row's (future, answer, error) for `_answer`."""
        live = [r for r in batch if not r.future.cancelled()]
        if not live:
            return []
        t0 = time.monotonic()
        outs = self.engine.forward_batch([r.session for r in live], [r.x for r in live])
        took = time.monotonic() - t0
        self._took = took if self._took is None else 0.7 * self._took + 0.3 * took
        self.batches += 1
        self.rows += len(live)
        self.widths[len(live)] += 1
        answers: list[tuple[asyncio.Future, Any, Exception | None]] = []
        for r, out in zip(live, outs):
            try:
                if isinstance(out, Exception):
                    raise out
                answers.append((r.future, r.finish(out), None))
            except Exception as e:  # noqa: BLE001 - this row's sampling or encoding failed; the others go on
                answers.append((r.future, None, e))
        return answers
