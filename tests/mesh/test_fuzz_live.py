"""1,000 hypothesis-built control frames (every Frame body, random labels and fields, some validly
signed announcements, mangled encodings, wrong stream types) from an admitted member at a live node
process: no crash, no task error, and it keeps serving an honest member (harness/fuzz.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from harness.fuzz import generate, send_all
from harness.mesh_nodes import MeshNodes
from tests.support.hostile import EvilMember

pytestmark = pytest.mark.timeout(300)  # a hang guard, with room for a loaded 2-worker run

CASES = 1000


def test_a_thousand_fuzzed_frames_crash_nothing_and_the_node_keeps_serving(mesh_nodes: MeshNodes, tmp_path: Path) -> None:
    a = mesh_nodes.start("a", wait=False)
    t0 = time.monotonic()
    todo = generate(CASES)  # while the node starts (the cases are signed for the mesh when sent)
    gen_s = time.monotonic() - t0
    a.proc.wait_http(f"{a.console}/api/status", timeout=60)
    a_id = bytes.fromhex(a.node_id)

    async def go() -> None:
        async with EvilMember(tmp_path / "good", a.token()) as good, EvilMember(tmp_path / "evil", a.token()) as evil:
            await evil.wait_connected(a.node_id)
            stats = await send_all(evil.svc, a_id, todo)
            print(f"\n{len(todo)} cases: generated in {gen_s:.1f} s, sent {stats.sent} in {stats.seconds:.1f} s "
                  f"({stats.replies} replies, {stats.open_failures} streams not opened {stats.errors[:2]})")
            assert stats.sent >= 0.95 * CASES
            assert await good.echo(a.node_id)  # an honest member is still served

    asyncio.run(go())
    assert a.alive()
    c = a.counters()
    print("  " + ", ".join(f"{k}={v}" for k, v in c.items() if k.startswith(("frame.", "gossip.o", "gossip.m", "stream.", "quota.", "internal."))))
    assert c.get("internal.task_error", 0) == 0
