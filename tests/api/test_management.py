"""Management API and the CLI commands that find a running node through --home."""

from __future__ import annotations

import json
import os
import subprocess
import threading

import httpx
import pytest

from mesh402.mesh import invite
from harness.mesh_nodes import MeshNodes, wait_until
from harness.procs import MESH402
from harness.sse import json_events

pytestmark = pytest.mark.timeout(120)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MESH402, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})


def test_status_invite_and_events(mesh_nodes: MeshNodes):
    a = mesh_nodes.start("a")
    events: list[dict] = []
    got_up = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", f"{a.console}/api/events", headers=a.console_headers, timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for ev in json_events(r):
                events.append(ev)
                if ev["type"] == "peer_up":
                    got_up.set()
                    return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    wait_until(lambda: bool(events), 10, what="SSE snapshot")
    assert events[0]["type"] == "snapshot" and events[0]["status"]["node_id"] == a.node_id

    r = cli("invite", "--home", str(a.home), "--expires", "30m")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    desc = invite.describe_token(invite.decode_token(token))
    assert 1700 < desc["expires_in_s"] <= 1800 and desc["node_id"] == a.node_id

    b = mesh_nodes.start("b", join=token)
    assert got_up.wait(15), events
    mesh_nodes.wait_full_mesh([a, b])
    wait_until(lambda: all(p["rtt_ms"] is not None for n in (a, b) for p in n.status()["peers"]), 10, what="RTT")

    for me, other in ((a, b), (b, a)):
        r = cli("status", "--home", str(me.home))
        assert r.returncode == 0, r.stderr
        row = next(l for l in r.stdout.splitlines() if other.node_id[:12] in l)
        assert "alive" in row and "serving" in row
        assert any(ch.isdigit() for ch in row.split("alive")[1].split("│")[1])  # an RTT figure
        assert me.status()["mesh_id"] in r.stdout
    r = cli("status", "--home", str(a.home), "--json")
    st = json.loads(r.stdout)
    assert st["invite_token"].startswith("m402") and st["peers"][0]["node_id"] == b.node_id
    assert st["node"]["api_port"] == a.api_port

    secret = (a.home / "mesh.secret").read_text().strip()
    assert len(secret) == 64 and secret not in json.dumps(st) and secret not in a.log()
    for f in ("mesh.secret", "node.key"):
        assert (a.home / f).stat().st_mode & 0o777 == 0o600
    r = cli("status", "--home", str(a.home / "nowhere"))
    assert r.returncode == 2 and "no node running" in r.stderr

    # a single-use token admits one node; revoking a token (read from stdin) stops it at every member
    r = cli("invite", "--home", str(a.home), "--single-use")
    assert r.returncode == 0 and "single use" in r.stderr, r.stderr
    once = r.stdout.strip()
    c = mesh_nodes.start("c", join=once)
    mesh_nodes.wait_full_mesh([a, b, c])
    late = mesh_nodes.start("late", join=once, wait=False)
    assert late.proc.proc.wait(timeout=60) != 0 and "already used" in late.log()
    reusable = cli("invite", "--home", str(b.home)).stdout.strip()
    r = subprocess.run([*MESH402, "invite", "--home", str(a.home), "--revoke", "-"], input=reusable,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "revoked mesh-wide" in r.stdout, r.stdout + r.stderr
    nonce = invite.decode_token(reusable).credential.nonce.hex()
    wait_until(lambda: nonce in json.loads((b.home / "mesh.json").read_text()).get("spent", {}), 10,
               what="the revocation reached b (and b saved it)")
    refused = mesh_nodes.start("refused", join=reusable, wait=False)
    assert refused.proc.proc.wait(timeout=60) != 0 and "revoked" in refused.log()
    r = cli("invite", "--home", str(a.home), "--revoke", str(a.home / "missing.txt"))
    assert r.returncode == 2 and "cannot read" in r.stderr
    for bad in (b"not json", b'{"token": 5}', b'["m402"]'):
        r = httpx.post(f"{a.console}/api/invite/revoke", content=bad, headers=a.console_headers, timeout=5)
        assert r.status_code == 400 and "token" in r.json()["error"], r.text
    r = httpx.post(f"{a.console}/api/invite/revoke", json={"token": "m402garbage!"}, headers=a.console_headers,
                   timeout=5)
    assert r.status_code == 400 and "garbled" in r.json()["error"], r.text
    r = httpx.post(f"{a.console}/api/invite", json={"single_use": "yes"}, headers=a.console_headers, timeout=5)
    assert r.status_code == 400 and "single_use" in r.json()["error"], r.text
    assert a.alive()


def test_console_listen_all_requires_token(mesh_nodes: MeshNodes, tmp_path):
    r = cli("serve", "--no-model", "--home", str(tmp_path / "x"), "--console-listen-all", "--port", "1")
    assert r.returncode == 2 and "console token" in r.stderr
    tok_file = tmp_path / "console.tok"
    tok_file.write_text("s3cret-console-token\n")
    tok_file.chmod(0o600)
    a = mesh_nodes.start("a", extra=["--console-listen-all", "--console-token-file", str(tok_file)], wait=False)
    wait_until(lambda: httpx.get(f"{a.console}/api/traffic", timeout=2).status_code == 401, 60, what="console up")
    ok = httpx.get(f"{a.console}/api/traffic", headers={"Authorization": "Bearer s3cret-console-token"}, timeout=5)
    assert ok.status_code == 200
    assert httpx.get(f"{a.console}/api/traffic", headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 401
    r = cli("status", "--home", str(a.home), "--json")  # the CLI reads the token from the home
    assert r.returncode == 0 and json.loads(r.stdout)["node_id"]
    assert (a.home / "console.token").stat().st_mode & 0o077 == 0


def test_console_refuses_rebinding_and_cross_origin_on_a_node_process(mesh_nodes: MeshNodes):
    """A web page the user visits (DNS rebinding: a foreign Host name; a cross-site request: a foreign Origin)
    gets nothing from a running node's console, not even the status with its invite token; the node's own
    user (its CLI, a same-origin page on the console's address) is served as before."""
    a = mesh_nodes.start("a")
    url, port = f"{a.console}/api/status", a.console_port
    for headers in ({"Host": f"attacker.example:{port}"}, {"Host": f"127.0.0.1.nip.io:{port}"},
                    {"Origin": "http://attacker.example"}, {"Origin": f"http://localhost:{port + 1}"},
                    {"Origin": "null"}):
        r = httpx.get(url, headers=headers, timeout=5)
        assert r.status_code == 403 and "m402" not in r.text, (headers, r.status_code, r.text)
    r = httpx.post(f"{a.console}/api/invite", json={}, headers={"Origin": "http://attacker.example"}, timeout=5)
    assert r.status_code == 403
    same_origin = {"Origin": f"http://127.0.0.1:{port}"}
    assert httpx.get(url, headers={**same_origin, **a.console_headers}, timeout=5).json()["invite_token"].startswith("m402")
    assert httpx.get(url, headers={"Host": f"localhost:{port}"}, timeout=5).status_code == 200
    assert cli("invite", "--home", str(a.home)).stdout.strip().startswith("m402")
