"""Spot checks decided by a staked validator quorum (contracts/SpotCheckQuorum.sol).

The life of a check, and who sends what:
  reporter   open_check(stage agent, receipt hash, exact, device)   bond pulled, stage stake frozen
  anyone     draw(check)              once block `seedBlock` exists: seats `quorumSize` validators
  validator  seal_vote(...) -> SealedVote; persist it; commit(check, agent, sealed.commitment)
  validator  reveal(check, agent, fail, salt)   once all committed or the commit window closed
  anyone     finalize(check)          round 0 tallied: the appeal window opens
  anyone     appeal(check)            optional, with the appeal bond: a larger, fresh quorum (then draw...
                                      commit, reveal, finalize again; that executes at once)
  anyone     execute(check)           after the appeal window: slashes and pays out
`phase(check)` says which step a check waits for. `select_quorum` and `quorum_seed` mirror the contract, so a
node can check a seating for itself. Pure chain-side: no HTTP, no node code.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any

from mesh402.economics.contractcall import BoundContract, as_bytes32


class Outcome(IntEnum):
    NONE = 0
    PASSED = 1
    FAILED = 2
    INCONCLUSIVE = 3


@dataclass(frozen=True)
class QuorumParams:
    """Constructor parameters of SpotCheckQuorum; amounts in atomic token units, windows in seconds."""
    quorum_size: int = 3
    appeal_quorum_size: int = 5
    stage_slash_bps: int = 5000  # a failed stage loses half its stake...
    reporter_share_bps: int = 5000  # ...half of which goes to the reporter, the rest to the treasury
    validator_slash_bps: int = 1000  # a wrong or silent validator loses 10%
    seed_delay: int = 2  # blocks
    commit_window: int = 1800
    reveal_window: int = 1800
    appeal_window: int = 86400
    min_validator_stake: int = 10_000_000  # 10 USDC
    report_bond: int = 1_000_000
    appeal_bond: int = 5_000_000

    def as_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    @property
    def longest_check_s(self) -> int:
        """Both rounds and the appeal window: the stake's unbonding delay must be longer."""
        return 2 * (self.commit_window + self.reveal_window) + self.appeal_window


@dataclass(frozen=True)
class SealedVote:
    """A vote and its salt, to persist before committing: without the salt the vote cannot be revealed."""
    check_id: bytes
    round: int
    agent_id: int
    fail: bool
    salt: bytes

    @property
    def commitment(self) -> bytes:
        return vote_commitment(self.check_id, self.round, self.agent_id, self.fail, self.salt)


@dataclass(frozen=True)
class CheckState:
    stage_agent_id: int
    receipt_hash: bytes
    device: bytes
    reporter: str
    exact: bool
    round: int
    executed: bool
    final_outcome: Outcome
    finalized_at: int
    appellant: str
    bond: int
    appeal_bond: int


@dataclass(frozen=True)
class RoundState:
    anchor_block: int
    seed_block: int
    commit_deadline: int  # 0 until drawn
    reveal_deadline: int
    size: int
    commits: int
    reveals: int
    pass_votes: int
    fail_votes: int
    outcome: Outcome
    members: tuple[int, ...]

    @property
    def drawn(self) -> bool:
        return self.commit_deadline != 0


def device_key(device_signature: str | bytes) -> bytes:
    """The bytes32 a device signature is registered and matched by: keccak256 of its text."""
    from eth_utils import keccak
    if isinstance(device_signature, bytes):
        return as_bytes32(device_signature)
    return keccak(text=device_signature)


def vote_commitment(check_id: bytes, round_: int, agent_id: int, fail: bool, salt: bytes) -> bytes:
    from eth_abi import encode
    from eth_utils import keccak
    return keccak(encode(["bytes32", "uint8", "uint256", "bool", "bytes32"],
                         [as_bytes32(check_id), int(round_), int(agent_id), bool(fail), as_bytes32(salt)]))


def check_id_of(stage_agent_id: int, receipt_hash: bytes) -> bytes:
    from eth_abi import encode
    from eth_utils import keccak
    return keccak(encode(["uint256", "bytes32"], [int(stage_agent_id), as_bytes32(receipt_hash)]))


def quorum_seed(block_hash: bytes, receipt_hash: bytes, check_id: bytes, round_: int) -> bytes:
    """The seed of a round: the seed block's hash mixed with the receipt hash (and the check and round)."""
    from eth_abi import encode
    from eth_utils import keccak
    return keccak(encode(["bytes32", "bytes32", "bytes32", "uint8"],
                         [as_bytes32(block_hash), as_bytes32(receipt_hash), as_bytes32(check_id), int(round_)]))


def select_quorum(seed: bytes, candidates: list[int], size: int) -> list[int]:
    """The `size` candidates with the lowest keccak256(abi.encode(seed, agentId)), ascending (the contract's rule)."""
    from eth_abi import encode
    from eth_utils import keccak

    def score(agent_id: int) -> int:
        return int.from_bytes(keccak(encode(["bytes32", "uint256"], [as_bytes32(seed), int(agent_id)])), "big")
    return sorted(candidates, key=score)[:size]


class Quorum(BoundContract):
    """SpotCheckQuorum at `address`."""
    NAME = "SpotCheckQuorum"

    # ---- validators ---------------------------------------------------------------------------

    def register_validator(self, key: str, agent_id: int, device: str | bytes) -> Any:
        return self.send(key, self.fn.registerValidator(int(agent_id), device_key(device)))

    def deregister_validator(self, key: str, agent_id: int) -> Any:
        return self.send(key, self.fn.deregisterValidator(int(agent_id)))

    # ---- a check ------------------------------------------------------------------------------

    def open_check(self, key: str, stage_agent_id: int, receipt_hash: bytes, *, exact: bool = True,
                   device: str | bytes = b"\0" * 32) -> bytes:
        """Open a check (approving the report bond if needed); its id."""
        self.approve(key, self.params().report_bond)
        rcpt = self.send(key, self.fn.openCheck(int(stage_agent_id), as_bytes32(receipt_hash), bool(exact),
                                                device_key(device)))
        return bytes(self.events(rcpt, "CheckOpened")[0]["checkId"])

    def draw(self, key: str, check_id: bytes) -> Any:
        """Seat the current round (or re-arm its seed when the seed block's hash is gone: see `SeedRearmed`)."""
        return self.send(key, self.fn.draw(as_bytes32(check_id)))

    def seal_vote(self, check_id: bytes, agent_id: int, fail: bool) -> SealedVote:
        """A vote with a fresh salt for the check's current round."""
        return SealedVote(as_bytes32(check_id), self.check(check_id).round, int(agent_id), bool(fail),
                          secrets.token_bytes(32))

    def commit(self, key: str, check_id: bytes, agent_id: int, commitment: bytes) -> Any:
        return self.send(key, self.fn.commitVote(as_bytes32(check_id), int(agent_id), as_bytes32(commitment)))

    def reveal(self, key: str, check_id: bytes, agent_id: int, fail: bool, salt: bytes) -> Any:
        return self.send(key, self.fn.revealVote(as_bytes32(check_id), int(agent_id), bool(fail), as_bytes32(salt)))

    def finalize(self, key: str, check_id: bytes) -> Any:
        return self.send(key, self.fn.finalize(as_bytes32(check_id)))

    def appeal(self, key: str, check_id: bytes) -> Any:
        self.approve(key, self.params().appeal_bond)
        return self.send(key, self.fn.appeal(as_bytes32(check_id)))

    def execute(self, key: str, check_id: bytes) -> Any:
        return self.send(key, self.fn.execute(as_bytes32(check_id)))

    # ---- views --------------------------------------------------------------------------------

    def params(self) -> QuorumParams:
        if not hasattr(self, "_params"):
            self._params = QuorumParams(*(int(x) for x in self.fn.params().call()))
        return self._params

    def check(self, check_id: bytes) -> CheckState:
        raw = list(self.fn.getCheck(as_bytes32(check_id)).call())
        raw[7] = Outcome(raw[7])
        return CheckState(*raw)

    def round(self, check_id: bytes, round_: int) -> RoundState:
        raw = list(self.fn.getRound(as_bytes32(check_id), int(round_)).call())
        raw[9], raw[10] = Outcome(raw[9]), tuple(int(m) for m in raw[10])
        return RoundState(*raw)

    def vote(self, check_id: bytes, round_: int, agent_id: int) -> tuple[int, bool]:
        """(0 none | 1 committed | 2 revealed, the vote once revealed)."""
        state, fail = self.fn.voteOf(as_bytes32(check_id), int(round_), int(agent_id)).call()
        return int(state), bool(fail)

    def validators(self) -> list[int]:
        return [int(v) for v in self.fn.validators().call()]

    def phase(self, check_id: bytes) -> str:
        """What the check waits for: 'seed' (block), 'draw', 'commit', 'reveal', 'finalize', 'appeal-window'
        (appeal or wait), 'execute', or 'executed'."""
        c = self.check(check_id)
        if c.executed:
            return "executed"
        r = self.round(check_id, c.round)
        latest = self.w3.eth.get_block("latest")
        now, block = int(latest["timestamp"]), int(latest["number"])
        if r.outcome != Outcome.NONE:
            return "appeal-window" if now <= c.finalized_at + self.params().appeal_window else "execute"
        if not r.drawn:
            return "draw" if block > r.seed_block else "seed"
        commits_closed = r.commits == r.size or now > r.commit_deadline  # the contract's rule for reveals
        all_revealed = r.reveals == r.size or (now > r.commit_deadline and r.reveals == r.commits)
        if all_revealed or now > r.reveal_deadline:  # the contract's rule for finalize
            return "finalize"
        return "reveal" if commits_closed else "commit"

    def eligible(self, check_id: bytes, round_: int, *, block: int | str = "latest") -> list[int]:
        """The validators a round could seat, as the contract decides it, read at `block`."""
        from mesh402.economics.staking import Staking
        c, r = self.check(check_id), self.round(check_id, round_)
        staking = Staking(self.w3, self.fn.staking().call())
        min_stake = self.params().min_validator_stake
        first = set(self.round(check_id, 0).members) if round_ == 1 else set()
        out = []
        for vid in self.fn.validators().call(block_identifier=block):
            registered, device, registered_at = self.fn.validatorInfo(vid).call(block_identifier=block)
            if vid == c.stage_agent_id or not registered or registered_at >= r.anchor_block or vid in first:
                continue
            if not c.exact and bytes(device) != c.device:
                continue
            if (staking.fn.stakeOf(vid).call(block_identifier=block) < min_stake
                    or staking.fn.raisedAtBlock(vid).call(block_identifier=block) >= r.anchor_block):
                continue
            out.append(int(vid))
        return out

    def expected_members(self, check_id: bytes, round_: int, *, block: int | str = "latest") -> list[int]:
        """Recompute a drawn round's seating from its seed block's hash and the eligible validators."""
        c, r = self.check(check_id), self.round(check_id, round_)
        seed_hash = bytes(self.w3.eth.get_block(r.seed_block)["hash"])
        seed = quorum_seed(seed_hash, c.receipt_hash, as_bytes32(check_id), round_)
        return select_quorum(seed, self.eligible(check_id, round_, block=block), r.size)
