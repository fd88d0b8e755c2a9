"""`mesh402 chain dev` owns its anvil: whoever stops the command's process group, gently or with SIGKILL (a test
harness, a supervisor, a terminal's Ctrl-C), stops the chain with it; no anvil is left holding its port."""

from __future__ import annotations

from pathlib import Path

import psutil

from harness.dev_chain import start_chain
from harness.mesh_nodes import wait_until
from harness.procs import gone
from tests.support.chain import require_contract_toolchain


def test_a_chain_dev_killed_outright_leaves_no_anvil(tmp_path: Path) -> None:
    require_contract_toolchain()
    chain = start_chain(tmp_path, buyers=1, nodes=1)
    try:
        (anvil,) = [p for p in psutil.Process(chain.proc.proc.pid).children() if "anvil" in p.name()]
        chain.proc.kill9()  # SIGKILL to the command's process group: it gets no chance to stop anvil itself
        wait_until(lambda: gone(anvil.pid), 10, what="anvil gone with its chain dev")
    finally:
        chain.proc.stop()
