"""Hop tracing (`serve --trace-hops`): the marks of a real pipeline's steps, and the breakdown of them."""

from __future__ import annotations

import asyncio
import math

from mesh402.serving import hop_trace as H
from tests.support.pipeline import build, run_gen


def test_breakdown_pairs_marks_by_request_and_position() -> None:
    host = ["host_send 10.000 r1 5", "host_recv 10.010 r1 5", "host_send 10.020 r1 6", "host_recv 10.032 r1 6",
            "host_send 10.040 r2 5"]  # r2 5 never came back (a failover): left out
    stage = ["stage_recv 10.001 r1 5", "stage_run 10.002 r1 5", "stage_done 10.008 r1 5", "stage_send 10.009 r1 5",
             "stage_recv 10.022 r1 6", "stage_run 10.023 r1 6", "stage_done 10.029 r1 6", "stage_send 10.030 r1 6",
             "garbage line", "stage_recv 10.041 r2 5"]
    b = H.breakdown(host, stage)
    assert b["steps"] == 2
    assert math.isclose(b["host -> stage"], 1.5, abs_tol=1e-6)  # medians of 1 and 2 ms
    assert math.isclose(b["stage engine"], 6.0, abs_tol=1e-6)
    assert math.isclose(b["stage -> host"], 1.5, abs_tol=1e-6)
    assert math.isclose(b["round trip"], 11.0, abs_tol=1e-6)
    assert math.isnan(H.breakdown([], [])["round trip"])


def test_a_real_pipeline_marks_every_hand_off(executor, prompt, tmp_path) -> None:
    """Host and stage in one process (MemoryLink): each decode step gets all six marks, in order."""
    path = tmp_path / "hops.trace"
    handler = H.enable(path)
    try:
        async def main() -> list[int]:
            model, _, _ = await build(executor, [0, 15, 30], mode="fast")
            return await run_gen(model, prompt, 12)

        assert len(asyncio.run(main())) == 12
    finally:
        H.disable(handler)
    lines = path.read_text().splitlines()
    b = H.breakdown(lines, [])
    assert b["steps"] >= 11  # every decode step (the prefill's chunks too)
    for span in ("host -> stage", "stage in", "stage engine", "stage out", "stage -> host"):
        assert 0 <= b[span] < b["round trip"], (span, b)
    H.mark(H.HOST_SEND, "after", 1)  # disabled again: nothing more is written
    assert path.read_text().splitlines() == lines
