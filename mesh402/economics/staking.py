"""Stake bound to ERC-8004 agent ids (contracts/MeshStaking.sol): what a node puts at risk to serve paid work.

An entry sends paid work only to nodes whose agent `meets_minimum(mesh, agent_id)`; the mesh's minimum is set
on chain by whoever created the mesh id (`create_mesh`), never below the contract's floor. Unstaking takes
`unbonding_delay` seconds, longer than a spot check and its appeal window, and a check in progress freezes
the stake it may slash. Pure chain-side: no HTTP, no node code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh402.economics.contractcall import BoundContract, as_bytes32


def mesh_key(mesh: str | bytes) -> bytes:
    """The bytes32 a mesh is known by on chain: keccak256 of its id string (32 raw bytes pass unchanged)."""
    from eth_utils import keccak
    if isinstance(mesh, bytes):
        return as_bytes32(mesh)
    if not mesh:
        raise ValueError("a mesh id is required")
    return keccak(text=mesh)


@dataclass(frozen=True)
class StakeInfo:
    active: int
    unbonding: int
    unbonding_ready_at: int  # unix time; 0 when nothing is unbonding
    open_checks: int  # checks that freeze its withdrawals

    @property
    def slashable(self) -> int:
        return self.active + self.unbonding


class Staking(BoundContract):
    """MeshStaking at `address`. Amounts are atomic token units."""
    NAME = "MeshStaking"

    def stake(self, key: str, agent_id: int, amount: int) -> Any:
        """Approve (if needed) and add `amount` to the agent's active stake (anyone may stake for an agent)."""
        self.approve(key, amount)
        return self.send(key, self.fn.stake(int(agent_id), int(amount)))

    def request_unstake(self, key: str, agent_id: int, amount: int) -> Any:
        return self.send(key, self.fn.requestUnstake(int(agent_id), int(amount)))

    def rebond(self, key: str, agent_id: int) -> Any:
        return self.send(key, self.fn.rebond(int(agent_id)))

    def withdraw(self, key: str, agent_id: int) -> Any:
        """Pay the unbonded stake to the agent's owner (after the delay, with no check open on it)."""
        return self.send(key, self.fn.withdraw(int(agent_id)))

    def create_mesh(self, key: str, mesh: str | bytes, min_stake: int) -> Any:
        return self.send(key, self.fn.createMesh(mesh_key(mesh), int(min_stake)))

    def set_min_stake(self, key: str, mesh: str | bytes, min_stake: int) -> Any:
        return self.send(key, self.fn.setMeshMinStake(mesh_key(mesh), int(min_stake)))

    # ---- views --------------------------------------------------------------------------------

    def stake_of(self, agent_id: int) -> int:
        return int(self.fn.stakeOf(int(agent_id)).call())

    def info(self, agent_id: int) -> StakeInfo:
        return StakeInfo(*(int(x) for x in self.fn.stakeInfo(int(agent_id)).call()))

    def min_stake(self, mesh: str | bytes) -> int:
        return int(self.fn.minStakeFor(mesh_key(mesh)).call())

    def meets_minimum(self, mesh: str | bytes, agent_id: int) -> bool:
        return bool(self.fn.meetsMinimum(mesh_key(mesh), int(agent_id)).call())

    @property
    def unbonding_delay(self) -> int:
        return int(self.fn.unbondingDelay().call())


@dataclass(frozen=True)
class Standing:
    """A node's stake as an entry with a minimum sees it (serving.stake_filter.StakeVerdict)."""
    ok: bool
    reason: str  # why not, or "staked"
    agent: int | None = None
    stake: int = 0  # active stake, atomic units
    minimum: int = 0


class StakeRequirement:
    """`serve --min-stake`: whether a peer's agent has at least the minimum at risk, read on chain for an entry's
    serving.stake_filter.StakeFilter (a blocking call; the node runs it in a thread). The minimum is the larger
    of the operator's `--min-stake` and the mesh's own on-chain minimum (MeshStaking.minStakeFor, the contract's
    floor for a mesh nobody created), so an operator can ask more than the mesh but never less. The peer's agent
    is the one whose node binding on the IdentityRegistry verifies for its node id (the newest, if several)."""

    AGENTS_TTL_S = 10.0  # one scan of the registry serves every peer read within this many seconds

    def __init__(self, w3: Any, staking: str, identity_registry: str, min_stake: int,
                 mesh_id: Callable[[], str | None]) -> None:
        from mesh402.economics.erc8004 import registered_agents

        self.staking = Staking(w3, staking)
        self.w3, self.identity, self.min_stake, self.mesh_id = w3, identity_registry, int(min_stake), mesh_id
        self._scan = registered_agents
        self._agents: tuple[float, list[Any]] | None = None
        self._lock = threading.Lock()

    def _agents_now(self) -> list[Any]:
        with self._lock:
            now = time.monotonic()
            if self._agents is None or now - self._agents[0] >= self.AGENTS_TTL_S:
                self._agents = (now, self._scan(self.w3, self.w3.to_checksum_address(self.identity)))
            return self._agents[1]

    def minimum(self) -> int:
        mesh = self.mesh_id()
        return max(self.min_stake, self.staking.min_stake(mesh) if mesh else 0)

    def __call__(self, node_id_hex: str) -> Standing:
        minimum = self.minimum()
        ids = [a.agent_id for a in self._agents_now() if a.node_id == node_id_hex.lower()]
        if not ids:
            return Standing(False, "no ERC-8004 agent bound to this node", minimum=minimum)
        agent = max(ids)
        stake = self.staking.stake_of(agent)
        if stake <= 0 or stake < minimum:
            return Standing(False, f"stake {stake} below the minimum {minimum}", agent, stake, minimum)
        return Standing(True, "staked", agent, stake, minimum)
