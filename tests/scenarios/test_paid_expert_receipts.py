"""Receipts for a paid MoE expert-parallel request on real nodes (a local dev chain and facilitator):
the host keeps, in one transaction, its own receipt (trunk + the experts it holds) and the expert
node's (the rows it ran), each with the work units of what it computed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from harness.dev_chain import entry_receipts
from harness.mesh_nodes import MeshNodes, wait_until
from harness.reference import ready_plan as plan_of
from harness.x402_payments import buy_chat
from tests.support.chain import paid_chain
from tests.support.moe_mesh import BUDGET, MESSAGES

MAX_TOKENS = 8


def moe_split(nodes: MeshNodes, moe_model: Path, flags: dict[str, list[str]], **b_proc: Any
              ) -> tuple[Any, Any, dict, Any, Any]:
    """Nodes a and b (each with its `flags`; `b_proc`: b's env/launcher) holding the tiny MoE split by experts:
    (a, b, plan, host, worker)."""
    def extra(name: str) -> list[str]:
        return ["--model", str(moe_model), "--mode", "exact", "--max-vram", str(BUDGET[name]), *flags[name]]

    a = nodes.start("a", no_model=False, extra=extra("a"), timeout=120)
    b = nodes.start("b", join=a.token(), no_model=False, extra=extra("b"), timeout=120, **b_proc)
    wait_until(lambda: all((plan_of(n) or {}).get("kind") == "experts" for n in (a, b)), timeout=180,
               what="an expert-parallel plan")
    plan = plan_of(a)
    host, worker = (a, b) if plan["host"] == a.node_id else (b, a)
    return a, b, plan, host, worker


def test_paid_expert_parallel_request_keeps_a_receipt_per_node(tmp_path: Path, moe_model) -> None:
    """... and (issue 14, property 5 for expert work) an expert node b that returns its experts' outputs scaled
    by 1.01 (test-only `MESH402_TAMPER_EXPERTS`; its receipts stay well formed) fails its spot check on chain: the
    host, which validates (--validator), audits b's first request of the epoch from one sampled run; in the
    validation round b requests ERC-8004 validation of its work, the host re-executes the run on its own copy
    of those experts and answers 0."""
    import subprocess
    import sys

    from harness.procs import MESH402
    from mesh402.economics.validation_registry import validation_status
    from mesh402.work.receipts import ExpertReceipt, expert_errors
    from mesh402.work.units import moe_flops
    from mesh402.models.gguf_meta import read_gguf_meta
    chain, fac, paid = paid_chain(tmp_path)
    nodes = MeshNodes(tmp_path / "nodes")
    owner = {n: ["--owner-key-file", str(chain.dep.key_file(acct)), "--deployment", str(chain.dir)]
             for n, acct in (("a", "node-0"), ("b", "node-1"))}

    try:
        a, b, plan, host, worker = moe_split(
            nodes, moe_model, {"a": [*paid, *owner["a"], "--validator"], "b": owner["b"]},
            env={"MESH402_TAMPER_EXPERTS": "scale"}, launcher=[sys.executable, "-m", "tests.support.tamper_node"])
        assert (host, worker) == (a, b), plan  # a has the larger budget: it hosts (and pays, and validates)
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

        checks = st.spot_checks(epoch)
        assert [(c.node_id, c.expert) for c in checks] == [(b.node_id, True)], checks
        for n, acct in ((a, "node-0"), (b, "node-1")):
            r = subprocess.run([*MESH402, "register", "--home", str(n.home), "--deployment", str(chain.dir),
                                "--account", acct], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0 and "binding verified" in r.stdout, r.stdout + r.stderr
        r = httpx.post(f"{a.console}/api/epochs/{epoch}/validate", headers=a.console_headers, timeout=300)
        assert r.status_code == 200, r.text
        res = r.json()["nodes"][b.node_id]
        assert res.get("score") == 0, res
        vs = validation_status(chain.w3(), chain.dep.contracts["ValidationRegistry"], res["request_hash"])
        assert vs.answered and vs.response == 0 and vs.validator.lower() == chain.dep.address("node-0").lower()
    finally:
        nodes.stop_all()
        fac.stop()
        chain.proc.stop()


def test_expert_node_is_paid_by_escrow_vouchers_and_refuses_an_uncovered_host(tmp_path: Path, moe_model) -> None:
    """Issue 14, property 6: with --escrow on both nodes, the expert node of a paid MoE split is paid like a
    stage: terms on a request's first run, cumulative vouchers on its runs and the final one with the receipt
    ask, redeemed on chain; before the host's escrow covers it, the expert node refuses the work (`unpaid`)
    and the buyer is charged nothing."""
    from tests.support.escrow_mesh import USDC, escrow_args, escrow_of, escrow_status, fund_escrow
    chain, fac, paid = paid_chain(tmp_path)
    fac_url = paid[paid.index("--facilitator") + 1]
    nodes = MeshNodes(tmp_path / "nodes")
    accounts = {"a": "node-0", "b": "node-1"}

    try:
        a, b, plan, host, worker = moe_split(nodes, moe_model,
                                             {n: escrow_args(chain, fac_url, accounts[n]) for n in BUDGET})
        host_acct, worker_acct = (accounts["a"], accounts["b"]) if host is a else (accounts["b"], accounts["a"])
        wait_until(lambda: "escrow" in ((host.peers().get(worker.node_id, {}).get("announcement") or {})
                                        .get("labels") or {}), timeout=60, what="the expert node's escrow label")
        wait_until(lambda: "escrow" in ((worker.peers().get(host.node_id, {}).get("announcement") or {})
                                        .get("labels") or {}), timeout=60, what="the host's escrow label (its payer)")
        model = httpx.get(f"http://127.0.0.1:{host.api_port}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0}

        buyer_before = chain.balance("buyer-0")
        assert buy_chat(chain, host.api_port, body) != 200  # the host's escrow covers nothing for the expert node
        refusal = (escrow_status(worker).get("worker") or {}).get("last_refusal", "")
        assert "escrow" in refusal and "covers" in refusal, refusal
        assert chain.balance("buyer-0") == buyer_before  # nothing settled for work not done

        fund_escrow(chain, host_acct, USDC, lock_for=worker_acct)
        wait_until(lambda: (plan_of(host) or {}).get("kind") == "experts", timeout=120, what="the plan, still ready")
        before = chain.balance(worker_acct)
        assert buy_chat(chain, host.api_port, body) == 200
        entry_wallet, worker_wallet = chain.dep.address(host_acct), chain.dep.address(worker_acct)
        held = lambda: (escrow_status(worker).get("held") or {}).get(entry_wallet.lower(), {})  # noqa: E731
        wait_until(lambda: held().get("owed", 0) > 0, timeout=30, what="the expert node's work recorded")
        assert held()["vouchered"] == held()["owed"], held()  # the final voucher covers every row it ran
        vouchered = held()["vouchered"]
        wait_until(lambda: escrow_of(chain).channel(entry_wallet, worker_wallet).redeemed == vouchered, timeout=60,
                   what="the expert node's redemption")
        assert chain.balance(worker_acct) == before + vouchered
        assert vouchered < 10_000  # a share of the 0.01 USDC request: the host keeps the trunk's part
    finally:
        nodes.stop_all()
        fac.stop()
        chain.proc.stop()

