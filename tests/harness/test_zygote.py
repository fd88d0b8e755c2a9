"""The fork server test nodes start from (harness/zygote.py): a forked child behaves like an exec'd one —
its own argv, environment, log, process group and exit status, signals included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from harness import zygote
from harness.mesh_nodes import wait_until
from harness.procs import MESH402, NodeProcess, free_port, gone


@pytest.fixture(autouse=True)
def _zygote_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH402_NODE_ZYGOTE", "1")
    monkeypatch.delenv("MESH402_CPU_REPORT", raising=False)


def test_a_forked_command_gets_its_argv_env_log_and_exit_status(tmp_path: Path) -> None:
    ok = NodeProcess([*MESH402, "--help"], tmp_path / "ok")
    assert isinstance(ok.proc, zygote.ZygoteChild)
    assert ok.proc.wait(60) == 0 and "serve" in ok.log()
    bad = NodeProcess([*MESH402, "serve", "--no-such-flag"], tmp_path / "bad")
    assert bad.proc.wait(60) == 2 and "no-such-flag" in bad.log()
    probe = NodeProcess([sys.executable, "-m", "tests.harness.zygote_probe", "a b", "c"], tmp_path / "probe",
                        env={"ZYGOTE_PROBE": "from-env"})
    assert probe.proc.wait(60) == 7
    out = probe.log()
    assert "argv ['a b', 'c']" in out and "env from-env" in out and f"cwd {zygote.REPO}" in out
    assert f"pid {probe.proc.pid} pgid {probe.proc.pid}" in out, out  # its own process group, for killpg


def test_a_forked_server_stops_on_a_signal_to_its_group(tmp_path: Path) -> None:
    port = free_port()
    node = NodeProcess([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], tmp_path)
    node.wait_http(f"http://127.0.0.1:{port}/", timeout=60)
    assert node.proc.poll() is None
    assert node.stop() == -signal.SIGTERM
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/", timeout=2)


def test_startup_environment_differences_are_exec_not_forked(tmp_path: Path) -> None:
    assert zygote.enabled(dict(os.environ))
    assert not zygote.enabled({**os.environ, "PYTHONHASHSEED": "7"})
    node = NodeProcess([*MESH402, "--help"], tmp_path, env={"PYTHONWARNINGS": "error"})
    assert not isinstance(node.proc, zygote.ZygoteChild)
    t0 = time.monotonic()
    assert node.proc.wait(60) == 0 and time.monotonic() - t0 < 60


def test_children_left_running_are_stopped_with_the_zygote(tmp_path: Path) -> None:
    """A child nobody stopped (a test that leaked it) ends when its zygote is closed, not later."""
    z = zygote.Zygote()
    child = z.spawn([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"], dict(os.environ),
                    tmp_path / "child.log")
    assert child.poll() is None
    z.close()
    wait_until(lambda: gone(child.pid), 15, what="the leaked child stopped")


def test_children_die_with_the_test_process_that_started_them(tmp_path: Path) -> None:
    """A test process killed outright (or ended by the suite's hang watchdog) leaves no node running: its zygote
    notices and stops the children it forked."""
    code = ("import os, sys, time\nfrom pathlib import Path\nfrom harness import zygote\n"
            "z = zygote.Zygote()\n"
            f"c = z.spawn([sys.executable, '-m', 'http.server', '0', '--bind', '127.0.0.1'], dict(os.environ), "
            f"Path({str(tmp_path / 'child.log')!r}))\n"
            "print(c.pid, flush=True)\ntime.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=zygote.REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        os.kill(pid, 0)  # running
        parent.kill()
        parent.wait(10)
        wait_until(lambda: gone(pid), 15, what="the child stopped")
    finally:
        if parent.poll() is None:
            parent.kill()
