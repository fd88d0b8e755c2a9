"""Receipts bound at the entry, on real node processes and a real local chain: a paid entry serves the bundled
model split over three nodes, and a stage process cheats on its receipts (tests/support/tamper_node.py with
MESH402_RECEIPT_CHEAT): it claims the layers of the stages after it and drops their receipts, or answers
with a chain forged with throwaway keys claiming 10^9 tokens. The buyer still gets its answer; the entry
keeps only its own receipt (the bound prefix), logs the refusal, and nothing the cheat claimed is stored."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from harness.dev_chain import entry_receipts
from harness.mesh_nodes import MeshNodes, wait_until
from harness.reference import ready_plan
from harness.tamper import FORGED_TOKENS
from harness.x402_payments import buy_chat
from tests.support.chain import paid_chain

MODEL = "smollm2-135m-instruct"
CHEATER = [sys.executable, "-m", "tests.support.tamper_node"]

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("how", ["claim_downstream", "forge"])
def test_a_stage_process_cheating_on_receipts_gets_nothing_stored(tmp_path: Path, how: str) -> None:
    chain, fac, paid = paid_chain(tmp_path, nodes=3)
    nodes = MeshNodes(tmp_path / "nodes")
    try:
        # capacities: A hosts (largest), B and C take the other two stages; both cheat, so whichever is the
        # middle stage cheats (a last stage has no one after it to cheat out of its layers)
        a = nodes.start("a", no_model=False, extra=["--mode", "exact", "--max-vram", "0.06", *paid])
        tok = a.token()
        cheats = [nodes.start(n, join=tok, no_model=False, wait=False, extra=["--mode", "exact", "--max-vram", "0.05"],
                              env={"MESH402_RECEIPT_CHEAT": how}, launcher=CHEATER) for n in ("b", "c")]
        for n in cheats:
            n.proc.wait_http(f"{n.console}/api/status", timeout=120)
        wait_until(lambda: (p := ready_plan(a)) is not None and len(p["stages"]) == 3, timeout=240,
                   what="a ready 3-stage plan")
        assert ready_plan(a)["host"] == a.node_id

        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6, "temperature": 0}
        assert buy_chat(chain, a.api_port, body) == 200  # the buyer is answered all the same
        st, epoch = entry_receipts(a.home, 1, timeout=30)
        (rid,) = st._db.execute("SELECT request_id FROM requests").fetchone()
        stored = st.receipts(rid)
        assert [r.node_id for r in stored] == [a.node_id], stored  # only the entry's own, bound receipt
        assert all(r.tokens < FORGED_TOKENS for r in stored)
        assert set(st.work_units(epoch)) == {a.node_id}  # nobody is paid for what the cheat claimed
        assert "receipts from the stages refused" in a.log()
    finally:
        nodes.stop_all()
        fac.stop()
        chain.proc.stop()
