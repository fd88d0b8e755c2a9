"""One node per home, and a start-up that fails cleanly, tried on real processes as a user would.

A home belongs to one process (an flock the OS drops when the process dies): a second `serve` or
`client`, or a second `payout`/`register`, on a running home is refused with one line naming the holder,
and the first node keeps serving and stays visible to `mesh402 status`; a node killed with -9 restarts on
its home with no clean-up. A busy port, a junk model, a home that is a file or a bad key is one line and
exit 2 before the node announces itself (no peer sees it, no token is printed). A paid answer's work
receipt is committed before the answer's last byte, so a kill -9 right after the answer keeps it."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.mesh_nodes import MeshNode, MeshNodes
from harness.procs import MESH402, free_port
from tests.support.chain import require_contract_toolchain

REFUSE_TIMEOUT_S = 30  # a refused start takes about a second; one that is not refused never ends


def mesh402(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command that must end by itself (a refused `serve` included)."""
    try:
        return subprocess.run([*MESH402, *args], capture_output=True, text=True, timeout=REFUSE_TIMEOUT_S,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`mesh402 {' '.join(args)}` was not refused: still running after {REFUSE_TIMEOUT_S} s "
                    f"(stdout: {e.stdout!r})")


def refused(r: subprocess.CompletedProcess[str], *says: str) -> str:
    """Exit 2 with one line on stderr (returned) that says all of `says`, and no invite token printed."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stdout, r.stderr)
    assert all(s in lines[0] for s in says), lines[0]
    assert "invite token" not in r.stdout and "m402" not in r.stdout, r.stdout
    return lines[0]


def serve_args(home: Path, *extra: str) -> list[str]:
    return ["serve", "--no-model", "--home", str(home), "--port", str(free_port()), "--console", str(free_port()),
            "--bind-ip", "127.0.0.1", "--mesh-fast-timers", *extra]


def holder(node: MeshNode) -> tuple[str, ...]:
    """What a refusal names about the node holding a home."""
    return (f"pid {node.proc.proc.pid}", f"API port {node.api_port}", f"console port {node.console_port}")


def test_a_second_node_on_a_home_is_refused_and_the_first_keeps_serving(mesh_nodes: MeshNodes) -> None:
    a = mesh_nodes.start("a")
    line = refused(mesh402(*serve_args(a.home)), "already runs with home", str(a.home), *holder(a))
    print(f"\n{line}")
    refused(mesh402("client", "--join", a.token(), "--home", str(a.home), "--port", str(free_port()),
                    "--console", str(free_port())), *holder(a))
    assert a.alive() and a.status()["node_id"] == a.node_id  # still serving
    st = mesh402("status", "--home", str(a.home))
    assert st.returncode == 0 and a.node_id[:12] in st.stdout, st.stdout + st.stderr  # node.json is still its


def test_a_second_payout_or_registration_on_a_home_is_refused(mesh_nodes: MeshNodes) -> None:
    """The payout and registration locks, held here by this test process (the holder named is its pid)."""
    from mesh402.cli.economics import REGISTER_LOCK
    from mesh402.economics.payout import PAYOUT_LOCK
    from mesh402.work.store import ReceiptStore
    from mesh402.home import Home

    a = mesh_nodes.start("a")
    ReceiptStore(a.home / "receipts.sqlite").close()  # a paid entry's store, empty
    key = {"MESH402_PAYOUT_KEY": "0x" + "11" * 32, "MESH402_OWNER_KEY": "0x" + "11" * 32}
    chain = ["--rpc-url", "http://127.0.0.1:9", "--identity-registry", "0x" + "22" * 20]
    lock = Home(a.home).lock(PAYOUT_LOCK, "a payout")
    try:
        refused(mesh402("payout", "--home", str(a.home), "--epoch", "1", "--rewards", "0x" + "33" * 20, *chain, env=key),
                "a payout already runs with home", f"pid {os.getpid()}")
    finally:
        lock.release()
    lock = Home(a.home).lock(REGISTER_LOCK, "a registration")
    try:
        refused(mesh402("register", "--home", str(a.home), *chain, env=key),
                "a registration already runs with home", f"pid {os.getpid()}")
    finally:
        lock.release()
    assert a.alive()


def test_a_node_killed_with_9_restarts_on_its_home_without_clean_up(mesh_nodes: MeshNodes) -> None:
    a = mesh_nodes.start("a")
    node_id = a.node_id
    mesh_nodes.kill9(a)  # node.json and the lock file stay behind; the lock itself died with the process
    t0 = time.monotonic()
    a2 = mesh_nodes.restart(a)
    print(f"\nrestarted on the same home in {time.monotonic() - t0:.1f} s")
    assert a2.status()["node_id"] == node_id
    st = mesh402("status", "--home", str(a2.home))
    assert st.returncode == 0 and f"pid {a2.proc.proc.pid}" in st.stdout, st.stdout + st.stderr
    refused(mesh402(*serve_args(a2.home)), *holder(a2))  # the restarted node holds the home now


@pytest.fixture
def busy_ports() -> Iterator[dict[str, int]]:
    """A listening TCP port and a bound UDP port, held by this test."""
    tcp, udp = socket.socket(), socket.socket(type=socket.SOCK_DGRAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp.bind(("127.0.0.1", 0))
    try:
        yield {"tcp": tcp.getsockname()[1], "udp": udp.getsockname()[1]}
    finally:
        tcp.close()
        udp.close()


def test_start_up_failures_are_one_line_before_anything_is_announced(mesh_nodes: MeshNodes, tmp_path: Path,
                                                                      busy_ports: dict[str, int]) -> None:
    """Each bad start would join `a`'s mesh: it is refused first, so `a` never sees a peer."""
    a = mesh_nodes.start("a")
    token = a.token()
    junk = tmp_path / "junk.gguf"
    junk.write_text("not a model\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    loose = tmp_path / "loose-key"
    loose.mkdir()
    (loose / "node.key").write_text("11" * 32 + "\n")
    loose.joinpath("node.key").chmod(0o644)
    bad = tmp_path / "bad-key"
    bad.mkdir()
    (bad / "node.key").write_text("not hex\n")
    bad.joinpath("node.key").chmod(0o600)
    tcp, udp = busy_ports["tcp"], busy_ports["udp"]
    cases = {
        "busy API port": (["serve", "--no-model", "--home", str(tmp_path / "h1"), "--port", str(tcp)],
                          f"API port {tcp} is busy"),
        "busy console port": (serve_args(tmp_path / "h2", "--console", str(tcp)), f"console port {tcp} is busy"),
        "busy mesh port": (serve_args(tmp_path / "h3", "--bind-port", str(udp)), f"mesh port {udp}/udp"),
        "junk model": (["serve", "--model", str(junk), "--home", str(tmp_path / "h4"), "--port", str(free_port())],
                       f"{junk}: not a GGUF file"),
        "home is a file": (serve_args(a_file), "is not a directory"),
        "key readable by others": (serve_args(loose), "readable by others"),
        "key not a key": (serve_args(bad), "not a valid node key"),
        "client on a busy port": (["client", "--home", str(tmp_path / "h5"), "--port", str(tcp)],
                                  f"API port {tcp} is busy"),
    }
    for what, (args, says) in cases.items():
        t0 = time.monotonic()
        line = refused(mesh402(*args, "--join", token), says)
        print(f"\n{what} ({time.monotonic() - t0:.1f} s): {line}")
        home = Path(args[args.index("--home") + 1])
        assert not (home / "node.json").exists(), what
    assert a.alive() and a.peers() == {}  # nothing joined, not even for a moment


HOLD_S = 4.0  # how long the test keeps the receipt store locked: the node's write waits (its busy timeout is 5 s)


def test_a_paid_answers_receipt_survives_a_kill9_right_after_the_answer(tmp_path: Path) -> None:
    """The test holds receipts.sqlite's write lock while a paid request is answered, so the node's receipt
    write waits. The answer therefore arrives only after the lock is let go and the receipt committed (before
    this change it arrived at once, the write still pending); the node is killed with -9 the moment it does,
    and the store, reopened, holds the request's receipt."""
    from mesh402.work.store import ReceiptStore
    from mesh402.mesh.identity import NodeIdentity
    from harness.dev_chain import start_chain, start_facilitator, start_paid_node
    from harness.x402_payments import buy_chat
    require_contract_toolchain()
    chain = start_chain(tmp_path, buyers=1, nodes=1)
    procs = [chain.proc]
    try:
        fac, fac_url = start_facilitator(tmp_path, chain)
        procs.append(fac)
        home = tmp_path / "paid"
        node, base = start_paid_node(home, chain, fac_url, "--price", "0.01", "--pay-to", "node-0")
        procs.append(node)
        db = sqlite3.connect(home / "receipts.sqlite", timeout=0, isolation_level=None, check_same_thread=False)
        db.execute("BEGIN IMMEDIATE")  # the node's receipt write now waits for this test
        let_go = threading.Timer(HOLD_S, db.execute, ["ROLLBACK"])
        t0 = time.monotonic()
        let_go.start()
        body = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0}
        status = buy_chat(chain, int(base.rsplit(":", 1)[1]), body)
        node.kill9()
        answered = time.monotonic() - t0
        let_go.join()
        db.close()
        assert status == 200
        print(f"\nanswer after {answered:.1f} s (store locked for {HOLD_S:.0f} s), node killed at once")
        st = ReceiptStore(home / "receipts.sqlite")
        try:
            assert st.count() == 1, "the answer went out before its receipt was committed"
            (rid,) = st._db.execute("SELECT request_id FROM requests").fetchone()
            (r,) = st.receipts(rid)
            assert r.node_id == NodeIdentity.load_or_create(home).node_id_hex and r.tokens > 0
        finally:
            st.close()
        assert answered >= HOLD_S  # the answer waited for its receipt
    finally:
        for p in reversed(procs):
            p.stop()
