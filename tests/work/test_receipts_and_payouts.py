"""Receipts, work units and epoch payouts: signed per-stage receipts chained stage to stage; work units from
the GGUF tensor table; a crash mid-epoch loses no committed receipt; an epoch's revenue over a 2-node split
is paid by work units through EpochRewards on a real local chain."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mesh402.work.receipts import Receipt, chain_errors, sign_receipt
from mesh402.work.store import ReceiptStore
from mesh402.work.units import flops_per_token, opow_weights, split_pro_rata
from mesh402.mesh.identity import NodeIdentity
from harness.procs import REPO
from tests.support.receipts import MODEL, chain_for, h
from tests.support.chain import require_contract_toolchain


# ---- work units --------------------------------------------------------------------------------

def test_flops_per_token_from_the_tensor_table() -> None:
    from mesh402.models.gguf_meta import read_gguf_meta
    from tests.support.engine import smollm2_gguf
    m = read_gguf_meta(smollm2_gguf())
    hdim, ffn, kv = m.hidden, m.ffn, m.n_kv_heads * m.head_dim
    per_layer = 2 * (3 * hdim * ffn + 2 * hdim * hdim + 2 * kv * hdim)  # q,o + k,v + gate,up,down
    lm_head = 2 * m.vocab_size * hdim  # tied embeddings: the lm_head is token_embd
    n = m.n_layers
    assert flops_per_token(m, 0, n // 2) == (n // 2) * per_layer
    assert flops_per_token(m, n // 2, n) == (n - n // 2) * per_layer + lm_head
    assert flops_per_token(m, 0, n) == flops_per_token(m, 0, n // 2) + flops_per_token(m, n // 2, n)
    with pytest.raises(ValueError):
        flops_per_token(m, 3, 3)


def test_split_pro_rata_is_exact_and_deterministic() -> None:
    assert split_pro_rata(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert split_pro_rata(1000, {"a": 106, "b": 163, "z": 0}) == {"a": 394, "b": 606, "z": 0}
    assert split_pro_rata(0, {"a": 5}) == {"a": 0}
    s = split_pro_rata(999_999, {"x": 7, "y": 11, "w": 13})
    assert sum(s.values()) == 999_999 and max(abs(s[k] * 31 - 999_999 * v) for k, v in {"x": 7, "y": 11, "w": 13}.items()) < 31
    # optional OPOW influence: one challenge -> shares unchanged; imbalance penalised
    assert opow_weights({"a": {"m": 0.25}, "b": {"m": 0.75}}) == pytest.approx({"a": 0.25, "b": 0.75})
    w = opow_weights({"bal": {"m1": 0.5, "m2": 0.5}, "lop": {"m1": 0.5, "m2": 0.5 - 0.49}, "x": {"m2": 0.49}})
    assert w["bal"] > w["lop"]


# ---- receipts ----------------------------------------------------------------------------------

def test_receipt_chain_verifies_and_tampering_breaks_it() -> None:
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    rs = chain_for("req-1", [a, b], [0, 15, 30], 12)
    assert chain_errors(rs, 30) == []
    assert rs[0].node_id == a.node_id_hex and rs[1].prev == rs[0].digest
    more_tokens = replace(rs[1], tokens=99)  # inflate without re-signing
    assert any("bad signature" in e for e in chain_errors([rs[0], more_tokens]))
    # re-signed by the cheater with more tokens: no longer matches the chain's count
    cheat = sign_receipt(b, request_id="req-1", stage=1, model_hash=MODEL, layer_start=15, layer_end=30,
                         tokens=99, input_hash=rs[0].output_hash, output_hash=rs[1].output_hash, prev=rs[0].digest)
    assert any("token count" in e for e in chain_errors([rs[0], cheat]))
    wrong_input = sign_receipt(b, request_id="req-1", stage=1, model_hash=MODEL, layer_start=15, layer_end=30,
                               tokens=12, input_hash=h("other"), output_hash=rs[1].output_hash, prev=rs[0].digest)
    assert any("input hash" in e for e in chain_errors([rs[0], wrong_input]))
    gap = sign_receipt(b, request_id="req-1", stage=1, model_hash=MODEL, layer_start=16, layer_end=30, tokens=12,
                       input_hash=rs[0].output_hash, output_hash=rs[1].output_hash, prev=rs[0].digest)
    assert any("do not follow" in e for e in chain_errors([rs[0], gap]))
    assert any("ends at layer" in e for e in chain_errors(rs[:1], 30))
    forged = replace(rs[1], node_id=a.node_id_hex)  # claim another node did the work
    assert any("bad signature" in e for e in chain_errors([rs[0], forged]))


def test_store_refuses_broken_chains_and_keeps_requests_atomic(tmp_path: Path) -> None:
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    st = ReceiptStore(tmp_path / "r.sqlite")
    st.record(chain_for("r1", [a, b], [0, 15, 30], 5), revenue=100, epoch=1, n_layers=30)
    rs = chain_for("r2", [a, b], [0, 15, 30], 5)
    with pytest.raises(ValueError):
        st.record([rs[0], replace(rs[1], tokens=6)], revenue=100, epoch=1)
    with pytest.raises(Exception):  # the same request twice
        st.record(chain_for("r1", [a, b], [0, 15, 30], 5), revenue=100, epoch=1)
    assert st.count() == 2 and st.revenue(1) == 100 and st.receipts("r1")[1].node_id == b.node_id_hex


WRITER = textwrap.dedent("""
    import sys, hashlib
    sys.path.insert(0, sys.argv[3])
    from tests.support.receipts import chain_for
    from mesh402.work.store import ReceiptStore
    from mesh402.mesh.identity import NodeIdentity
    st = ReceiptStore(sys.argv[1])
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    i = 0
    while True:
        st.record(chain_for(f"req-{i}", [a, b], [0, 15, 30], 3 + i % 7), revenue=1000, epoch=int(sys.argv[2]))
        print(i, flush=True)
        i += 1
""")


def test_crash_mid_epoch_loses_no_receipt(tmp_path: Path) -> None:
    repo = str(REPO)
    db = tmp_path / "receipts.sqlite"
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(db), "4", repo], stdout=subprocess.PIPE, text=True)
    acked = -1
    t0 = time.monotonic()
    while acked < 40 and time.monotonic() - t0 < 60:
        line = p.stdout.readline()
        if not line:
            break
        acked = int(line)
    os.kill(p.pid, signal.SIGKILL)  # mid-epoch, possibly mid-transaction
    p.wait()
    assert acked >= 40, "writer did not get going"
    st = ReceiptStore(db)  # restart
    n = st.count(4) // 2
    assert n >= acked + 1  # every acknowledged request is there...
    for i in range(n):  # ...each with its whole, valid chain
        assert chain_errors(st.receipts(f"req-{i}"), 30) == []
    assert st.revenue(4) == 1000 * n


# ---- epoch payout on a local chain -------------------------------------------------------------

def test_epoch_distribution_over_a_two_node_split_matches_work_units(tmp_path: Path) -> None:
    from mesh402.economics.evm import revert_reason
    from mesh402.economics.rewards import claim, plan_epoch, publish_epoch
    from mesh402.work.units import FlopsTable
    from mesh402.models.gguf_meta import read_gguf_meta
    from harness.dev_chain import start_chain
    from tests.support.engine import smollm2_gguf
    require_contract_toolchain()
    meta = read_gguf_meta(smollm2_gguf())
    flops = FlopsTable()
    flops.add_model(MODEL, meta)
    s0, s1 = NodeIdentity.generate(), NodeIdentity.generate()
    st = ReceiptStore(tmp_path / "receipts.sqlite")
    tokens = [17, 40, 3, 120, 9]
    for i, t in enumerate(tokens):
        st.record(chain_for(f"q{i}", [s0, s1], [0, 15, 30], t), revenue=10_000, epoch=9, n_layers=30)
    st.record(chain_for("other-epoch", [s0, s1], [0, 15, 30], 500), revenue=10_000, epoch=10)
    chain = start_chain(tmp_path, buyers=1)
    try:
        w3 = chain.w3()
        accounts = {s0.node_id_hex: chain.dep.address("node-0"), s1.node_id_hex: chain.dep.address("node-1")}
        plan = plan_epoch(st, 9, flops.flops, accounts)
        f0, f1 = flops_per_token(meta, 0, 15), flops_per_token(meta, 15, 30)
        assert plan.units == {s0.node_id_hex: f0 * sum(tokens), s1.node_id_hex: f1 * sum(tokens)}
        assert plan.revenue == 50_000 and sum(plan.amounts.values()) == 50_000
        want0 = 50_000 * f0 // (f0 + f1)
        assert plan.amounts[s0.node_id_hex] in (want0, want0 + 1)
        # the entry node (buyer-0 here: it holds the revenue) funds and publishes the epoch
        entry = chain.key("buyer-0")
        publish_epoch(w3, entry, chain.dep.contracts["EpochRewards"], plan)
        b0, b1 = chain.balance("node-0"), chain.balance("node-1")
        r0 = claim(w3, chain.key("node-0"), chain.dep.contracts["EpochRewards"], plan.tree, accounts[s0.node_id_hex])
        claim(w3, chain.key("node-0"), chain.dep.contracts["EpochRewards"], plan.tree, accounts[s1.node_id_hex])
        assert chain.balance("node-0") - b0 == plan.amounts[s0.node_id_hex]
        assert chain.balance("node-1") - b1 == plan.amounts[s1.node_id_hex]
        with pytest.raises(Exception) as ei:
            claim(w3, chain.key("node-1"), chain.dep.contracts["EpochRewards"], plan.tree, accounts[s1.node_id_hex])
        from mesh402.economics.chain import contract_at
        assert revert_reason(ei.value, contract_at(w3, "EpochRewards", chain.dep.contracts["EpochRewards"]).abi) \
            == "AlreadyClaimed"
        st.save_payout(9, plan.revenue, {n: (plan.units[n], plan.amounts[n], accounts[n]) for n in plan.units},
                       root=plan.tree.root.hex(), tx=plan.tx)
        earn = st.earnings()
        assert {e["node_id"]: (e["epoch"], e["amount"], e["tx"]) for e in earn} == {
            n: (9, plan.amounts[n], plan.tx) for n in (s0.node_id_hex, s1.node_id_hex)}
        from mesh402.cli.status import earnings_status_lines
        assert earnings_status_lines(tmp_path)[0].startswith("earnings epoch 9: ")
        print(f"\nepoch payout gas: approve+publish {plan.gas}, claim {int(r0['gasUsed'])}")
    finally:
        chain.proc.stop()


def test_stage_tallies_chain_when_payloads_pass_unchanged() -> None:
    from mesh402.work.receipts import StageTally
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    steps = [(7, b"prompt-chunk"), (1, b"tok1"), (1, b"tok2")]  # (tokens, what stage 0 received)

    def run(tamper: bool) -> list[Receipt]:
        t0, t1 = StageTally("r", MODEL, 0, 15), StageTally("r", MODEL, 15, 30)
        for i, (n, x) in enumerate(steps):
            sent = hashlib.sha256(b"act" + x).digest()  # stage 0's output activations, hashed
            got = hashlib.sha256(b"act" + x + (b"!" if tamper and i == 1 else b"")).digest()
            t0.step(n, hashlib.sha256(x).digest(), sent)
            t1.step(n, got, hashlib.sha256(b"logits" + x).digest())
        r0 = t0.receipt(a, 0)
        return [r0, t1.receipt(b, 1, prev=r0.digest)]

    good = run(False)
    assert chain_errors(good, 30) == [] and good[0].tokens == 9
    assert any("input hash" in e for e in chain_errors(run(True), 30))


def _entry_with_paid_epoch_5(tmp_path: Path) -> tuple[Path, NodeIdentity, NodeIdentity, Any, Any]:
    """An entry home whose epoch 5 (of 3600 s) has 3 split requests over two nodes and 30,500 of revenue
    (3 settled payments and 500 of credit used), and a chain where both nodes' agents are registered.
    Returns (home, stage-0 node, stage-1 node, GGUF metadata, chain)."""
    import sqlite3

    from mesh402.economics.erc8004 import register_node
    from mesh402.economics.ledger import Ledger
    from mesh402.models.gguf_meta import read_gguf_meta
    from harness.dev_chain import start_chain
    from tests.support.engine import smollm2_gguf
    meta = read_gguf_meta(smollm2_gguf())
    home = tmp_path / "entry"
    home.mkdir()
    s0, s1 = NodeIdentity.generate(), NodeIdentity.generate()
    st = ReceiptStore(home / "receipts.sqlite")
    for i, t in enumerate([30, 5, 64]):
        st.record(chain_for(f"p{i}", [s0, s1], [0, 15, 30], t), revenue=0, epoch=5, n_layers=30,
                  flops=lambda h, a, b: flops_per_token(meta, a, b))
    st.close()
    Ledger(home / "payments.sqlite")  # the node's payment ledger: 3 paid requests and some credit used in epoch 5
    db = sqlite3.connect(home / "payments.sqlite")
    for i in range(3):
        db.execute("INSERT INTO payments (auth_id, payer, amount, kind, state, created, updated) VALUES "
                   "(?, 'b', 10000, 'request', 'settled', ?, ?)", (f"a{i}", 5 * 3600 + 10 + i, 5 * 3600 + 11 + i))
    db.execute("INSERT INTO payments (auth_id, payer, amount, kind, state, created) VALUES "
               "('late', 'b', 99999, 'request', 'settled', ?)", (6 * 3600 + 1,))  # next epoch: not counted
    db.execute("INSERT INTO credit_events (payer, delta, kind, ts) VALUES ('b', -500, 'usage', ?)", (5 * 3600 + 99,))
    db.commit()
    db.close()
    chain = start_chain(tmp_path, buyers=1)
    try:
        w3 = chain.w3()
        reg = chain.dep.contracts["IdentityRegistry"]
        register_node(w3, chain.key("node-0"), reg, "https://a/.well-known/agent-registration.json", s0)
        register_node(w3, chain.key("node-1"), reg, "https://b/.well-known/agent-registration.json", s1)
    except BaseException:
        chain.proc.stop()
        raise
    return home, s0, s1, meta, chain


def test_mesh402_payout_pays_an_epoch_to_registered_nodes_by_work_units(tmp_path: Path) -> None:
    from mesh402.cli.status import earnings_status_lines
    from harness.procs import MESH402
    home, s0, s1, meta, chain = _entry_with_paid_epoch_5(tmp_path)
    try:
        b0, b1 = chain.balance("node-0"), chain.balance("node-1")
        args = [*MESH402, "payout", "--home", str(home), "--epoch", "5", "--epoch-seconds", "3600",
                "--deployment", str(chain.dir), "--account", "buyer-0", "--push", "--no-require-validation"]
        r = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        pay = split_pro_rata(30_500, {s0.node_id_hex: flops_per_token(meta, 0, 15) * 99,
                                      s1.node_id_hex: flops_per_token(meta, 15, 30) * 99})
        assert chain.balance("node-0") - b0 == pay[s0.node_id_hex]
        assert chain.balance("node-1") - b1 == pay[s1.node_id_hex]
        again = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert again.returncode != 0  # the epoch is already paid
        assert "already published" in again.stdout + again.stderr
        assert earnings_status_lines(home)[0].startswith("earnings epoch 5: ")
        from mesh402.api.management.earnings import earnings
        e = earnings(home)
        assert e["epochs"] == [{"epoch": 5, "requests": 3, "receipts": 6, "units": 99 * flops_per_token(meta, 0, 30)}]
        assert {p["node_id"]: p["amount"] for p in e["payouts"]} == pay
        print("\n" + r.stdout)
    finally:
        chain.proc.stop()


def test_a_payout_cut_off_after_publishing_is_finished_not_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry publishes the root, pushes one claim and stops (here: the second claim raises). Paying the
    epoch again finishes that payout: the same root, the claim still missing, the epoch recorded; nobody
    is paid twice. A later change to the plan (more revenue) is refused instead of paid."""
    import sqlite3

    from mesh402.economics import rewards
    from mesh402.economics.payout import AlreadyPaid, PayoutChain, PayoutError, pay_epoch
    home, s0, s1, meta, chain = _entry_with_paid_epoch_5(tmp_path)
    try:
        pc = PayoutChain(chain.dep.rpc_url, chain.dep.contracts["EpochRewards"], dict(chain.dep.contracts))
        pay = split_pro_rata(30_500, {s0.node_id_hex: flops_per_token(meta, 0, 15) * 99,
                                      s1.node_id_hex: flops_per_token(meta, 15, 30) * 99})
        share = {chain.dep.address("node-0"): pay[s0.node_id_hex], chain.dep.address("node-1"): pay[s1.node_id_hex]}
        before = {a: chain.balance(a) for a in share}
        real_claim, sent = rewards.claim, []

        def claim_then_stop(w3, key, rewards_address, tree, account):
            if sent:
                raise RuntimeError("the node stopped")
            sent.append(account)
            return real_claim(w3, key, rewards_address, tree, account)

        monkeypatch.setattr(rewards, "claim", claim_then_stop)
        run = dict(key=chain.key("buyer-0"), epoch_s=3600, push=True, require_validation=False, log=lambda _: None)
        with pytest.raises(PayoutError, match="the node stopped"):
            pay_epoch(home, 5, pc, **run)
        assert ReceiptStore(home / "receipts.sqlite").unpaid_epochs() == [5]  # published, not recorded
        assert {a: chain.balance(a) - before[a] for a in share} == {a: share[a] if a in sent else 0 for a in share}
        monkeypatch.setattr(rewards, "claim", real_claim)

        warnings: list[str] = []
        result = pay_epoch(home, 5, pc, **run, warn=warnings.append)
        assert {a: chain.balance(a) - before[a] for a in share} == share  # each paid its share, once
        assert len(result.claim_txs) == 1 and result.plan.tx and result.plan.tx.startswith("0x")
        assert "was published before" in warnings[0], warnings
        st = ReceiptStore(home / "receipts.sqlite")
        assert st.unpaid_epochs() == [] and {e["node_id"]: e["tx"] for e in st.earnings()} == {
            s0.node_id_hex: result.plan.tx, s1.node_id_hex: result.plan.tx}
        with pytest.raises(AlreadyPaid, match="already published and recorded"):
            pay_epoch(home, 5, pc, **run)

        # unrecorded again, but the plan changed since (a late payment): the published root is kept
        st.close()
        db = sqlite3.connect(home / "receipts.sqlite")
        db.execute("DELETE FROM epochs WHERE epoch=5")
        db.commit()
        db.close()
        db = sqlite3.connect(home / "payments.sqlite")
        db.execute("INSERT INTO payments (auth_id, payer, amount, kind, state, created) VALUES "
                   "('later', 'b', 10000, 'request', 'settled', ?)", (5 * 3600 + 500,))
        db.commit()
        db.close()
        with pytest.raises(AlreadyPaid, match="another root"):
            pay_epoch(home, 5, pc, **run)
        assert {a: chain.balance(a) - before[a] for a in share} == share
        print(f"\nfinished after the cut-off: 1 claim sent on resume, publish tx {result.plan.tx[:18]}…")
    finally:
        chain.proc.stop()
