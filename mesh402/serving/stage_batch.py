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
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from mesh402.serving.scheduler import _fail, _resolve, gather

__all__ = ["RowBatcher"]


@dataclass
class _Row:
    session: Any
    x: Any  # one row: token ids on a first stage (a list), an fp32 hidden row [1, hidden] otherwise
    finish: Callable[[Any], Any]  # engine thread: the row's output -> what the session's step answers
    future: asyncio.Future


class RowBatcher:
    def __init__(self, engine: Any, executor: Executor, *, max_batch: int = 8, gather_s: float = 0.003,
                 quiet_s: float = 0.0005) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
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
        """One decode row of `session` at its next position; `finish(output)` runs on the engine thread."""
        row = _Row(session, x, finish, asyncio.get_running_loop().create_future())
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
                await loop.run_in_executor(self.executor, self._run, batch)
            except BaseException as e:
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e if isinstance(e, Exception) else RuntimeError(str(e)))
                if not isinstance(e, Exception):
                    raise
            self._active = {id(r.session) for r in batch if not r.session.closed}

    def _run(self, batch: list[_Row]) -> None:
        """Engine thread: one forward for the rows of the batch (a row that cannot share it runs alone and
        fails only its own session, see Engine.forward_batch); each row finished on its own."""
        live = [r for r in batch if not r.future.cancelled()]
        if not live:
            return
        outs = self.engine.forward_batch([r.session for r in live], [r.x for r in live])
        self.batches += 1
        self.rows += len(live)
        self.widths[len(live)] += 1
        for r, out in zip(live, outs):
            if isinstance(out, Exception):
                _fail(r.future, out)
                continue
            try:
                _resolve(r.future, r.finish(out))
            except Exception as e:  # noqa: BLE001 - this row's sampling or encoding failed; the others go on
                _fail(r.future, e)
