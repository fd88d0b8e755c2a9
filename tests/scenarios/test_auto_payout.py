"""Automatic epoch payouts, tried as a user would, on real node processes and a real local chain.

A paid entry (`--payout-key-file` with the key of its --pay-to wallet, 20 s epochs, and the mesh's
validator itself) serves the model split with one registered worker. One request is bought with x402.
Nobody runs `mesh402 payout`: after the epoch ends (plus its grace), the entry runs the validation round
(the worker requests ERC-8004 validation, the entry re-executes its audited step and answers on chain),
publishes the epoch's Merkle root and pushes the claims, so the worker's balance rises by its share, and
`mesh402 status` shows the epoch's earnings."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from harness.dev_chain import entry_receipts
from harness.mesh_nodes import MeshNodes, wait_until
from harness.procs import MESH402
from harness.reference import ready_plan
from harness.x402_payments import buy_chat
from tests.support.chain import paid_chain

MODEL = "smollm2-135m-instruct"
EPOCH_S = 20


def test_entry_pays_the_epoch_by_itself_after_it_ends(tmp_path: Path) -> None:
    from mesh402.work.units import split_pro_rata
    chain, fac, paid = paid_chain(tmp_path)
    nodes = MeshNodes(tmp_path / "nodes")
    dep = ["--deployment", str(chain.dir)]
    key0, key1 = str(chain.dep.key_file("node-0")), str(chain.dep.key_file("node-1"))
    try:
        # the entry is the larger node, so it hosts (and is paid); neither holds the ~98 MB model alone
        a = nodes.start("a", no_model=False, extra=[
            "--mode", "exact", "--max-vram", "0.09", *paid,
            "--epoch-seconds", str(EPOCH_S), "--payout-key-file", key0, "--validator", "--owner-key-file", key0])
        b = nodes.start("b", join=a.token(), no_model=False, timeout=120,
                        extra=["--mode", "exact", "--max-vram", "0.08", "--owner-key-file", key1, *dep])
        r = subprocess.run([*MESH402, "register", "--home", str(b.home), *dep, "--account", "node-1"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "binding verified" in r.stdout, r.stdout + r.stderr
        wait_until(lambda: (p := ready_plan(a)) is not None and len(p["stages"]) == 2, timeout=180,
                   what="a ready 2-stage plan")
        assert ready_plan(a)["host"] == a.node_id
        assert "automatic payouts: every 20 s epoch" in a.proc.log()

        if time.time() % EPOCH_S > EPOCH_S - 14:  # keep the payment and the receipts in one epoch (a loaded
            # machine may take several seconds from the payment to the receipts)
            time.sleep(EPOCH_S - time.time() % EPOCH_S + 0.2)
        before = chain.balance("node-1")
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0}
        assert buy_chat(chain, a.api_port, body) == 200
        st, epoch = entry_receipts(a.home, 2, timeout=30)
        pay = split_pro_rata(10_000, st.work_units(epoch))
        assert pay[b.node_id] > 0

        # nobody runs `mesh402 payout`: the epoch ends, the grace passes, the entry pays it
        try:
            waited = wait_until(lambda: chain.balance("node-1") > before, timeout=EPOCH_S + 90, step=0.5,
                                what="the worker paid for the epoch")
        except AssertionError as e:
            raise AssertionError(f"{e}; entry log:\n{a.proc.log()[-4000:]}") from None
        assert chain.balance("node-1") - before == pay[b.node_id]
        assert time.time() >= (epoch + 1) * EPOCH_S  # not before the epoch ended
        assert st.unpaid_epochs() == []
        wait_until(lambda: f"epoch {epoch} paid:" in a.proc.log(), timeout=10, what="the payout logged")
        validated = st.validations(epoch)[b.node_id]
        assert json.loads(validated["verdict"] or "{}").get("score") == 100, validated  # checked, passed, paid
        status = subprocess.run([*MESH402, "status", "--home", str(a.home)], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        text = " ".join(status.stdout.split())
        assert f"earnings epoch {epoch}:" in text and f"{b.node_id[:12]} {pay[b.node_id] / 1e6:.6f}" in text, text
        print(f"\npaid {waited:.1f} s after the request's receipts; " + a.proc.log().split(f"epoch {epoch} paid:")[1].split("\n")[0])
    finally:
        nodes.stop_all()
        fac.stop()
        chain.proc.stop()
