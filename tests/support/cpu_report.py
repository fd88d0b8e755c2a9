"""CPU time per test, to keep the suite inside its budget on the 2-core machine (opt-in, not wired by conftest).

    MESH402_CPU_REPORT=/tmp/cpu .venv/bin/python -m pytest -p tests.support.cpu_report

writes ``/tmp/cpu.<worker pid>`` with one line per test: node id, CPU seconds of the test process, CPU
seconds of the child processes it reaped (node processes, the chain), wall seconds; and ``/tmp/cpu.nodes``
with one line per node process started (harness/procs.py). Wall time hides where the CPU goes when three
workers share two cores; this does not."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator

import pytest


def _cpu() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    out = os.environ.get("MESH402_CPU_REPORT")
    s0, c0 = _cpu()
    t0 = time.monotonic()
    yield
    s1, c1 = _cpu()
    if out:
        with open(f"{out}.{os.getpid()}", "a") as f:
            f.write(f"{item.nodeid}\t{s1 - s0:.2f}\t{c1 - c0:.2f}\t{time.monotonic() - t0:.2f}\n")
