"""Receipts for a paid MoE expert-parallel request on real nodes (a local dev chain and facilitator):
the host keeps, in one transaction, its own receipt (trunk + the experts it holds) and the expert
node's (the rows it ran), each with the work units of what it computed."""

from __future__ import annotations

from pathlib import Path

import httpx

from harness.dev_chain import entry_receipts
from harness.mesh_nodes import MeshNodes, wait_until
from harness.reference import ready_plan as plan_of
from harness.x402_payments import buy_chat
from tests.support.chain import paid_chain
from tests.support.moe_mesh import BUDGET, MESSAGES

MAX_TOKENS = 8


def test_paid_expert_parallel_request_keeps_a_receipt_per_node(tmp_path: Path, moe_model) -> None:
    from mesh402.work.receipts import ExpertReceipt, expert_errors
    from mesh402.work.units import moe_flops
    from mesh402.models.gguf_meta import read_gguf_meta
    chain, fac, paid = paid_chain(tmp_path)
    nodes = MeshNodes(tmp_path / "nodes")

    def extra(name: str) -> list[str]:
        return ["--model", str(moe_model), "--mode", "exact", "--max-vram", str(BUDGET[name]), *paid]

    try:
        a = nodes.start("a", no_model=False, extra=extra("a"), timeout=120)
        b = nodes.start("b", join=a.token(), no_model=False, extra=extra("b"), timeout=120)
        wait_until(lambda: all((plan_of(n) or {}).get("kind") == "experts" for n in (a, b)), timeout=180,
                   what="an expert-parallel plan")
        plan = plan_of(a)
        host, worker = (a, b) if plan["host"] == a.node_id else (b, a)
        model = httpx.get(f"http://127.0.0.1:{host.api_port}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0}
        assert buy_chat(chain, host.api_port, body) == 200
        st, epoch = entry_receipts(host.home, 2, timeout=30)
        (rid,) = st._db.execute("SELECT request_id FROM requests").fetchone()
        receipts = st.receipts(rid)
        assert all(isinstance(r, ExpertReceipt) for r in receipts) and expert_errors(receipts, 2) == []
        assert [(r.stage, r.node_id) for r in receipts] == [(0, host.node_id), (1, worker.node_id)]
        assert receipts[0].trunk_tokens > 0 and receipts[1].rows
        held = {n: {(int(la), e) for la, es in per.items() for e in es} for n, per in plan["experts"].items()}
        assert {(la, e) for la, e, _ in receipts[1].rows} <= held[worker.node_id]
        assert {(la, e) for la, e, _ in receipts[0].rows} <= held.get(host.node_id, set())
        table = moe_flops(read_gguf_meta(moe_model))
        want = {r.node_id: table.units(r.trunk_tokens, r.rows) for r in receipts}
        assert st.work_units(epoch) == want and all(u > 0 for u in want.values())
        print(f"\nunits: host {want[host.node_id]:.4g}, expert node {want[worker.node_id]:.4g}")
    finally:
        nodes.stop_all()
        fac.stop()
        chain.proc.stop()
