"""Helpers for the escrow, staking and quorum tests: one `mesh402 chain dev` chain with the contracts bound,
fresh funded accounts, ERC-8004 agents, and anvil's clock and miner."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.chainutil import DevChain, start_chain


@dataclass
class Actor:
    key: str
    address: str
    agent_id: int | None = None


@dataclass
class WorkEnv:
    chain: DevChain
    gas: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from mesh402.economics.chain import contract_at
        from mesh402.economics.escrow import Escrow
        from mesh402.economics.quorum import Quorum
        from mesh402.economics.staking import Staking
        c = self.chain.dep.contracts
        self.w3 = self.chain.w3()
        self.escrow = Escrow(self.w3, c["MeshEscrow"])
        self.staking = Staking(self.w3, c["MeshStaking"])
        self.quorum = Quorum(self.w3, c["SpotCheckQuorum"])
        self.identity = contract_at(self.w3, "IdentityRegistry", c["IdentityRegistry"])
        self.token = contract_at(self.w3, "MeshUSDC", self.chain.dep.asset.address)
        self.deployer = self.w3.eth.accounts[0]

    # ---- accounts -----------------------------------------------------------------------------

    def actor(self, usdc: int = 0, *, agent: bool = False) -> Actor:
        """A fresh account with gas, `usdc` atomic test USDC, and (if asked) its own ERC-8004 agent."""
        from eth_account import Account
        acct = Account.create()
        key = acct.key.hex() if acct.key.hex().startswith("0x") else "0x" + acct.key.hex()
        self.w3.provider.make_request("anvil_setBalance", [acct.address, hex(10**19)])
        if usdc:
            self.mint(acct.address, usdc)
        a = Actor(key, acct.address)
        if agent:
            a.agent_id = self.register_agent(a)
        return a

    def mint(self, to: str, amount: int) -> None:
        self.token.functions.mint(to, amount).transact({"from": self.deployer})

    def register_agent(self, a: Actor) -> int:
        from web3.logs import DISCARD

        from mesh402.economics.evm import send_tx
        rcpt = send_tx(self.w3, a.key, self.identity.functions.register("https://node.example/reg.json"))
        return int(self.identity.events.Registered().process_receipt(rcpt, errors=DISCARD)[0]["args"]["agentId"])

    def balance(self, who: str) -> int:
        return int(self.token.functions.balanceOf(who).call())

    # ---- time ---------------------------------------------------------------------------------

    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def block(self) -> int:
        return int(self.w3.eth.block_number)

    def advance(self, seconds: int) -> None:
        """Move the chain's clock forward and mine a block, so views and estimates see the new time."""
        self.w3.provider.make_request("evm_increaseTime", [int(seconds)])
        self.mine()

    def mine(self, blocks: int = 1) -> None:
        self.w3.provider.make_request("anvil_mine", [hex(blocks)])

    # ---- gas ----------------------------------------------------------------------------------

    def record(self, name: str, rcpt: Any) -> Any:
        self.gas[name] = int(rcpt["gasUsed"])
        return rcpt


def reverts(error: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a wrapper call that must be refused with the contract's custom error `error`; the ChainCallError."""
    from mesh402.economics.contractcall import ChainCallError
    with pytest.raises(ChainCallError) as ei:
        call(*args, **kwargs)
    assert ei.value.error == error, str(ei.value)
    return ei.value


@contextmanager
def work_env(tmp: Path) -> Iterator[WorkEnv]:
    """A dev chain from `mesh402 chain dev` with the work contracts bound; prints the gas it recorded."""
    from mesh402.economics.toolchain import tools_ready
    if not tools_ready():
        pytest.fail("the npm contract toolchain is missing: run bash scripts/setup-dev-extra.sh")
    chain = start_chain(tmp, buyers=1)
    env = WorkEnv(chain)
    try:
        yield env
    finally:
        chain.proc.stop()
        if env.gas:
            print("\ngas used:", ", ".join(f"{k}={v}" for k, v in sorted(env.gas.items())))
