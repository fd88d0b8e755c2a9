"""Real node processes on loopback: a three-node mesh forms through a second node's token,
kill -9 is detected, a restart with the same home rejoins, SIGTERM leaves gracefully."""

from __future__ import annotations

import time

import pytest

from harness.mesh_nodes import MeshNode, MeshNodes, wait_until

pytestmark = pytest.mark.timeout(300)  # a hang guard, with room for a loaded 2-worker run


def test_three_nodes_kill9_restart_leave(mesh_nodes: MeshNodes):
    a = mesh_nodes.start("a")
    b = mesh_nodes.start("b", join=a.token(), kind="client")
    t0 = time.monotonic()
    c = mesh_nodes.start("c", join=b.token())  # joins through b: must still learn of and connect to a
    joined = wait_until(lambda: mesh_nodes.sees(c, b), 20, what="c sees b")
    full = mesh_nodes.wait_full_mesh([a, b, c], timeout=20)
    total = time.monotonic() - t0
    print(f"\nthird node: process start -> full mesh {total:.2f}s (join visible +{joined:.2f}s, full mesh +{full:.2f}s)")
    st = c.status()
    assert st["mesh_id"] == a.status()["mesh_id"]
    assert {p["node_id"] for p in st["peers"]} == {a.node_id, b.node_id}
    wait_until(lambda: all(p["rtt_ms"] is not None for p in c.status()["peers"]), 10, what="RTTs")
    kinds = {p["node_id"]: p["announcement"]["kind"] for p in a.status()["peers"]}
    assert kinds[b.node_id] == "client" and kinds[c.node_id] == "serving"

    # kill -9: the others declare it down (heartbeat failures, confirmed by a probe)
    c_id = c.node_id
    mesh_nodes.kill9(c)
    t0 = time.monotonic()
    wait_until(lambda: a.peers()[c_id]["state"] == "down" and b.peers()[c_id]["state"] == "down", 30, what="c down")
    down = time.monotonic() - t0
    print(f"kill -9 -> marked down on both others in {down:.2f}s (fast timers)")
    assert mesh_nodes.sees(a, b) and mesh_nodes.sees(b, a)

    # restart with the same home: same id, rejoins without a token
    t0 = time.monotonic()
    c2 = mesh_nodes.restart(c)
    assert c2.node_id == c_id
    mesh_nodes.wait_full_mesh([a, b, c2], timeout=20)
    print(f"restart -> rejoined (full mesh) in {time.monotonic() - t0:.2f}s")

    # graceful leave on SIGTERM
    rc = mesh_nodes.terminate(b)
    assert rc == 0, b.log()[-2000:]
    b_id = b.node_id

    def saw_b_leave(n: MeshNode) -> bool:  # LEFT, or already pruned after it (fast timers prune in seconds)
        p = n.peers().get(b_id)
        return p["state"] == "left" if p is not None else n.counters().get("liveness.left", 0) >= 1

    wait_until(lambda: saw_b_leave(a) and saw_b_leave(c2), 10, what="b left")
    assert mesh_nodes.sees(a, c2)


def test_wrong_tokens_refused_with_one_line(mesh_nodes: MeshNodes, tmp_path):
    import subprocess

    from mesh402.mesh import invite
    from harness.procs import MESH402

    a = mesh_nodes.start("a")
    good = a.token()
    tok = invite.decode_token(good)
    tok.credential.expires_at += 3600
    edited = invite.encode_token(tok)
    cases = {
        "garbled": good[:-8] + "AAAAAAAA",
        "edited": edited,
        "expired": a.token(expires="1s"),
        "not a token": "hello",
    }
    time.sleep(1.2)
    for name, t in cases.items():
        r = subprocess.run([*MESH402, "client", "--join", t, "--home", str(tmp_path / name), "--port", "1",
                            "--console", "1", "--bind-ip", "127.0.0.1"], capture_output=True, text=True, timeout=60)
        lines = [l for l in r.stderr.strip().splitlines() if l]
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:"), (name, r.stderr)
        print(f"{name}: {lines[0]}")
    assert a.counters()["admission.rejected.bad_credential"] == 1
    assert a.status()["peers"] == []
