"""Spot-check validation on chain (docs/verification.md, section 4) on a real local chain: ERC-8004
validation requests (owner only) and responses (named validator only), feedback for a failed check, the
payout condition, and `mesh402 payout` paying only the stage nodes whose spot checks passed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.dev_chain import DevChain, start_chain
from tests.support.chain import require_contract_toolchain

VALIDATOR, ENTRY_WALLET = "buyer-0", "buyer-1"  # roles for the chain's funded accounts
EPOCH_S = 10**9  # one epoch spans the whole test run: epoch 1


class Env:
    def __init__(self, chain: DevChain, tmp: Path) -> None:
        self.chain, self.tmp = chain, tmp
        self.w3 = chain.w3()
        c = chain.dep.contracts
        self.identity, self.validation, self.reputation = c["IdentityRegistry"], c["ValidationRegistry"], c["ReputationRegistry"]

    def key(self, name: str) -> str:
        return self.chain.key(name)

    def addr(self, name: str) -> str:
        return self.chain.dep.address(name)

    def agent(self, owner: str, node: Any | None = None) -> tuple[int, Any]:
        """A fresh agent owned by `owner`, bound to `node` (a new node identity by default)."""
        from mesh402.economics.erc8004 import register_node
        from mesh402.mesh.identity import NodeIdentity
        node = node or NodeIdentity.generate()
        res = register_node(self.w3, self.key(owner), self.identity, "https://n.example/reg.json", node)
        return res.agent_id, node

    def reputation_fn(self) -> Any:
        from mesh402.economics.chain import contract_at
        return contract_at(self.w3, "ReputationRegistry", self.reputation).functions


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_contract_toolchain()
    tmp = tmp_path_factory.mktemp("validation")
    chain = start_chain(tmp, buyers=2)
    try:
        yield Env(chain, tmp)
    finally:
        chain.proc.stop()


# ---- pure ----------------------------------------------------------------------------------------

def test_statement_is_canonical_json_and_its_keccak() -> None:
    from eth_utils import keccak

    from mesh402.economics.validation_registry import statement
    text, h = statement(7, "e" * 64, "a" * 64, "0xV", ["c1", "c2"])
    assert text == ('{"checks":["c1","c2"],"entry":"' + "e" * 64 + '","epoch":7,"node":"' + "a" * 64
                    + '","v":1,"validator":"0xV"}')
    assert h == "0x" + keccak(text=text).hex() and len(h) == 66
    assert statement(7, "e" * 64, "a" * 64, "0xV", ["c1"])[1] != h


def test_payout_condition_cases() -> None:
    from mesh402.economics.validation_registry import PASS_SCORE, ValidationStatus, payout_condition, spot_check_failed

    def st(answered: bool, response: int = 0, validator: str = "0xV") -> ValidationStatus:
        return ValidationStatus("0x" + "11" * 32, True, answered, validator, 3, response)
    units = {"entry": 5, "ok": 3, "pending": 2, "failed": 2, "low": 1, "none": 1, "unknown": 1, "other": 1}
    statuses = {"ok": st(True, PASS_SCORE), "pending": st(False), "failed": st(True, 0), "low": st(True, 99),
                "none": None, "unknown": ValidationStatus("0x" + "22" * 32, False), "other": st(True, 100, "0xW")}
    allowed, withheld = payout_condition(units, "entry", statuses, validators={"other": "0xV"})
    assert allowed == {"entry", "ok"}  # the entry's own node needs no validation
    assert withheld == {"pending": "validation pending", "failed": "spot check failed (response 0)",
                        "low": "spot check failed (response 99)", "none": "no validation requested",
                        "unknown": "no validation requested",
                        "other": "validation requested from 0xW, not 0xV"}  # a node cannot pick its validator
    # a node absent from `statuses` is withheld too; without `validators` any validator counts
    assert payout_condition({"x": 1}, "entry", {}) == (set(), {"x": "no validation requested"})
    assert payout_condition({"o": 1}, "entry", {"o": statuses["other"]})[0] == {"o"}
    assert spot_check_failed(statuses["low"]) and not spot_check_failed(statuses["pending"])
    assert not spot_check_failed(statuses["ok"]) and not spot_check_failed(None)
    assert not spot_check_failed(st(True, 0, "0xW"), "0xV")  # another validator's verdict earns no feedback


# ---- on chain ------------------------------------------------------------------------------------

def test_request_by_owner_only_and_status_reads_back(env: Env) -> None:
    from mesh402.economics.erc8004 import registered_agents
    from mesh402.economics.validation_registry import (RegistryError, agent_of_node, request_validation, statement,
                                              validation_status)
    aid, node = env.agent("node-0")
    assert agent_of_node(env.w3, env.identity, node.node_id_hex) == aid
    agents = registered_agents(env.w3, env.identity)
    assert agent_of_node(env.w3, env.identity, node.node_id_hex, agents=agents) == aid
    assert agent_of_node(env.w3, env.identity, "ab" * 32, agents=agents) is None
    _, h = statement(1, "e" * 64, node.node_id_hex, env.addr(VALIDATOR), ["c"])
    assert validation_status(env.w3, env.validation, h).exists is False
    with pytest.raises(RegistryError, match=f"{env.addr('node-1')} is not the owner or an operator of agent {aid}"):
        request_validation(env.w3, env.key("node-1"), env.validation, env.addr(VALIDATOR), aid, "mesh402:x", h)
    request_validation(env.w3, env.key("node-0"), env.validation, env.addr(VALIDATOR), aid, "mesh402:x", h)
    s = validation_status(env.w3, env.validation, h)
    assert (s.exists, s.answered, s.validator, s.agent_id, s.request_hash) == (True, False, env.addr(VALIDATOR), aid, h)
    assert s.last_update > 0 and not s.passed
    with pytest.raises(RegistryError, match="already exists"):
        request_validation(env.w3, env.key("node-0"), env.validation, env.addr(VALIDATOR), aid, "mesh402:x", h)


def test_only_the_named_validator_responds(env: Env) -> None:
    from mesh402.economics.validation_registry import (PASS_SCORE, RegistryError, request_validation, respond_validation,
                                              statement, validation_status)
    aid, node = env.agent("node-0")
    (_, h1), (_, h2) = (statement(1, "e" * 64, node.node_id_hex, env.addr(VALIDATOR), [c]) for c in ("a", "b"))
    for h in (h1, h2):
        request_validation(env.w3, env.key("node-0"), env.validation, env.addr(VALIDATOR), aid, "", h)
    with pytest.raises(RegistryError, match=f"{env.addr('node-0')} is not the validator named in request {h1}"):
        respond_validation(env.w3, env.key("node-0"), env.validation, h1, PASS_SCORE)
    with pytest.raises(RegistryError, match="no validation request with hash 0x99"):
        respond_validation(env.w3, env.key(VALIDATOR), env.validation, "0x" + "99" * 32, PASS_SCORE)
    respond_validation(env.w3, env.key(VALIDATOR), env.validation, h1, PASS_SCORE, "ipfs://verdict", b"\x44" * 32)
    s = validation_status(env.w3, env.validation, h1)
    assert s.answered and s.passed and s.tag == "mesh402-spot-check" and s.response_hash == "0x" + "44" * 32
    # 0 with no tag and no hash looks like "unanswered" in getValidationStatus: the logs tell them apart
    respond_validation(env.w3, env.key(VALIDATOR), env.validation, h2, 0, tag="")
    s2 = validation_status(env.w3, env.validation, h2)
    assert s2.answered and s2.response == 0 and not s2.passed


def test_feedback_lands_in_reputation_and_self_feedback_is_refused(env: Env) -> None:
    from mesh402.economics.validation_registry import RegistryError, post_feedback
    aid, _ = env.agent("node-1")
    rf = env.reputation_fn()
    with pytest.raises(RegistryError, match=f"owns or operates agent {aid}"):
        post_feedback(env.w3, env.key("node-1"), env.reputation, aid, 0)
    post_feedback(env.w3, env.key(VALIDATOR), env.reputation, aid, 0, feedback_hash="0x" + "55" * 32)
    who = env.addr(VALIDATOR)
    assert rf.getLastIndex(aid, who).call() == 1
    assert rf.readFeedback(aid, who, 1).call() == [0, 0, "mesh402", "spot-check-failed", False]
    assert rf.getSummary(aid, [who], "mesh402", "spot-check-failed").call() == [1, 0, 0]


# ---- `mesh402 payout` gated on the spot checks ---------------------------------------------------

def _fill_entry(env: Env, home: Path, stage_nodes: list[Any], revenue: int) -> str:
    """An entry home with one two-stage request per stage node in epoch 1 (stage 0 on the entry's own node)
    and `revenue` settled in its payment ledger; the entry's node id."""
    import time

    from mesh402.economics.ledger import Ledger
    from mesh402.work.receipts import sign_receipt
    from mesh402.work.store import ReceiptStore
    from mesh402.mesh.identity import NodeIdentity
    entry = NodeIdentity.load_or_create(home)
    store = ReceiptStore(home / "receipts.sqlite")
    for i, node in enumerate(stage_nodes):
        common = dict(request_id=f"req-{i}", model_hash="m" * 64, tokens=5, issued_at=int(time.time()))
        r0 = sign_receipt(entry, stage=0, layer_start=0, layer_end=10, input_hash="00" * 32, output_hash="aa" * 32, **common)
        r1 = sign_receipt(node, stage=1, layer_start=10, layer_end=30, input_hash="aa" * 32, output_hash="bb" * 32,
                          prev=r0.digest, **common)
        store.record([r0, r1], revenue=0, epoch=1, flops=lambda _m, s, e: e - s)
    store.close()
    led = Ledger(home / "payments.sqlite")
    led.claim_payment("auth-1", payer=env.addr("buyer-0"), amount=revenue, network=env.chain.dep.network,
                      asset=env.chain.dep.asset.address, pay_to=env.addr(ENTRY_WALLET), kind="request",
                      request_id="req-0", payload_json="{}", requirements_json="{}")
    led.mark_settled("auth-1", "0x" + "00" * 32, "{}")
    led.close()
    return entry.node_id_hex


def _validate(env: Env, home: Path, entry: str, owner: str, node: Any, aid: int, response: int) -> str:
    """The validation round for one stage node, as the entry, the node's owner and the validator play it."""
    from mesh402.work.store import ReceiptStore
    from mesh402.economics.validation_registry import request_validation, respond_validation, statement
    text, h = statement(1, entry, node.node_id_hex, env.addr(VALIDATOR), ["check-" + node.node_id_hex[:8]])
    request_validation(env.w3, env.key(owner), env.validation, env.addr(VALIDATOR), aid, "mesh402:statement", h)
    respond_validation(env.w3, env.key(VALIDATOR), env.validation, h, response)
    store = ReceiptStore(home / "receipts.sqlite")
    store.save_validation(1, node.node_id_hex, h, env.addr(VALIDATOR), aid, text)
    store.close()
    return h


def _payout(env: Env, home: Path) -> Any:
    from typer.testing import CliRunner

    from mesh402.cli import app
    return CliRunner().invoke(app, ["payout", "--home", str(home), "--epoch", "1", "--epoch-seconds", str(EPOCH_S),
                                    "--deployment", str(env.chain.dir), "--account", ENTRY_WALLET, "--push"])


def test_payout_pays_only_passed_nodes_and_posts_feedback_once(env: Env) -> None:
    from mesh402.work.store import ReceiptStore
    from mesh402.work.units import split_pro_rata
    from mesh402.mesh.identity import NodeIdentity
    home = env.tmp / "entry"
    home.mkdir()
    good, bad, silent = NodeIdentity.generate(), NodeIdentity.generate(), NodeIdentity.generate()
    entry = _fill_entry(env, home, [good, bad, silent], revenue=30_000)
    good_aid, _ = env.agent("node-0", good)
    bad_aid, _ = env.agent("node-1", bad)
    _validate(env, home, entry, "node-0", good, good_aid, 100)
    _validate(env, home, entry, "node-1", bad, bad_aid, 0)
    rf = env.reputation_fn()
    b0, b1 = env.chain.balance("node-0"), env.chain.balance("node-1")
    r = _payout(env, home)
    assert r.exit_code == 0, r.output
    print("\n" + r.output)
    assert f"{silent.node_id_hex[:12]}" in r.output and "withheld (no validation requested)" in r.output
    assert "withheld (spot check failed (response 0))" in r.output
    assert f"feedback 0 posted to agent {bad_aid}" in r.output
    units = {entry: 10 * 5 * 3, good.node_id_hex: 20 * 5, bad.node_id_hex: 20 * 5, silent.node_id_hex: 20 * 5}
    pay = split_pro_rata(30_000, units)
    assert env.chain.balance("node-0") - b0 == pay[good.node_id_hex] > 0
    assert env.chain.balance("node-1") == b1  # the failed node is not paid: its share stays with the entry
    wallet = env.addr(ENTRY_WALLET)
    assert rf.getLastIndex(bad_aid, wallet).call() == 1 and rf.getLastIndex(good_aid, wallet).call() == 0
    assert rf.readFeedback(bad_aid, wallet, 1).call() == [0, 0, "mesh402", "spot-check-failed", False]
    store = ReceiptStore(home / "receipts.sqlite")
    try:
        paid = {e["node_id"]: e["account"] for e in store.earnings() if e["epoch"] == 1}
        assert paid == {entry: None, good.node_id_hex: env.addr("node-0"), bad.node_id_hex: None,
                        silent.node_id_hex: None}
        assert json.loads(store.validations(1)[bad.node_id_hex]["verdict"])["feedback_agent"] == bad_aid
    finally:
        store.close()
    # a rerun posts no second feedback and refuses to publish the epoch again
    again = _payout(env, home)
    assert again.exit_code != 0 and "already published" in again.output, again.output
    assert "feedback already posted" in again.output
    assert rf.getLastIndex(bad_aid, wallet).call() == 1
