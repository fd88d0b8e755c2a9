"""A node's side of SpotCheckQuorum (economics.quorum): what `serve --quorum` needs, as blocking calls from the
node's agent owner key. The entry opens a check on a stage's statement and pushes it along (draw, finalize,
execute); a validator commits and reveals its votes. `quorum_status` reads a check's outcome the way the payout
reads an ERC-8004 validation. Pure chain-side: the node runs these calls in a thread."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mesh402.economics.chain import web3_for
from mesh402.economics.contractcall import ChainCallError, as_bytes32
from mesh402.economics.evm import account_of
from mesh402.economics.quorum import Outcome, Quorum
from mesh402.economics.staking import Staking
from mesh402.economics.validation_registry import ValidationStatus, agent_of_node
from mesh402.work.evidence import PASS_SCORE

QUORUM_PREFIX = "quorum:"  # a validations row's `validator` for a quorum check: "quorum:<contract address>"


@dataclass(frozen=True)
class CheckView:
    """One check as a node sees it: what it waits for (Quorum.phase), its current round and, for `agent`,
    whether it sits on that round and how far its vote got (0 none, 1 committed, 2 revealed)."""
    check_id: str
    stage_agent_id: int
    receipt_hash: str
    phase: str
    round: int
    members: tuple[int, ...]
    outcome: str  # the current round's tally ("NONE" until finalized)
    final: str  # the executed outcome ("NONE" until executed)
    executed: bool
    vote: int = 0

    @property
    def passed(self) -> bool:
        return self.executed and self.final == Outcome.PASSED.name

    @property
    def failed(self) -> bool:
        return self.executed and self.final == Outcome.FAILED.name

    def to_json(self) -> dict[str, Any]:
        return {"check_id": self.check_id, "phase": self.phase, "round": self.round, "members": list(self.members),
                "outcome": self.outcome.lower(), "final": self.final.lower(), "executed": self.executed}


class QuorumChecks:
    """SpotCheckQuorum for one node's owner key (serving.quorum_votes.QuorumChain). Sends are serialized: the
    entry and the validator of one node share the key, and its nonces."""

    def __init__(self, rpc_url: str, owner_key: str, quorum: str, registries: Mapping[str, str]) -> None:
        self.w3 = web3_for(rpc_url)
        self.key = owner_key
        self.q = Quorum(self.w3, quorum)
        self.address: str = account_of(owner_key).address
        self.contract: str = self.q.address
        self.identity = registries.get("IdentityRegistry", "")
        self._send = threading.Lock()
        self._staking: Staking | None = None

    @property
    def label(self) -> str:
        """What a validations row records as the validator of a quorum check."""
        return QUORUM_PREFIX + self.contract

    def agent_of_node(self, node_id_hex: str) -> int | None:
        if not self.identity:
            raise RuntimeError("no IdentityRegistry address configured (pass --deployment or --network)")
        return agent_of_node(self.w3, self.identity, node_id_hex)

    # ---- views ----------------------------------------------------------------------------------

    def view(self, check_id: str, agent: int | None = None) -> CheckView | None:
        """The check, or None when nobody opened it."""
        cid = as_bytes32(check_id)
        try:
            c = self.q.check(cid)
        except Exception:  # UnknownCheck
            return None
        r = self.q.round(cid, c.round)
        vote = self.q.vote(cid, c.round, agent)[0] if agent is not None and agent in r.members else 0
        return CheckView("0x" + cid.hex(), c.stage_agent_id, "0x" + bytes(c.receipt_hash).hex(), self.q.phase(cid),
                         c.round, r.members, r.outcome.name, c.final_outcome.name, c.executed, vote)

    def stake(self, agent: int) -> dict[str, int]:
        """An agent's stake (atomic units): active, unbonding, open checks."""
        if self._staking is None:
            self._staking = Staking(self.w3, self.q.fn.staking().call())
        i = self._staking.info(agent)
        return {"active": i.active, "unbonding": i.unbonding, "open_checks": i.open_checks}

    def slashes(self, agent: int) -> dict[str, int]:
        """What quorum checks took from an agent (atomic units): as a failed stage, and as a wrong or silent
        validator."""
        stage = sum(int(e["stageSlashed"]) for e in self.q.logs("CheckExecuted", stageAgentId=int(agent)))
        validator = sum(int(e["amount"]) for e in self.q.logs("ValidatorPenalized", agentId=int(agent)))
        return {"as_stage": stage, "as_validator": validator}

    # ---- transactions ---------------------------------------------------------------------------

    def open(self, stage_agent_id: int, receipt_hash: str, *, exact: bool, device: str) -> str:
        """Open a check of the stage's statement (or find the one already open); its id."""
        from mesh402.economics.quorum import check_id_of
        cid = "0x" + check_id_of(stage_agent_id, as_bytes32(receipt_hash)).hex()
        if self.view(cid) is None:
            with self._send:
                self.q.open_check(self.key, stage_agent_id, as_bytes32(receipt_hash), exact=exact,
                                  device=device or b"\0" * 32)
        return cid

    def advance(self, check_id: str) -> str:
        """Push a check along as anyone may (draw, finalize, execute); the step taken, or "" when it waits for
        votes, blocks or time. A race lost to another caller is no error."""
        cid = as_bytes32(check_id)
        phase = self.q.phase(cid)
        step = {"draw": self.q.draw, "finalize": self.q.finalize, "execute": self.q.execute}.get(phase)
        if step is None:
            return ""
        try:
            with self._send:
                step(self.key, cid)
        except ChainCallError as e:
            if e.error in ("AlreadyDrawn", "AlreadyFinalized", "AlreadyExecuted"):
                return ""
            raise
        return phase

    def seal(self, check_id: str, agent: int, fail: bool) -> tuple[int, str, str]:
        """A vote for the check's current round with a fresh salt: (round, salt hex, commitment hex). Persist
        it before `commit`: without the salt the vote cannot be revealed."""
        s = self.q.seal_vote(as_bytes32(check_id), agent, fail)
        return s.round, "0x" + s.salt.hex(), "0x" + s.commitment.hex()

    def commit(self, check_id: str, agent: int, commitment: str) -> None:
        with self._send:
            self.q.commit(self.key, as_bytes32(check_id), agent, as_bytes32(commitment))

    def reveal(self, check_id: str, agent: int, fail: bool, salt: str) -> None:
        with self._send:
            self.q.reveal(self.key, as_bytes32(check_id), agent, fail, as_bytes32(salt))


def quorum_running(w3: Any, validator: str, check_id: str) -> bool:
    """True while a quorum check exists and is not executed yet: its outcome is still to come."""
    if not check_id:
        return False
    try:
        return not Quorum(w3, validator[len(QUORUM_PREFIX):]).check(as_bytes32(check_id)).executed
    except Exception:  # no such check
        return False


def quorum_status(w3: Any, validator: str, check_id: str, agent_id: int | None) -> ValidationStatus:
    """A quorum check's outcome as a ValidationStatus (`validator`: the row's "quorum:<address>"): answered once
    executed, PASS_SCORE when the quorum passed the stage, 0 when it failed it. An inconclusive check (no
    quorum could be seated, or no majority) stays unanswered: the stage is neither paid nor slashed. A node
    with no spot checks in the epoch has no check (`check_id` ""): nothing to judge, passed."""
    if not check_id:
        return ValidationStatus("", True, True, validator, int(agent_id or 0), PASS_SCORE)
    q = Quorum(w3, validator[len(QUORUM_PREFIX):])
    try:
        c = q.check(as_bytes32(check_id))
    except Exception:
        return ValidationStatus(check_id, exists=False)
    decided = c.executed and c.final_outcome in (Outcome.PASSED, Outcome.FAILED)
    return ValidationStatus(check_id, True, decided, validator, int(c.stage_agent_id),
                            PASS_SCORE if c.final_outcome == Outcome.PASSED else 0)
