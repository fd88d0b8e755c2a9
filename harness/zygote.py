"""A fork server for test node processes: imports torch and the node's modules once, then forks a real process
per `python -m MODULE ARGS...` the tests start.

Why: the suite starts ~230 node processes; each spent ~2.3 of its ~3.4 CPU-seconds to readiness importing
torch, the CLI and the serving stack before doing anything the test is about. A child forked from this server
runs the same entry point (`runpy` on the same module, same argv, same environment, its own pid, process
group, log file and exit status), but starts with those modules already in memory.

The server stays single-threaded (apart from an idle BLAS helper thread that numpy's import starts, which
registers fork handlers) and never runs a torch op, so nothing is half-initialised in a child. It is used only
when `MESH402_NODE_ZYGOTE=1` (tests/conftest.py sets it; benchmarks start nodes by exec) and never for a
command whose environment changes how the interpreter itself starts (PYTHON* variables). Modules that
patch the product at import (tests.support.tamper_node) are never imported here, only run in a child.
The server stops when its test process closes it or dies, and takes the children still running with it: a
test process killed (or ended by tests/support/watchdog.py) leaves no node behind.

    python -m harness.zygote SOCKET_PATH     # prints "ready" once it accepts requests

Protocol on the Unix socket, one connection per child: the client sends one JSON line {"module", "argv",
"env", "cwd", "log"}; the server answers {"pid": N} once forked and {"exit": code} when the child ends
(code as subprocess reports it: negative for a signal)."""

from __future__ import annotations

import atexit
import importlib
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# What a `mesh402 serve` process imports on its way to ready (measured with -X importtime), heaviest first.
PRELOAD = (
    "torch", "numpy", "mesh402.serving.distributed", "mesh402.cli.main", "mesh402.cli.serve", "mesh402.node.node",
    "mesh402.models.gguf_meta", "mesh402.engine.chat_template", "mesh402.engine.prefix", "mesh402.engine.engine",
    "mesh402.economics.chain", "web3", "uvicorn.protocols.http.h11_impl",
    "uvicorn.protocols.websockets.websockets_sansio_impl", "psutil", "pydantic.v1", "rich._emoji_codes", "iroh",
)


def _preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional part this machine lacks: the child imports (and fails) as it would
            pass


def _send(conn: socket.socket, msg: dict[str, Any]) -> None:
    try:
        conn.sendall(json.dumps(msg).encode() + b"\n")
    except OSError:  # the client went away; the child runs on like an orphaned Popen child would
        pass


def _read_request(conn: socket.socket) -> dict[str, Any] | None:
    conn.settimeout(10.0)
    buf = b""
    try:
        while not buf.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                return None
            buf += chunk
        return json.loads(buf)
    except (OSError, ValueError):
        return None


def _serve(path: str) -> dict[str, Any] | None:
    """The server loop. Returns only in a forked child, with that child's request."""
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd does the work
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))  # Zygote.close: leave through cleanup
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(128)
    parent = os.getppid()
    children: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while os.getppid() == parent and not stop[0]:  # the test process that started us is gone: so are we
        ready, _, _ = select.select([srv, wake_r], [], [], 1.0)
        if wake_r in ready:
            try:
                while wake_r.recv(4096):
                    pass
            except BlockingIOError:
                pass
        while True:  # reap every child that ended; report its status to whoever started it
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
                conn.close()
        if srv not in ready:
            continue
        conn, _ = srv.accept()
        req = _read_request(conn)
        if req is None:
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            for s in (srv, wake_r, wake_w, conn, *children.values()):
                s.close()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            return req
        try:
            os.setpgid(pid, pid)  # also done in the child: whichever runs first, killpg(pid) works at once
        except OSError:
            pass
        children[pid] = conn
        _send(conn, {"pid": pid})
    srv.close()
    os.unlink(path)
    # Children still running were never stopped: their test process died (killed, or ended by the suite's
    # hang watchdog, tests/support/watchdog.py) or leaked them. Nothing can stop them later, so stop them now,
    # each with its process group, and reap them.
    for pid in children:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    for pid in children:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return None


def _run_child(req: dict[str, Any]) -> None:
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    log = os.open(req["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    # PYTHONUNBUFFERED's effect: every write reaches the log at once (a test shows the log when it fails)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True, line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, line_buffering=True)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    sys.argv = [req["module"], *req["argv"]]
    import runpy

    runpy.run_module(req["module"], run_name="__main__", alter_sys=True)


def main() -> None:
    _preload()
    req = _serve(sys.argv[1])
    if req is not None:
        _run_child(req)  # the child: leaves through the interpreter's normal exit, with the module's status


# ---- the client side (in the test process) ----

def enabled(env: dict[str, str]) -> bool:
    """Whether a command with this environment may be forked from the zygote."""
    if os.environ.get("MESH402_NODE_ZYGOTE") != "1" or os.environ.get("MESH402_CPU_REPORT"):
        return False  # the CPU report counts the test process's own children only
    startup = {k for k in {*env, *os.environ} if k.startswith("PYTHON") and k != "PYTHONUNBUFFERED"}
    return all(env.get(k) == os.environ.get(k) for k in startup)


class ZygoteChild:
    """What NodeProcess needs of subprocess.Popen, for a child of the zygote."""

    def __init__(self, conn: socket.socket, pid: int, args: list[str]) -> None:
        self._conn, self.pid, self.args = conn, pid, args
        self.returncode: int | None = None
        self._buf = b""

    def _read_exit(self, timeout: float | None) -> None:
        if self.returncode is not None:
            return
        while b"\n" not in self._buf:
            ready, _, _ = select.select([self._conn], [], [], timeout)
            if not ready:
                return
            chunk = self._conn.recv(4096)
            if not chunk:  # the zygote died: the child's status is lost; report it as killed
                self.returncode = -signal.SIGKILL
                self._conn.close()
                return
            self._buf += chunk
        self.returncode = int(json.loads(self._buf.split(b"\n", 1)[0])["exit"])
        self._conn.close()

    def poll(self) -> int | None:
        self._read_exit(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._read_exit(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.returncode


class Zygote:
    """The test process's fork server, started on first use and stopped at exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="mesh402-zygote-")
        self._path = os.path.join(self._dir, "sock")

    def _start(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-m", "harness.zygote", self._path], cwd=REPO,
                                      stdout=subprocess.PIPE, start_new_session=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"zygote did not start: {line!r}")
        atexit.register(self.close)

    def spawn(self, args: list[str], env: dict[str, str], log: Path) -> ZygoteChild:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self._path)
        conn.sendall(json.dumps({"module": args[2], "argv": args[3:], "env": env, "cwd": str(REPO),
                                 "log": str(log)}).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                raise RuntimeError("zygote closed the connection before forking")
            buf += chunk
        first, rest = buf.split(b"\n", 1)
        child = ZygoteChild(conn, int(json.loads(first)["pid"]), args)
        child._buf = rest
        return child

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()


_zygote: Zygote | None = None
_zygote_lock = threading.Lock()


def shared() -> Zygote:
    """This test process's zygote (one per pytest worker)."""
    global _zygote
    with _zygote_lock:
        if _zygote is None:
            _zygote = Zygote()
        return _zygote


if __name__ == "__main__":
    main()
