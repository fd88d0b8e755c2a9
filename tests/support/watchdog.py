"""A hard deadline per test, for hangs the suite's timeout cannot end.

pytest-timeout (600 s, signal method) fails a test by raising in the main thread, which only happens when
that thread runs Python: a test stuck in native code (a lock or condition inside torch, a Rust binding, a
thread waiting for the GIL) never sees it, and its xdist worker would wait until CI's own limit with nothing
printed about where (stop 31's submission: 1075 of 1081 tests passed, then silence until CI gave up).

A test can also wait on after pytest-timeout fired: the handler raises wherever the main thread is, and in an
asyncio test that may be a background task, which keeps the exception while the test waits for it forever.

faulthandler's timer runs on a native thread and needs no GIL: GRACE_S past the test's own timeout it writes
every thread's stack to a file and ends the worker, which xdist reports as a crashed test and replaces, so the
run finishes. The controller prints those stacks in its summary (a worker's stderr does not reach the
terminal)."""

from __future__ import annotations

import faulthandler
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Past the test's pytest-timeout (which fails it cleanly, with its teardown): a teardown's own time.
GRACE_S = float(os.environ.get("MESH402_TEST_GRACE_S", "120"))
DIR_ENV = "MESH402_HANG_DUMPS"


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller, or a run without workers: stacks to its stderr
        os.environ[DIR_ENV] = tempfile.mkdtemp(prefix="mesh402-hangs-")  # workers inherit it
        config.stash[_FILE] = sys.stderr
        return
    # a file per worker, open for the session: faulthandler writes to its descriptor
    path = Path(os.environ[DIR_ENV]) / f"{config.workerinput['workerid']}-{os.getpid()}"
    config.stash[_FILE] = open(path, "w")  # noqa: SIM115 - open for the session


_FILE = pytest.StashKey()


def hard_s(item: pytest.Item) -> float:
    """The test's pytest-timeout (its mark, else the ini's; 600 s where none) plus GRACE_S."""
    mark = item.get_closest_marker("timeout")
    if mark is not None and mark.args:
        t = mark.args[0]
    else:  # as pytest-timeout reads it: the command line, its environment variable, the ini
        t = item.config.getoption("timeout", None) or os.environ.get("PYTEST_TIMEOUT") or item.config.getini("timeout")
    t = float(t or 0)
    return (t if t > 0 else 600.0) + GRACE_S


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    f, deadline = item.config.stash[_FILE], hard_s(item)
    if f is not sys.stderr:  # a worker's file holds the running test's header only, until a dump
        f.seek(0)
        f.truncate()
        f.write(f"{item.nodeid} ran past {deadline:.0f} s; every thread's stack:\n")
        f.flush()
    faulthandler.dump_traceback_later(deadline, exit=True, file=f)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    for path in sorted(Path(os.environ[DIR_ENV]).iterdir()):
        text = path.read_text(errors="replace")
        if "Thread 0x" in text or "Current thread" in text:
            terminalreporter.section(f"hang: {path.name}")
            terminalreporter.write(text)
    shutil.rmtree(os.environ[DIR_ENV], ignore_errors=True)
