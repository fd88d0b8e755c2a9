"""Issue 8's verification, tried as a user would, on real node processes and a real local chain.

Three registered nodes serve a paid request as a 3-stage split: the entry A (stage 0), an honest B and a
node C that cheats (1% activation perturbation in exact mode, a substituted Q4_0 quantization in fast
mode; the test-only entry point tests.support.tamper_node: no user flag does this). A fourth node V is the mesh's validator: it holds the model
on disk but is too small to take a stage. The entry audits the request (each node's first request in an
epoch always is). `mesh402 payout` runs the validation round (B and C request ERC-8004 validation of their
work, V re-executes their audited step and answers on chain) and pays by work units: A and B in
proportion to their layers and tokens, C nothing, with a failed validation and reputation feedback on
chain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from harness.dev_chain import entry_receipts
from harness.mesh_nodes import MeshNodes, wait_until
from harness.procs import MESH402
from harness.reference import ready_plan
from harness.x402_payments import buy_chat
from tests.support.chain import paid_chain

MODEL = "smollm2-135m-instruct"


# One cheat per mode: the path from the audit to the chain and the payout is the same for every cheat, and
# tests/engine/test_replay.py catches each cheat of harness.tamper in both modes in-process. An honest run
# needs no case of its own: B is an honest stage in each case and must pass its check and be paid.
CASES = [("exact", "perturb"), ("fast", "requant")]


@pytest.mark.parametrize("mode,cheat", CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_tampering_stage_is_caught_not_paid_and_recorded_on_chain(tmp_path: Path, mode: str, cheat: str) -> None:
    from mesh402.economics.validation_registry import validation_status
    from mesh402.work.units import split_pro_rata
    chain, fac, paid = paid_chain(tmp_path, nodes=4)
    nodes = MeshNodes(tmp_path / "nodes")
    dep = ["--deployment", str(chain.dir)]

    def owner(acct: str) -> list[str]:
        return ["--owner-key-file", str(chain.dep.key_file(acct)), *dep]

    try:
        # the entry trusts only validators its operator names: V's identity exists before A starts
        from mesh402.mesh.identity import NodeIdentity
        v_id = NodeIdentity.load_or_create(tmp_path / "nodes" / "v").node_id_hex
        # capacities: A hosts (largest), B and C take the other two stages, V can hold no stage at all
        a = nodes.start("a", no_model=False, extra=["--mode", mode, "--max-vram", "0.06", *paid,
                                                    "--owner-key-file", str(chain.dep.key_file("node-0")),
                                                    "--validator-id", v_id])
        tok = a.token()
        b = nodes.start("b", join=tok, no_model=False, wait=False,
                        extra=["--mode", mode, "--max-vram", "0.05", *owner("node-1")])
        c = nodes.start("c", join=tok, no_model=False, wait=False,
                        extra=["--mode", mode, "--max-vram", "0.05", *owner("node-2")],
                        env={"MESH402_TAMPER": cheat}, launcher=[sys.executable, "-m", "tests.support.tamper_node"])
        v = nodes.start("v", join=tok, no_model=False, wait=False,
                        extra=["--mode", mode, "--max-vram", "0.0001", "--validator", *owner("node-3")])
        for n in (b, c, v):
            n.proc.wait_http(f"{n.console}/api/status", timeout=120)
        for n, acct in ((a, "node-0"), (b, "node-1"), (c, "node-2")):
            r = subprocess.run([*MESH402, "register", "--home", str(n.home), "--deployment", str(chain.dir),
                                "--account", acct], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0 and "binding verified" in r.stdout, r.stdout + r.stderr
        wait_until(lambda: (p := ready_plan(a)) is not None and len(p["stages"]) == 3, timeout=240,
                   what="a ready 3-stage plan")
        plan = ready_plan(a)
        assert plan["host"] == a.node_id and {s[0] for s in plan["stages"]} == {a.node_id, b.node_id, c.node_id}

        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6, "temperature": 0}
        assert buy_chat(chain, a.api_port, body) == 200
        st, epoch = entry_receipts(a.home, 3)
        checks = st.spot_checks(epoch)
        assert {ch.node_id for ch in checks} == {b.node_id, c.node_id} and not any(ch.fault for ch in checks)

        before = {acct: chain.balance(acct) for acct in ("node-0", "node-1", "node-2")}
        r = subprocess.run([*MESH402, "payout", "--home", str(a.home), "--epoch", str(epoch), "--deployment",
                            str(chain.dir), "--account", "node-0", "--push"], capture_output=True, text=True, timeout=600)
        print("\n" + r.stdout + r.stderr)
        assert r.returncode == 0, r.stdout + r.stderr

        units = st.work_units(epoch)
        pay = split_pro_rata(10_000, units)
        assert chain.balance("node-1") - before["node-1"] == pay[b.node_id] > 0  # B: its layers x tokens
        w3 = chain.w3()
        vreg = chain.dep.contracts["ValidationRegistry"]
        rows = st.validations(epoch)
        sb = validation_status(w3, vreg, rows[b.node_id]["request_hash"])
        sc = validation_status(w3, vreg, rows[c.node_id]["request_hash"])
        v_addr = chain.dep.address("node-3")
        assert sb.answered and sb.response == 100 and sb.validator.lower() == v_addr.lower()
        from mesh402.economics.chain import contract_at
        rep = contract_at(w3, "ReputationRegistry", chain.dep.contracts["ReputationRegistry"])
        assert rep.functions.getLastIndex(rows[b.node_id]["agent_id"], chain.dep.address("node-0")).call() == 0
        assert chain.balance("node-2") == before["node-2"]  # C: nothing
        # the entry pays its own stage's share to itself and keeps C's: the revenue wallet loses only B's
        assert before["node-0"] - chain.balance("node-0") == pay[b.node_id]
        assert sc.answered and sc.response == 0 and sc.validator.lower() == v_addr.lower()
        assert rep.functions.getLastIndex(rows[c.node_id]["agent_id"], chain.dep.address("node-0")).call() == 1
        status = subprocess.run([*MESH402, "status", "--home", str(a.home)], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        text = " ".join(status.stdout.split())
        assert f"{c.node_id[:12]} not paid (failed spot check" in text
        assert f"{b.node_id[:12]} {pay[b.node_id] / 1e6:.6f}" in text
        print(status.stdout)
        # the console's Money and trust view: each node's spot checks and the validator's verdict
        money = httpx.get(f"{a.console}/api/money", headers=a.console_headers, timeout=10).json()
        seen = {row["node_id"]: row for row in money["spot_checks"] if row["epoch"] == epoch}
        assert seen[b.node_id]["score"] == 100 and seen[b.node_id]["failed"] == 0 and seen[b.node_id]["checks"] >= 1
        assert seen[c.node_id]["score"] == 0 and seen[c.node_id]["failed"] >= 1
        assert any(p_["epoch"] == epoch and p_["node_id"] == c.node_id and not p_["paid"] for p_ in money["payouts"])
    finally:
        nodes.stop_all()
        fac.stop()
        chain.proc.stop()
