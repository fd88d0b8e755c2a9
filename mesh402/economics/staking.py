"""Stake bound to ERC-8004 agent ids (contracts/MeshStaking.sol): what a node puts at risk to serve paid work.

An entry sends paid work only to nodes whose agent `meets_minimum(mesh, agent_id)`; the mesh's minimum is set
on chain by whoever created the mesh id (`create_mesh`), never below the contract's floor. Unstaking takes
`unbonding_delay` seconds, longer than a spot check and its appeal window, and a check in progress freezes
the stake it may slash. Pure chain-side: no HTTP, no node code.
"""

from __future__ import annotations

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
