"""A validator's votes on quorum checks (serving.quorum_votes.QuorumVoter through economics.quorum_checks) on a
real local chain: it commits only once seated, its sealed vote is on disk before the commitment is sent, and a
validator restarted between commit and reveal (no evidence left, a fresh process) still reveals its vote."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh402.economics.quorum import Outcome
from mesh402.economics.quorum_checks import QuorumChecks
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.serving.quorum_votes import Pending, QuorumVoter
from mesh402.serving.stage_link import K
from mesh402.work.evidence import statement
from tests.support.work_contracts import QuorumEnv, work_env


class FixedVoter(QuorumVoter):
    """A validator whose re-execution is replaced by a fixed answer (the chain side is what is tested)."""
    fail = False

    def decide(self, checks: list) -> bool:
        return self.fail


class StageChecks(QuorumChecks):
    """QuorumChecks whose node -> agent lookup knows the test's stage (it has no node binding on chain)."""
    stages: dict[str, int] = {}

    def agent_of_node(self, node_id_hex: str) -> int | None:
        return self.stages.get(node_id_hex)


def _voter(q: QuorumEnv, agent: int, votes: Path, fail: bool) -> FixedVoter:
    env = q.env
    chain = StageChecks(env.chain.dep.rpc_url, q.validators[agent].key, env.quorum.address, env.chain.dep.contracts)
    v = FixedVoter(f"node-{agent}", chain, None, lambda *a: None, "", votes)
    v.agent, v.fail = agent, fail
    return v


@pytest.fixture(scope="module")
def qenv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuorumEnv]:
    with work_env(tmp_path_factory.mktemp("quorum-votes")) as env:
        q = QuorumEnv(env)
        for _ in range(3):
            q.add_validator("cpu")
        yield q


def test_validator_commits_when_seated_and_reveals_after_a_restart(qenv: QuorumEnv, tmp_path: Path) -> None:
    q, env = qenv, qenv.env
    ids = list(q.validators)
    stage = q.stage()
    cid_b = q.open(stage)
    cid = "0x" + cid_b.hex()
    fails = dict(zip(ids, (True, True, False)))
    voters = {a: _voter(q, a, tmp_path / f"votes-{a}", fails[a]) for a in ids}
    for v in voters.values():
        v.pending[cid] = Pending(cid, "stage-node", [])

    asyncio.run(voters[ids[0]].step(cid))  # not drawn yet: the seed block does not exist
    assert env.quorum.vote(cid_b, 0, ids[0])[0] == 0
    env.mine(3)
    asyncio.run(voters[ids[0]].step(cid))  # seats the quorum (anyone may)...
    for a in ids:  # ...then each commits
        asyncio.run(voters[a].step(cid))
    assert set(env.quorum.round(cid_b, 0).members) == set(ids)
    assert all(env.quorum.vote(cid_b, 0, a)[0] == 1 for a in ids)

    # the sealed vote was on disk before its commitment went out: a validator that crashes mid-send
    # commits the same vote after its restart (it does not re-decide, nor lose the salt)
    assert all((tmp_path / f"votes-{a}" / f"{cid}-0.json").exists() for a in ids)

    # restart: fresh voters, no evidence held; each finds its sealed vote on disk and reveals it
    fresh = {a: _voter(q, a, tmp_path / f"votes-{a}", not fails[a]) for a in ids}
    assert all(f.watched() == [cid] for f in fresh.values())
    for a in ids:
        asyncio.run(fresh[a].step(cid))
    assert {a: env.quorum.vote(cid_b, 0, a) for a in ids} == {a: (2, fails[a]) for a in ids}
    env.quorum.finalize(q.reporter.key, cid_b)
    assert env.quorum.round(cid_b, 0).outcome == Outcome.FAILED
    env.advance(env.quorum.params().appeal_window + 1)
    env.quorum.execute(q.reporter.key, cid_b)
    for a in ids:  # executed: the vote files go
        asyncio.run(fresh[a].step(cid))
        assert fresh[a].watched() == []


def test_validator_restarted_before_committing_judges_from_the_evidence_on_disk(qenv: QuorumEnv, tmp_path: Path) -> None:
    q, env = qenv, qenv.env
    stage = q.stage()
    StageChecks.stages["stage-node"] = stage.agent_id
    text, h = statement(7, "entry", "stage-node", "quorum:x", [])
    cid_b = q.open(stage, bytes.fromhex(h[2:]))
    cid = "0x" + cid_b.hex()
    a = next(iter(q.validators))
    v = _voter(q, a, tmp_path / "votes", True)
    sf = pb.StageFrame(kind=K.STAGE_KIND_VERIFY, request_id="r",
                       params={"check_id": cid, "statement": text, "checks": json.dumps([])})
    got = asyncio.run(v.on_evidence("entry", sf))
    assert got.stage.kind == K.STAGE_KIND_RESULT, got
    # another node's statement against this stage's check: refused
    other, _ = statement(7, "entry", "other-node", "quorum:x", [])
    bad = pb.StageFrame(kind=K.STAGE_KIND_VERIFY, request_id="r",
                        params={"check_id": cid, "statement": other, "checks": json.dumps([])})
    assert asyncio.run(v.on_evidence("entry", bad)).stage.kind == K.STAGE_KIND_ERROR

    fresh = _voter(q, a, tmp_path / "votes", True)  # restarted before the quorum was even seated
    assert fresh.pending == {} and fresh.watched() == [cid]
    env.mine(3)
    asyncio.run(fresh.step(cid))  # seats the quorum
    asyncio.run(fresh.step(cid))  # judges from the evidence on disk and commits
    assert a in env.quorum.round(cid_b, 0).members and env.quorum.vote(cid_b, 0, a)[0] == 1
    assert (tmp_path / "votes" / f"{cid}-0.json").exists()


def test_evidence_for_a_check_not_on_chain_is_refused(qenv: QuorumEnv, tmp_path: Path) -> None:
    q = qenv
    a = next(iter(q.validators))
    v = _voter(q, a, tmp_path / "votes", False)
    text, _ = statement(1, "entry", "node", "quorum:x", [])
    sf = pb.StageFrame(kind=K.STAGE_KIND_VERIFY, request_id="r",
                       params={"check_id": "0x" + "11" * 32, "statement": text, "checks": json.dumps([])})
    got = asyncio.run(v.on_evidence("entry", sf))
    assert got.stage.kind == K.STAGE_KIND_ERROR and "no quorum check" in got.stage.error
    assert v.pending == {}
    sf.params["check_id"] = "nonsense"
    got = asyncio.run(v.on_evidence("entry", sf))
    assert got.stage.kind == K.STAGE_KIND_ERROR and "bad check id" in got.stage.error

