"""Timestamps of a split's per-step hand-offs, to see where a hop's time goes (``mesh402 serve --trace-hops``).

The host marks when it sends a step down the chain and when the reply arrives; a stage marks when the step
arrives, when its engine call starts and ends, and when it sends its reply. Each mark is ``time.monotonic()``,
one clock for every process of a machine, so the marks of a host and its stages running on one machine line
up by (request, position): ``breakdown`` turns them into the time of each hand-off
(``benchmarks/split.py --trace``). Off unless ``enable`` was called: a mark then costs one level check.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["HOST_RECV", "HOST_SEND", "STAGE_DONE", "STAGE_RECV", "STAGE_RUN", "STAGE_SEND", "breakdown", "disable",
           "enable", "mark"]

TRACE = logging.getLogger("mesh402.trace.hops")

HOST_SEND, HOST_RECV = "host_send", "host_recv"
STAGE_RECV, STAGE_RUN, STAGE_DONE, STAGE_SEND = "stage_recv", "stage_run", "stage_done", "stage_send"


def mark(event: str, request_id: str, position: int) -> None:
    if TRACE.isEnabledFor(logging.DEBUG):
        TRACE.debug("%s %.6f %s %d", event, time.monotonic(), request_id, position)


def enable(path: Path) -> logging.Handler:
    """Write this process's marks to ``path`` (appended, one line each); returns the handler for ``disable``."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    TRACE.addHandler(handler)
    TRACE.setLevel(logging.DEBUG)
    TRACE.propagate = False  # marks go to the trace file only, not the node's log
    return handler


def disable(handler: logging.Handler) -> None:
    TRACE.removeHandler(handler)
    handler.close()
    if not TRACE.handlers:
        TRACE.setLevel(logging.NOTSET)


def breakdown(host_lines: Iterable[str], stage_lines: Iterable[str]) -> dict[str, float]:
    """Median ms of each hand-off of a 2-stage split's steps (a host's and its last stage's marks):
    host -> stage (send to arrival), stage in (arrival to engine call), stage engine, stage out (engine done to
    reply sent), stage -> host (reply sent to arrival), and the host's round trip. Steps missing a mark (a
    failover, a draft step) are left out; ``steps`` is how many were complete."""
    marks: dict[tuple[str, int], dict[str, float]] = {}
    for line in (*host_lines, *stage_lines):
        parts = line.split()
        if len(parts) != 4:
            continue
        event, t, rid, pos = parts
        marks.setdefault((rid, int(pos)), {})[event] = float(t)
    spans = {"host -> stage": (HOST_SEND, STAGE_RECV), "stage in": (STAGE_RECV, STAGE_RUN),
             "stage engine": (STAGE_RUN, STAGE_DONE), "stage out": (STAGE_DONE, STAGE_SEND),
             "stage -> host": (STAGE_SEND, HOST_RECV), "round trip": (HOST_SEND, HOST_RECV)}
    need = {e for pair in spans.values() for e in pair}
    steps = [m for m in marks.values() if need <= m.keys()]
    out = {name: statistics.median(1000 * (m[b] - m[a]) for m in steps) if steps else float("nan")
           for name, (a, b) in spans.items()}
    out["steps"] = float(len(steps))
    return out
