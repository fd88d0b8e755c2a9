"""The suite's hard per-test deadline (tests/support/watchdog.py): a test stuck where pytest-timeout's signal
cannot reach it still ends, the run goes on to the next test, and the summary shows where it hung."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

HANGING = '''
import asyncio, ctypes, threading, time

def test_native_hang():
    # another thread holds the GIL inside native code, so the main thread never runs SIGALRM's handler
    threading.Thread(target=lambda: ctypes.PyDLL(None).sleep(30), daemon=True).start()
    time.sleep(0.2)
    time.sleep(60)

def test_timeout_lost_in_a_task():
    async def main():
        async def busy():  # where the main thread is when the alarm comes: the task keeps the failure
            while True:
                time.sleep(0.01)

        task = asyncio.ensure_future(busy())
        await asyncio.Event().wait()  # and the test waits on, for something that never comes

    asyncio.run(main())

def test_after():
    pass
'''


def test_hung_tests_are_ended_and_their_stacks_printed(tmp_path: Path) -> None:
    """One test stuck in native code, one whose timeout failure a background asyncio task swallowed: both end
    2 s past their 2 s timeout with their stacks printed, and the run goes on."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ("tests.support.watchdog",)\n')
    (tmp_path / "test_hang.py").write_text(HANGING)
    env = {**os.environ, "MESH402_TEST_GRACE_S": "2", "PYTHONPATH": str(REPO)}
    env.pop("MESH402_HANG_DUMPS", None)  # this run's controller makes its own
    out = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path), "-p", "no:cacheprovider", "-o", "addopts=",
                          "-n", "2", "--timeout", "2", "--rootdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env).stdout
    # pytest-timeout's 2 s passed unseen or was lost; the watchdog ended each worker at 4 s and xdist went on
    assert "2 failed, 1 passed" in out, out[-3000:]
    for name in ("test_native_hang", "test_timeout_lost_in_a_task"):
        assert f"test_hang.py::{name} ran past 4 s" in out, out[-3000:]
    for name in ("test_native_hang", "test_timeout_lost_in_a_task"):  # where each hung, from the dump
        assert re.search(rf'test_hang.py", line \d+ in {name}', out), out
