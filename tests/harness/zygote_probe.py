"""Run by tests/harness/test_zygote.py inside a child of the zygote: prints what a process should own."""

import os
import sys

print("argv", sys.argv[1:])
print("env", os.environ.get("ZYGOTE_PROBE"))
print("cwd", os.getcwd())
print("pid", os.getpid(), "pgid", os.getpgid(0))
sys.exit(7)
