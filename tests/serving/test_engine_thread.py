"""The engine's thread and the stage's lone rows run on the event loop's thread (serving.engine_thread,
serving.stage_batch): engine calls never overlap, and a row skips the engine thread only when it is alone,
recent steps were short and the engine thread has nothing running."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from mesh402.serving.engine_thread import EngineThread
from mesh402.serving.stage_batch import RowBatcher


@pytest.fixture
def engine_thread():
    ex = EngineThread()
    yield ex
    ex.shutdown()


def test_run_here_runs_on_the_callers_thread_only_while_no_engine_call_runs(engine_thread) -> None:
    ran, value = engine_thread.run_here(lambda a, b: (threading.get_ident(), a + b), 2, 3)
    assert ran and value == (threading.get_ident(), 5) and engine_thread.ran_here == 1

    started, release = threading.Event(), threading.Event()

    def hold() -> str:
        started.set()
        release.wait(5)
        return "done"

    fut = engine_thread.submit(hold)
    assert started.wait(5)
    called: list[int] = []
    assert engine_thread.run_here(called.append, 1) == (False, None)  # refused, and nothing ran
    assert called == [] and engine_thread.ran_here == 1
    release.set()
    assert fut.result(5) == "done"
    assert engine_thread.run_here(called.append, 1)[0] and called == [1]


def test_engine_calls_never_overlap(engine_thread) -> None:
    """Calls submitted from one thread and run here from another: at most one in progress at any moment."""
    inside, most = [0], [0]
    lock = threading.Lock()

    def call() -> None:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.0005)
        with lock:
            inside[0] -= 1

    here = 0
    for _ in range(40):
        futs = [engine_thread.submit(call) for _ in range(5)]
        while not all(f.done() for f in futs):  # racing the engine thread for the calls between its jobs
            here += engine_thread.run_here(call)[0]
            time.sleep(0.0001)
        for f in futs:
            f.result()
        assert engine_thread.run_here(call)[0]  # nothing queued or running: it runs here
        here += 1
    assert most[0] == 1
    assert here >= 40  # both kinds ran (the test is not vacuous)


def test_calls_run_here_back_to_back_do_not_starve_a_submitted_call(engine_thread) -> None:
    """A caller running calls here one after another (a stage's lone session) leaves no gap long enough for the
    engine thread to wake and take the lock: a call submitted meanwhile goes first anyway."""
    for _ in range(5):
        order: list[str] = []
        queued = []

        def first() -> None:  # the engine thread takes a call submitted now, and waits for the lock this holds
            queued.append(engine_thread.submit(order.append, "submitted"))
            time.sleep(0.02)

        assert engine_thread.run_here(first)[0]
        deadline = time.monotonic() + 5
        while not queued[0].done() and time.monotonic() < deadline:
            engine_thread.run_here(order.append, "here")
        assert queued[0].done() and order[0] == "submitted"


def test_a_cancelled_call_does_not_keep_calls_off_the_callers_thread(engine_thread) -> None:
    started, release = threading.Event(), threading.Event()
    held = engine_thread.submit(lambda: (started.set(), release.wait(5)))
    assert started.wait(5)
    dropped = engine_thread.submit(time.sleep, 0)
    assert dropped.cancel()  # queued behind `held`: it never runs
    release.set()
    held.result(5)
    assert engine_thread.run_here(lambda: "ran") == (True, "ran")


class FakeEngine:
    """forward_batch records the thread each batch ran on; `delay` seconds of work per batch."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.threads: list[tuple[int, int]] = []  # (rows, thread id)

    def forward_batch(self, sessions: list[Any], xs: list[Any]) -> list[Any]:
        self.threads.append((len(xs), threading.get_ident()))
        if self.delay:
            time.sleep(self.delay)
        return [x * 10 for x in xs]


class Session:
    closed = False


async def _steps(batcher: RowBatcher, session: Session, n: int) -> list[Any]:
    return [await batcher.step(session, i, lambda out: out + 1) for i in range(n)]


def test_a_lone_sessions_rows_run_on_the_loops_thread_after_its_first(engine_thread) -> None:
    async def main() -> None:
        loop_thread = threading.get_ident()
        eng = FakeEngine()
        b = RowBatcher(eng, engine_thread, here_s=0.05)
        assert await _steps(b, Session(), 5) == [1, 11, 21, 31, 41]  # the same answers either way
        where = [t for _, t in eng.threads]
        assert where[0] != loop_thread  # the first measures how long a step takes, on the engine thread
        assert where[1:] == [loop_thread] * 4 and engine_thread.ran_here == 4

    asyncio.run(main())


def test_rows_stay_on_the_engine_thread_when_off_slow_shared_or_busy(engine_thread) -> None:
    async def main() -> None:
        loop_thread = threading.get_ident()

        off = FakeEngine()  # here_s 0: the default (the host's own batcher)
        await _steps(RowBatcher(off, engine_thread), Session(), 4)
        assert all(t != loop_thread for _, t in off.threads)

        slow = FakeEngine(delay=0.02)  # steps longer than here_s: the loop is not held that long
        await _steps(RowBatcher(slow, engine_thread, here_s=0.01), Session(), 3)
        assert all(t != loop_thread for _, t in slow.threads)

        shared = FakeEngine()  # two sessions in flight: their rows batch on the engine thread
        b = RowBatcher(shared, engine_thread, here_s=0.05)
        a, c = Session(), Session()
        await asyncio.gather(_steps(b, a, 4), _steps(b, c, 4))
        assert [rows for rows, _ in shared.threads] == [2] * 4  # every step shared, none run alone
        assert all(t != loop_thread for _, t in shared.threads)

        busy = FakeEngine()  # the engine thread runs another call: the row waits for it there
        b = RowBatcher(busy, engine_thread, here_s=0.05)
        s = Session()
        await _steps(b, s, 2)
        started, release = threading.Event(), threading.Event()
        held = engine_thread.submit(lambda: (started.set(), release.wait(5)))
        assert started.wait(5)
        row = asyncio.ensure_future(b.step(s, 7, lambda out: out))
        await asyncio.sleep(0.05)
        assert not row.done()  # not run beside the engine thread's call
        release.set()
        assert await row == 70 and held.result(5)
        assert busy.threads[-1][1] != loop_thread

    asyncio.run(main())


def test_a_session_running_alone_does_not_keep_a_newcomer_waiting(engine_thread) -> None:
    """A session whose rows run on the loop's thread (a hostile upstream may send them as fast as it can): a
    second session's rows are still answered, and from its arrival the two share the engine thread's steps."""
    async def main() -> None:
        loop_thread = threading.get_ident()
        eng = FakeEngine()
        b = RowBatcher(eng, engine_thread, here_s=0.05)
        a, c = Session(), Session()
        await _steps(b, a, 3)
        assert [t for _, t in eng.threads][1:] == [loop_thread] * 2
        seen = len(eng.threads)
        flood = asyncio.ensure_future(_steps(b, a, 50))
        assert await asyncio.wait_for(_steps(b, c, 4), 5) == [1, 11, 21, 31]
        await flood
        later = eng.threads[seen:]
        assert any(rows == 2 and t != loop_thread for rows, t in later)  # the newcomer shared steps with a

    asyncio.run(main())
