"""Deploying the contracts that pay workers without trusting the entry: MeshEscrow, MeshStaking and
SpotCheckQuorum (which MeshStaking names, once, as its only slasher). `mesh402 chain dev` calls
`deploy_work_contracts`; tests and benchmarks may call it again with other parameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mesh402.economics.quorum import QuorumParams

DAY = 86400


@dataclass(frozen=True)
class WorkContractParams:
    unlock_delay: int = DAY  # escrow: a worker has this long to redeem once an unlock is requested
    unbonding_delay: int = 7 * DAY  # stake: longer than a whole check (two rounds and the appeal window)
    min_stake_floor: int = 1_000_000  # 1 USDC: no mesh may ask less
    quorum: QuorumParams = field(default_factory=QuorumParams)

    def __post_init__(self) -> None:
        if self.unbonding_delay <= self.quorum.longest_check_s:
            raise ValueError(f"unbonding delay {self.unbonding_delay}s must exceed a check's longest life "
                             f"({self.quorum.longest_check_s}s: two rounds and the appeal window)")


def deploy_work_contracts(w3: Any, arts: dict[str, Any], token: str, identity: str, send: Callable[[dict[str, Any]], Any],
                          *, treasury: str, params: WorkContractParams | None = None) -> dict[str, str]:
    """Deploy the three contracts with `send` (a function sending a transaction dict from the deployer and
    returning its receipt) and make the quorum the staking contract's slasher. Their addresses by name."""
    p = params or WorkContractParams()

    def deploy(name: str, *args: Any) -> str:
        a = arts[name]
        return send({"data": w3.eth.contract(abi=a.abi, bytecode=a.bytecode).constructor(*args).data_in_transaction}
                    )["contractAddress"]

    escrow = deploy("MeshEscrow", token, p.unlock_delay)
    staking = deploy("MeshStaking", identity, token, p.unbonding_delay, p.min_stake_floor)
    quorum = deploy("SpotCheckQuorum", identity, staking, treasury, p.quorum.as_tuple())
    st = w3.eth.contract(address=staking, abi=arts["MeshStaking"].abi)
    send({"to": staking, "data": st.functions.setSlasher(quorum)._encode_transaction_data()})
    return {"MeshEscrow": escrow, "MeshStaking": staking, "SpotCheckQuorum": quorum}
