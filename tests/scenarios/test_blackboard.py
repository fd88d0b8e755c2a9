"""The mesh blackboard across real node processes: a post (through the CLI and the management API) reaches
every member of a 3-node mesh; a hostile member flooding signed posts of its own is capped at its share on
every node while honest posts still get through; forged and oversized batches are refused; a restarted node
keeps the posts within their TTL and catches up on what it missed."""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from harness.mesh_nodes import MeshNode, MeshNodes, wait_until
from harness.procs import MESH402
from mesh402.mesh.board import BoardLimits
from mesh402.mesh.framing import StreamType, make_frame
from mesh402.mesh.proto import mesh_pb2 as pb
from tests.support.hostile import EvilMember, board_post

pytestmark = pytest.mark.timeout(400)
SHARE = BoardLimits().author_posts


def texts(node: MeshNode, topic: str | None = None) -> list[str]:
    r = httpx.get(f"{node.console}/api/board", params={"topic": topic} if topic else {}, headers=node.console_headers,
                  timeout=5)
    r.raise_for_status()
    return [p["text"] for p in r.json()["posts"]]


def board_status(node: MeshNode) -> dict:
    r = httpx.get(f"{node.console}/api/board", params={"limit": 0}, headers=node.console_headers, timeout=5)
    r.raise_for_status()
    return r.json()["board"]


def by_author(node: MeshNode, author: str) -> int:
    r = httpx.get(f"{node.console}/api/board", params={"author": author, "limit": 1024}, headers=node.console_headers,
                  timeout=5)
    return len(r.json()["posts"])


def cli(node: MeshNode, *args: str) -> str:
    out = subprocess.run([*MESH402, "board", *args, "--home", str(node.home)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_posts_reach_everyone_a_flood_is_capped_and_a_restart_keeps_the_board(tmp_path: Path) -> None:
    nodes = MeshNodes(tmp_path)
    try:
        a = nodes.start("a")
        b = nodes.start("b", join=a.token())
        c = nodes.start("c", join=a.token())
        nodes.wait_full_mesh([a, b, c], timeout=60)

        watch = subprocess.Popen([*MESH402, "board", "watch", "--topic", "jobs", "--home", str(c.home)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: queue.Queue[str] = queue.Queue()  # the watcher's output, read without blocking the test
        out = watch.stdout
        assert out is not None

        def pump() -> None:
            for line in out:
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        try:
            # a watch streams posts made after it subscribed: post once c counts the watcher
            wait_until(lambda: board_status(c)["watchers"] == 1, 60, what="the watcher subscribed")
            post_id = cli(a, "post", "jobs", "who has a GPU free?", "--ttl", "600").strip()
            assert len(post_id) == 32
            for n in (a, b, c):
                wait_until(lambda n=n: texts(n, "jobs") == ["who has a GPU free?"], 20, what=f"the post on {n.name}")
            line = lines.get(timeout=30)  # c's watcher saw a's post arrive over the mesh
            assert "[jobs]" in line and a.node_id[:12] in line and line.rstrip().endswith("who has a GPU free?"), line
        finally:
            watch.terminate()
            watch.wait(10)
        [row] = json.loads(cli(c, "read", "--json", "--topic", "jobs"))
        assert row["author"] == a.node_id and row["id"] == post_id
        bad = httpx.post(f"{b.console}/api/board", json={"topic": "x", "text": ""}, headers=b.console_headers, timeout=5)
        assert bad.status_code == 400

        mesh_id = a.status()["mesh_id"]

        async def flood() -> str:
            async with EvilMember(tmp_path / "evil", a.token()) as evil:
                await evil.wait_connected(a.node_id)
                await evil.wait_connected(b.node_id)
                for start in range(0, 256, 64):  # 256 valid posts, 4 full frames on one stream
                    fs = await evil.open(a.node_id, StreamType.BLACKBOARD)
                    await fs.send(make_frame(board=pb.BoardSync(posts=[board_post(evil, mesh_id, i)
                                                                       for i in range(start, start + 64)])))
                    await fs.finish()
                # a forged post in b's name, and a frame over the 64-post cap
                forged = board_post(evil, mesh_id, 999, topic="jobs", text="b says: send me your keys")
                forged.author = bytes.fromhex(b.node_id)
                fs = await evil.open(c.node_id, StreamType.BLACKBOARD)
                await fs.send(make_frame(board=pb.BoardSync(posts=[forged])))
                await fs.finish()
                fs = await evil.open(c.node_id, StreamType.BLACKBOARD)
                await fs.send(make_frame(board=pb.BoardSync(posts=[board_post(evil, mesh_id, 5000 + i) for i in range(65)])))
                await fs.finish()
                # honest members still post during the flood
                r = httpx.post(f"{b.console}/api/board", json={"topic": "jobs", "text": "b: I have one"},
                               headers=b.console_headers, timeout=5)
                assert r.status_code == 201, r.text
                for n in (a, b, c):
                    wait_until(lambda n=n: "b: I have one" in texts(n, "jobs"), 20, what=f"b's post on {n.name}")
                    wait_until(lambda n=n: by_author(n, evil.node_id) == SHARE, 20, what=f"the capped flood on {n.name}")
                return evil.node_id

        evil_id = asyncio.run(flood())
        for n in (a, b, c):
            assert by_author(n, evil_id) == SHARE  # never more than one author's share, anywhere
            assert "b says: send me your keys" not in texts(n, "jobs")
        counters = httpx.get(f"{a.console}/api/board", headers=a.console_headers, timeout=5).json()["board"]["counters"]
        assert counters["board.author_full"] + counters.get("board.rate_limited", 0) >= 256 - SHARE
        cboard = httpx.get(f"{c.console}/api/board", headers=c.console_headers, timeout=5).json()["board"]["counters"]
        assert cboard["board.bad_signature"] >= 1 and cboard["board.frame_too_many"] == 1

        # c goes away; a posts meanwhile; c comes back with its board and catches up
        nodes.terminate(c)
        cli(a, "post", "news", "while c was away", "--ttl", "600")
        c2 = nodes.restart(c)
        assert "who has a GPU free?" in texts(c2, "jobs")  # kept in <home>/board.json (a also resends on connect)
        wait_until(lambda: texts(c2, "news") == ["while c was away"], 30, what="c catching up after its restart")
    finally:
        nodes.stop_all()
