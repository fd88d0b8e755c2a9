"""Issue 14, tests (d) and (e): spot checks decided by the staked validator quorum, on real node processes and a
real local chain whose blocks and clock the test advances (nothing waits out a commit or an appeal window).

Four registered nodes, all started with `--quorum --validator`, staked and registered as validators (D with
`mesh402 stake add` and `mesh402 validator register`, the others through the same wrappers): the entry A (stage 0), an honest stage B, a stage C that
perturbs its activations by 1% (the test-only entry point tests.support.tamper_node; its own re-execution as
a validator is honest), and D, a validator too small for a stage that votes "fail" on every check (the
test-only entry point tests.support.dishonest_validator_node). One paid request is split over A, B and C and
audited; the entry's validation round opens a quorum check on B's and on C's statement. The contract seats
3 of the 3 eligible validators of each (never the stage itself): C's check is decided by A, B and D, B's by
A, C and D. After the appeal window the checks execute:
(d) C's check fails (every seated validator re-executed the perturbed step), C loses half its stake, the
    entry (the reporter) gets half of that, and `mesh402 payout` pays C nothing; B keeps its stake;
(e) B's check passes 2 to 1: B is not slashed, D (the minority) loses 10% of its stake.
(g) the entry A's own stage 0 perturbs its activations too (the test-only `MESH402_TAMPER_HOST`): the first
    remote stage (B or C) audits it from what it received and A's signed stage-0 receipt and terms, opens a
    quorum check on A's agent as the reporter, and the quorum (B, C and D; never A) fails it: A loses half its
    stake.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.dev_chain import DevChain, entry_receipts
from harness.mesh_nodes import MeshNode, MeshNodes, wait_until
from harness.procs import MESH402, NodeProcess
from harness.reference import ready_plan
from harness.x402_payments import buy_chat
from tests.support.chain import paid_chain

MODEL = "smollm2-135m-instruct"
USDC = 10**6
STAKE = 20 * USDC  # every node: above the validators' minimum (10)
ACCOUNTS = {"a": "node-0", "b": "node-1", "c": "node-2", "d": "node-3"}


@dataclass
class QuorumMesh:
    chain: DevChain
    nodes: dict[str, MeshNode]
    agents: dict[str, int]
    epoch: int
    store: Any
    rounds: dict[str, dict[str, Any]]  # node id -> the entry's last round result
    stake_before: dict[str, int]
    entry_before: int  # the entry's wallet before the checks executed (it is the reporter)
    first_stage: dict[str, Any] | None = None  # the reporter's result for its check of A's stage 0 (test g)
    reporter: str = ""  # "b" or "c": the first remote stage

    def quorum(self) -> Any:
        from mesh402.economics.quorum import Quorum
        return Quorum(self.chain.w3(), self.chain.dep.contracts["SpotCheckQuorum"])

    def stake(self, name: str) -> int:
        from mesh402.economics.staking import Staking
        return Staking(self.chain.w3(), self.chain.dep.contracts["MeshStaking"]).info(self.agents[name]).slashable


def _cli(*args: str) -> str:
    r = subprocess.run([*MESH402, *args], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, " ".join(args) + "\n" + r.stdout + r.stderr
    return r.stdout


def _enrol(node: MeshNode, chain: DevChain, account: str, *, by_cli: bool) -> int:
    """What an operator does once: register the node's agent, stake for it, register it as a validator. The
    last two as a user types them when `by_cli`, else through the same wrappers in-process (each CLI start
    loads web3 and torch: four of each would dominate the test's time on a loaded machine)."""
    dep = ["--home", str(node.home), "--deployment", str(chain.dir), "--account", account]
    assert "binding verified" in _cli("register", *dep)
    agent = int(json.loads((node.home / "erc8004.json").read_text())["agentId"])
    if by_cli:
        assert "stakes" in _cli("stake", "add", str(STAKE / USDC), *dep)
        assert "is a validator" in _cli("validator", "register", *dep)
        return agent
    from mesh402.economics.quorum import Quorum
    from mesh402.economics.staking import Staking
    from mesh402.engine.replay import device_signature
    w3, key = chain.w3(), chain.key(account)
    Staking(w3, chain.dep.contracts["MeshStaking"]).stake(key, agent, STAKE)
    Quorum(w3, chain.dep.contracts["SpotCheckQuorum"]).register_validator(key, agent, device_signature("cpu"))
    return agent


def _drive(a: MeshNode, chain: DevChain, epoch: int, appeal_window: int, timeout: float = 120.0
           ) -> dict[str, dict[str, Any]]:
    """Run the entry's validation round until every check is executed, mining a block per round and moving
    the clock past the appeal window once both checks wait in it."""
    w3 = chain.w3()
    t0 = time.monotonic()
    while True:
        r = httpx.post(f"{a.console}/api/epochs/{epoch}/validate", headers=a.console_headers, timeout=300)
        assert r.status_code == 200, r.text
        nodes = r.json()["nodes"]
        if nodes and all("score" in v for v in nodes.values()):
            return nodes
        phases = {v.get("quorum", {}).get("phase") for v in nodes.values() if "score" not in v}
        assert time.monotonic() - t0 < timeout, f"quorum checks not executed after {timeout}s: {nodes}"
        if phases == {"appeal-window"}:
            w3.provider.make_request("evm_increaseTime", [appeal_window + 1])
        w3.provider.make_request("anvil_mine", ["0x1"])
        time.sleep(0.3)


def _drive_first_stage(b: MeshNode, chain: DevChain, appeal_window: int, timeout: float = 120.0) -> dict[str, Any]:
    """The first remote stage `b` drives its check of A's stage 0 by itself (every 2 s); the test mines blocks and
    moves the clock past the appeal window once the check waits in it. Its last result for the check."""
    w3 = chain.w3()
    t0 = time.monotonic()
    while True:
        audits = (b.status()["node"]["distributed"].get("first_stage_audits") or {}).get("checks") or {}
        res = next(iter(audits.values()), {})
        if "score" in res:
            return res
        assert time.monotonic() - t0 < timeout, f"the check of the entry's stage 0 not executed: {audits}"
        if (res.get("quorum") or {}).get("phase") == "appeal-window":
            w3.provider.make_request("evm_increaseTime", [appeal_window + 1])
        w3.provider.make_request("anvil_mine", ["0x1"])
        time.sleep(0.5)


@pytest.fixture(scope="module")
def quorum_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuorumMesh]:
    tmp: Path = tmp_path_factory.mktemp("quorum")
    chain, fac, paid = paid_chain(tmp, nodes=4)
    nodes = MeshNodes(tmp / "nodes")
    procs: list[NodeProcess] = [fac, chain.proc]

    def owner(acct: str) -> list[str]:
        return ["--owner-key-file", str(chain.dep.key_file(acct)), "--deployment", str(chain.dir)]

    quorum = ["--quorum", "--validator", "--mode", "exact"]
    t0 = time.monotonic()

    def lap(what: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {what}", flush=True)
    try:
        for acct in ACCOUNTS.values():  # stake and report bonds
            chain.transfer("buyer-0", acct, 30 * USDC)
        a = nodes.start("a", no_model=False, extra=[*quorum, "--max-vram", "0.06", *paid, "--owner-key-file",
                                                    str(chain.dep.key_file("node-0"))],
                        env={"MESH402_TAMPER_HOST": "perturb"}, launcher=[sys.executable, "-m", "tests.support.tamper_node"])
        tok = a.token()
        b = nodes.start("b", join=tok, no_model=False, wait=False, extra=[*quorum, "--max-vram", "0.05", *owner("node-1")])
        c = nodes.start("c", join=tok, no_model=False, wait=False, extra=[*quorum, "--max-vram", "0.05", *owner("node-2")],
                        env={"MESH402_TAMPER": "perturb"}, launcher=[sys.executable, "-m", "tests.support.tamper_node"])
        d = nodes.start("d", join=tok, no_model=False, wait=False, extra=[*quorum, "--max-vram", "0.0001", *owner("node-3")],
                        launcher=[sys.executable, "-m", "tests.support.dishonest_validator_node"])
        named = {"a": a, "b": b, "c": c, "d": d}
        for n in (b, c, d):
            n.proc.wait_http(f"{n.console}/api/status", timeout=120)
        lap("four nodes up")
        with ThreadPoolExecutor(4) as pool:  # four operators at once: each sends from its own account
            agents = dict(zip(named, pool.map(lambda k: _enrol(named[k], chain, ACCOUNTS[k], by_cli=k == "d"), named)))
        lap("registered, staked, validators")
        wait_until(lambda: (p := ready_plan(a)) is not None and len(p["stages"]) == 3, timeout=240,
                   what="a ready 3-stage plan")
        lap("3-stage plan ready")
        plan = ready_plan(a)
        assert plan is not None and plan["host"] == a.node_id
        assert {s[0] for s in plan["stages"]} == {a.node_id, b.node_id, c.node_id}, plan

        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0}
        assert buy_chat(chain, a.api_port, body) == 200
        st, epoch = entry_receipts(a.home, 3)
        lap("paid request served and audited")
        assert {ch.node_id for ch in st.spot_checks(epoch)} == {b.node_id, c.node_id}

        # while the checks run, a payout would keep the stages' shares for good: it refuses and says why
        first = httpx.post(f"{a.console}/api/epochs/{epoch}/validate", headers=a.console_headers, timeout=300).json()
        assert len(first["nodes"]) == 2 and all("pending" in v for v in first["nodes"].values()), first
        early = subprocess.run([*MESH402, "payout", "--home", str(a.home), "--epoch", str(epoch), "--deployment",
                                str(chain.dir), "--account", "node-0", "--push"], capture_output=True, text=True, timeout=180)
        assert early.returncode != 0 and "quorum checks still running" in early.stdout + early.stderr, early.stdout
        m = QuorumMesh(chain, named, agents, epoch, st, {}, {}, chain.balance("node-0"))
        m.stake_before = {k: m.stake(k) for k in named}
        m.rounds = _drive(a, chain, epoch, m.quorum().params().appeal_window)
        lap("both quorum checks executed")
        # the first remote stage (B or C, as placement ordered them) audits the entry's stage 0
        reporter = min((st for st in plan["stages"] if st[0] != a.node_id), key=lambda st: st[1])[0]
        m.reporter = next(k for k, n in named.items() if n.node_id == reporter)
        m.first_stage = _drive_first_stage(named[m.reporter], chain, m.quorum().params().appeal_window)
        lap("the entry's stage-0 check executed")
        yield m
    finally:
        nodes.stop_all()
        for p in procs:
            p.stop()


def test_d_perturbing_stage_is_failed_by_the_quorum_slashed_and_not_paid(quorum_mesh: QuorumMesh) -> None:
    from mesh402.economics.quorum import Outcome
    from mesh402.work.units import split_pro_rata
    m = quorum_mesh
    a, b, c = m.nodes["a"], m.nodes["b"], m.nodes["c"]
    q = m.quorum()
    res = m.rounds[c.node_id]
    assert res["score"] == 0 and res["quorum"]["final"] == "failed", res
    cid = bytes.fromhex(res["request_hash"][2:])
    r0 = q.round(cid, 0)
    assert set(r0.members) == {m.agents["a"], m.agents["b"], m.agents["d"]}  # never the stage itself
    assert r0.fail_votes >= 2 and r0.outcome == Outcome.FAILED
    params = q.params()
    slashed = m.stake_before["c"] * params.stage_slash_bps // 10_000
    assert m.stake("c") == m.stake_before["c"] - slashed
    assert m.stake("b") == m.stake_before["b"]  # the honest stage keeps its stake (and so do A and D as this
    # check's validators, who voted with the majority: A's stake changes only by its own check, test g)
    # the reporter (the entry) got this check's bond back and its share of the slash (B's bond, a check that
    # passed, went to the validators who passed B: A among them)
    assert m.chain.balance("node-0") >= m.entry_before - params.report_bond + slashed * params.reporter_share_bps // 10_000

    # the payout treats the failed check as a failed spot check: C gets nothing, B its work units' share
    before = {acct: m.chain.balance(acct) for acct in ("node-1", "node-2")}
    out = _cli("payout", "--home", str(a.home), "--epoch", str(m.epoch), "--deployment", str(m.chain.dir),
               "--account", "node-0", "--push")
    pay = split_pro_rata(10_000, m.store.work_units(m.epoch))
    assert m.chain.balance("node-2") == before["node-2"], out
    assert m.chain.balance("node-1") - before["node-1"] == pay[b.node_id] > 0, out

    # status shows the stake and the slash, on the node that lost it
    def slashed_shown() -> bool:
        econ = (c.status().get("node") or {}).get("economics") or {}
        return (econ.get("slashes") or {}).get("as_stage") == slashed
    wait_until(slashed_shown, timeout=30, what="C's status showing its slash")
    text = " ".join(_cli("status", "--home", str(c.home)).split())
    assert f"stake: agent {m.agents['c']} active {m.stake('c') / USDC:.6f} USDC" in text
    assert f"slashed {slashed / USDC:.6f} USDC as a stage" in text


def test_e_dishonest_validator_cannot_slash_an_honest_stage_and_loses_stake(quorum_mesh: QuorumMesh) -> None:
    from mesh402.economics.quorum import Outcome
    m = quorum_mesh
    b = m.nodes["b"]
    q = m.quorum()
    res = m.rounds[b.node_id]
    assert res["score"] == 100 and res["quorum"]["final"] == "passed", res
    cid = bytes.fromhex(res["request_hash"][2:])
    r0 = q.round(cid, 0)
    assert set(r0.members) == {m.agents["a"], m.agents["c"], m.agents["d"]}
    assert (r0.pass_votes, r0.fail_votes, r0.outcome) == (2, 1, Outcome.PASSED)
    assert q.vote(cid, 0, m.agents["d"]) == (2, True)  # D revealed "fail"
    assert m.stake("b") == m.stake_before["b"]  # not slashed
    penalty = m.stake_before["d"] * q.params().validator_slash_bps // 10_000
    assert m.stake("d") == m.stake_before["d"] - penalty > 0
    assert m.stake("c") == m.stake_before["c"] - m.stake_before["c"] * q.params().stage_slash_bps // 10_000  # (d) only


def test_g_the_entrys_own_stage_0_is_audited_by_the_first_stage_and_slashed(quorum_mesh: QuorumMesh) -> None:
    from mesh402.economics.quorum import Outcome
    m = quorum_mesh
    reporter = m.nodes[m.reporter]
    q = m.quorum()
    res = m.first_stage
    assert res is not None and res["score"] == 0 and res["quorum"]["final"] == "failed", res
    cid = bytes.fromhex(res["request_hash"][2:])
    r0 = q.round(cid, 0)
    assert set(r0.members) == {m.agents["b"], m.agents["c"], m.agents["d"]}  # never the entry itself
    assert r0.fail_votes >= 2 and r0.outcome == Outcome.FAILED
    assert res["agent_id"] == m.agents["a"]
    params = q.params()
    slashed = m.stake_before["a"] * params.stage_slash_bps // 10_000
    assert m.stake("a") == m.stake_before["a"] - slashed  # the cheating entry lost half its stake
    assert m.stake("b") == m.stake_before["b"]  # B, honest stage and validator, keeps its stake
    audits = reporter.status()["node"]["distributed"]["first_stage_audits"]
    assert audits["driving"] == 0 and audits["unsigned"] == 0
