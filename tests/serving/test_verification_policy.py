"""Commit–reveal policy without a model: fingerprint ids, the audit policy and the entry's reveal checks
over synthetic stage tallies (economics.verification is pure: hashes and JSON)."""

from __future__ import annotations

import json
import os

from mesh402.commitment import activation_hash
from mesh402.work.receipts import StageTally, chain_errors
from mesh402.work.evidence import (FP_SIZE, UNVERIFIABLE, Auditor, fingerprint_ids, last_step_hash,
                                            reveal, spot_checks)
from mesh402.mesh.identity import NodeIdentity


def test_fingerprint_ids_are_distinct_deterministic_and_per_request() -> None:
    a = fingerprint_ids("req-1", 49152)
    assert len(a) == len(set(a)) == FP_SIZE and all(0 <= i < 49152 for i in a)
    assert a == fingerprint_ids("req-1", 49152) and a != fingerprint_ids("req-2", 49152)
    assert fingerprint_ids("r", 100) == list(range(100))  # a small vocabulary: all of it


def test_last_step_hash_binds_token_and_fingerprint() -> None:
    fp = bytes(range(16))
    assert last_step_hash(5, fp) != last_step_hash(6, fp) != last_step_hash(5, fp[::-1])
    assert last_step_hash(None, fp) == last_step_hash(-1, fp)


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_auditor_checks_each_node_first_then_at_the_stated_rate() -> None:
    clock = Clock()
    aud = Auditor(0.3, 3600, clock=clock)
    assert aud.pick(["b", "c"], 10) is not None  # first request of b and c this epoch: always
    assert aud.pick(["b", "d"], 10) is not None  # d is new
    n = 4000
    hits = [aud.pick(["b", "c"], 7) for _ in range(n)]
    rate = sum(h is not None for h in hits) / n
    print(f"\nmeasured audit rate {rate:.3f} (stated 0.3)")
    assert abs(rate - 0.3) < 0.04
    assert {h for h in hits if h is not None} == set(range(7))  # any step may be drawn
    clock.t += 3600  # next epoch: every node is audited once again
    assert aud.pick(["b"], 3) is not None
    never = Auditor(0.0, 3600, clock=clock)
    assert never.pick(["x"], 5) is not None and all(never.pick(["x"], 5) is None for _ in range(200))
    assert aud.pick([], 5) is None and aud.pick(["z"], 0) is None


def _run(n_steps: int, stages: int = 3, *, tamper_reveal: str = "") -> tuple[list, list[dict]]:
    """Synthetic request: stage 0 is the entry; remote stages pass random payloads on, the last draws tokens."""
    ids = [NodeIdentity.generate() for _ in range(stages)]
    bounds = [0, 10, 20, 30][: stages + 1]
    tallies = [StageTally("rid", "mh", bounds[i], bounds[i + 1], keep=i > 0) for i in range(stages)]
    fps: list[bytes] = []
    for step in range(n_steps):
        x = os.urandom(64)  # what stage 0 sends
        tallies[0].step(1, b"tokens%d" % step, activation_hash(x))
        for i in range(1, stages):
            rec = {"kind": 2, "pos": step, "n_real": 1, "dtype": "f32", "shape": [1, 16], "data": x}
            if i < stages - 1:
                y = os.urandom(64)
                tallies[i].step(1, activation_hash(x), activation_hash(y), rec)
                x = y
            else:
                fp = os.urandom(32)
                fps.append(fp)
                tallies[i].step(1, activation_hash(x), last_step_hash(step, fp), rec, fp, step)
    receipts, prev = [], ""
    for i, t in enumerate(tallies):
        r = t.receipt(ids[i], i, prev)
        receipts.append(r)
        prev = r.digest
    audited = n_steps // 2
    evidence = [reveal(tallies[i], audited, i, ids[i].node_id_hex, "exact", last=i == stages - 1)
                for i in range(1, stages)]
    evidence = json.loads(json.dumps(evidence))
    if tamper_reveal == "input":
        evidence[0]["inputs"][-1]["data"] = evidence[0]["inputs"][0]["data"] if audited else ""
    elif tamper_reveal == "hashes":
        evidence[1]["in_hashes"][0] = "00" * 16
    return receipts, evidence


def test_honest_reveal_yields_one_clean_check_per_remote_stage() -> None:
    receipts, evidence = _run(6)
    assert chain_errors(receipts, 30) == []
    checks = spot_checks(receipts, evidence)
    assert [(c.stage, c.fault, c.step, c.last) for c in checks] == [(1, "", 3, False), (2, "", 3, True)]
    # stage 1's expected output is stage 2's input at the audited step; the check digests are stable
    assert checks[0].expected == evidence[1]["inputs"][-1]["data"]
    assert len(checks[0].inputs) == 4 and checks[0].digest == spot_checks(receipts, evidence)[0].digest


def test_a_reveal_that_contradicts_the_receipt_is_the_stage_fault_only() -> None:
    receipts, evidence = _run(6, tamper_reveal="hashes")
    c1, c2 = spot_checks(receipts, evidence)
    assert c2.fault == "revealed step hashes do not match the signed receipt"
    assert c1.fault.startswith(UNVERIFIABLE)  # nothing pins stage 1's output now: not its fault
    receipts, evidence = _run(6, tamper_reveal="input")
    c1, c2 = spot_checks(receipts, evidence)
    assert c1.fault == "a revealed input is not what the stage received" and not c2.fault


def test_malformed_or_missing_reveals_are_faults_not_crashes() -> None:
    receipts, evidence = _run(4)
    for bad in ({}, {"stage": 1, "step": "x"}, {"stage": 1, "step": 0, "in_hashes": ["zz"], "out_hashes": [], "inputs": []}):
        checks = spot_checks(receipts, [bad, evidence[1]])
        assert checks[0].fault and not checks[1].fault
    assert spot_checks(receipts, [])[1].fault == "no reveal for the audited step"


def test_a_reveal_never_outgrows_a_frame() -> None:
    from mesh402.work.evidence import REVEAL_BUDGET
    aud = Auditor(1.0, 3600, clock=Clock())
    big = REVEAL_BUDGET // 4  # three such steps fit (with base64), not four
    picks = {aud.pick(["n"], 10, [big] * 10) for _ in range(300)}
    assert picks == {0, 1, 2}
    # two restored-prefix steps come first: they count against the budget, not as pickable steps
    assert {aud.pick(["n"], 8, [big] * 10) for _ in range(300)} == {0}
    assert aud.pick(["n"], 3, [REVEAL_BUDGET] * 3) is None


def test_a_stage_that_does_not_reveal_earns_nothing_for_that_request(tmp_path) -> None:
    from mesh402.work.store import EntryReceipts, epoch_of
    from mesh402.models.catalog import bundled_model_path
    import time
    entry = EntryReceipts(tmp_path, epoch_s=3600)
    entry.add_model("mh", bundled_model_path())
    receipts, evidence = _run(4)
    entry(receipts, evidence[:1])  # the last stage stays silent on CLOSE
    assert entry.kept == 1
    epoch = epoch_of(time.time(), 3600)
    units = entry.store.work_units(epoch)
    assert units[receipts[2].node_id] == 0 < units[receipts[1].node_id]
    assert [(c.stage, c.fault[:13]) for c in entry.store.spot_checks(epoch)] == [(1, "unverifiable:")]


def test_a_node_requests_validation_only_for_entries_it_worked_for() -> None:
    """A validation request costs the node gas: strangers, statements about other nodes and endless
    re-asks are refused before any chain call."""
    import asyncio

    from mesh402.settings import TrustConfig
    from mesh402.economics.validation_registry import statement
    from mesh402.mesh.proto import mesh_pb2 as pb
    from mesh402.serving.stage_link import K
    from mesh402.serving.verification import MAX_ASKS_PER_EPOCH, TrustServices

    def no_chain(*a):
        raise AssertionError("no chain call expected")

    t = TrustServices("me", TrustConfig(rpc_url="http://127.0.0.1:1", owner_key="0x" + "11" * 32), None,
                      no_chain, no_chain, lambda: {})
    t._chain = no_chain  # type: ignore[method-assign]

    def ask(peer: str, node: str = "me", epoch: int = 5) -> pb.StageFrame:
        text, _ = statement(epoch, peer, node, "0x" + "22" * 20, [])
        sf = pb.StageFrame(kind=K.STAGE_KIND_VALIDATION_ASK, params={"statement": text})
        return asyncio.run(t.on_validation_ask(peer, sf)).stage

    assert ask("entry").params["code"] == "no_work"
    assert ask("entry", node="someone-else").params["code"] == "bad_statement"
    t.worked_for.add("entry")
    t._asks[("entry", 5)] = MAX_ASKS_PER_EPOCH
    assert ask("entry").params["code"] == "too_many"


def test_only_validators_the_operator_named_are_asked() -> None:
    """Announcing the validator label selects nobody: a validator decides who is paid, so an entry asks only
    the ones its operator named (--validator-id); a malformed address is never used either."""
    from mesh402.serving.verification import TrustServices

    named, self_declared, bad = "aa" * 32, "bb" * 32, "cc" * 32
    labels = {self_declared: {"validator": "0x" + "11" * 20}, named: {"validator": "0x" + "22" * 20},
              bad: {"validator": "not-an-address"}}
    t = TrustServices("me", None, None, None, None, lambda: labels,  # type: ignore[arg-type]
                      trusted_validators=[named, bad])
    assert t.validator_for("stage") == (named, "0x" + "22" * 20)
    assert t.validator_for(named) is None  # never the node under judgement
    assert TrustServices("me", None, None, None, None, lambda: labels).validator_for("stage") is None  # type: ignore[arg-type]
