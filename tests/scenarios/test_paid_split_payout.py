"""Issue 8 end to end on real nodes and a real local chain: a paid entry serves a model split over two
nodes, every stage signs a work receipt, the entry keeps the chain, both nodes register as ERC-8004
agents (each with its own owner key), and `mesh402 payout` pays the epoch's revenue by work units."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from harness.dev_chain import entry_receipts
from harness.mesh_nodes import MeshNodes, wait_until
from harness.procs import MESH402
from harness.reference import ready_plan as plan_of
from harness.x402_payments import buy_chat
from tests.support.chain import paid_chain
from tests.support.split_mesh import SPLIT_ARGS

MODEL = "smollm2-135m-instruct"


def test_paid_split_request_receipts_and_epoch_payout(tmp_path: Path) -> None:
    from mesh402.work.receipts import chain_errors
    from mesh402.work.store import epoch_of
    from mesh402.work.units import flops_per_token, split_pro_rata
    from mesh402.models.catalog import bundled_model_path
    from mesh402.models.gguf_meta import read_gguf_meta
    chain, fac, paid = paid_chain(tmp_path)
    nodes = MeshNodes(tmp_path / "nodes")
    try:
        a = nodes.start("a", no_model=False, extra=[*SPLIT_ARGS, *paid])
        b = nodes.start("b", join=a.token(), no_model=False, extra=[*SPLIT_ARGS, *paid], timeout=120)
        wait_until(lambda: plan_of(a) is not None and plan_of(b) is not None, timeout=180, what="a ready split plan")
        plan = plan_of(a)
        assert len(plan["stages"]) == 2, plan
        host = a if plan["host"] == a.node_id else b
        worker = b if host is a else a
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "temperature": 0}

        assert buy_chat(chain, host.api_port, body) == 200
        st, epoch = entry_receipts(host.home, 2, timeout=30)
        (rid,) = st._db.execute("SELECT request_id FROM requests").fetchone()
        assert abs(epoch - epoch_of(time.time(), 3600)) <= 1
        receipts = st.receipts(rid)
        assert chain_errors(receipts, 30) == []
        assert [r.node_id for r in receipts] == [host.node_id, worker.node_id]
        meta = read_gguf_meta(bundled_model_path())
        want = {r.node_id: flops_per_token(meta, r.layer_start, r.layer_end) * r.tokens for r in receipts}
        assert st.work_units(epoch) == want
        # each node registers its own agent; the entry pays the epoch from the wallet that got the revenue
        for node, acct in ((host, "node-0"), (worker, "node-1")):
            r = subprocess.run([*MESH402, "register", "--home", str(node.home), "--deployment", str(chain.dir),
                                "--account", acct], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0 and "binding verified" in r.stdout, r.stdout + r.stderr
        w0 = chain.balance("node-1")
        r = subprocess.run([*MESH402, "payout", "--home", str(host.home), "--epoch", str(epoch), "--deployment",
                            str(chain.dir), "--account", "node-0", "--push",
                            "--no-require-validation"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        pay = split_pro_rata(10_000, want)
        assert chain.balance("node-1") - w0 == pay[worker.node_id] > 0
        print("\n" + r.stdout)
    finally:
        nodes.stop_all()
        fac.stop()
        chain.proc.stop()
