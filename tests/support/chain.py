"""Chain set-ups that only tests make: they fail the test (never skip it) when the npm contract toolchain is
missing, since tests never reach the internet and the toolchain is installed at setup time."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh402.economics import toolchain
from harness.dev_chain import DevChain, start_chain, start_facilitator
from harness.procs import NodeProcess


def require_contract_toolchain() -> None:
    if not toolchain.tools_ready():
        pytest.fail("the npm contract toolchain is missing: run bash scripts/setup-dev-extra.sh")


def paid_chain(tmp: Path, nodes: int = 2) -> tuple[DevChain, NodeProcess, list[str]]:
    """A dev chain (one buyer, `nodes` node accounts), its facilitator, and the `serve` flags of a paid node
    using them (price 0.01 to node-0). Fails the test when the npm contract toolchain is missing."""
    require_contract_toolchain()
    chain = start_chain(tmp, buyers=1, nodes=nodes)
    fac, fac_url = start_facilitator(tmp, chain)
    return chain, fac, ["--price", "0.01", "--pay-to", "node-0", "--deployment", str(chain.dir), "--facilitator", fac_url]
