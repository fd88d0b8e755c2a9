"""Start real mesh402 node processes for tests and benchmarks: free ports, temp homes, readiness waits, cleanup."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from harness import zygote

REPO = Path(__file__).resolve().parents[1]
MESH402 = [sys.executable, "-m", "mesh402.cli"]


_HANDED_OUT: set[int] = set()  # ports this process has handed out (the kernel may offer a freed one again)


def free_port() -> int:
    """A loopback TCP port nobody holds now and this process has not handed out before.

    The kernel can offer the port it just freed on the next bind to port 0, so `free_port(), free_port()`
    could name one port twice (a node then fails to bind its console on its own API port)."""
    for _ in range(64):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no fresh loopback port")


def gone(pid: int) -> bool:
    """Whether process `pid` has ended: no such process, or a zombie its parent (or init) has not reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class NodeProcess:
    """A `mesh402 ...` child process with its output in a log file (shown when a test fails)."""

    def __init__(self, args: list[str], home: Path, *, env: dict[str, str] | None = None) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = home / "node.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(self.log_path, "wb")
        self.proc: subprocess.Popen[bytes] | zygote.ZygoteChild
        if args[:2] == [sys.executable, "-m"] and zygote.enabled(full_env):  # forked with torch already imported
            self.proc = zygote.shared().spawn(args, full_env, self.log_path)
        else:
            self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
                                         start_new_session=True)
        if os.environ.get("MESH402_CPU_REPORT"):  # tests/support/cpu_report.py: node starts per test
            with open(os.environ["MESH402_CPU_REPORT"] + ".nodes", "a") as f:
                f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?')}\t{' '.join(args[3:5])}\n")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_http(self, url: str, *, timeout: float = 120.0, ok: tuple[int, ...] = (200,)) -> float:
        """Poll url until it answers with one of `ok`; returns seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(url, timeout=2.0).status_code in ok:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{url} not ready after {timeout}s:\n{self.log()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)
