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
import ctypes, threading, time

def test_native_hang():
    # another thread holds the GIL inside native code, so the main thread never runs SIGALRM's handler
    threading.Thread(target=lambda: ctypes.PyDLL(None).sleep(30), daemon=True).start()
    time.sleep(0.2)
    time.sleep(60)

def test_after():
    pass
'''


def test_a_test_hung_in_native_code_is_ended_and_its_stacks_printed(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ("tests.support.watchdog",)\n')
    (tmp_path / "test_hang.py").write_text(HANGING)
    env = {**os.environ, "MESH402_TEST_HARD_S": "4", "PYTHONPATH": str(REPO)}
    env.pop("MESH402_HANG_DUMPS", None)  # this run's controller makes its own
    out = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path), "-p", "no:cacheprovider", "-o", "addopts=",
                          "-n", "2", "--timeout", "2", "--rootdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env).stdout
    # pytest-timeout's 2 s passed unseen; the watchdog ended the worker at 4 s and xdist went on
    assert "1 failed, 1 passed" in out, out[-3000:]
    assert "test_hang.py::test_native_hang ran past 4 s" in out, out[-3000:]
    assert re.search(r'test_hang.py", line \d+ in test_native_hang', out), out  # where it hung, from the dump
