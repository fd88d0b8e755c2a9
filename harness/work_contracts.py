"""The escrow, staking and quorum contracts on a dev chain (tests and the gas benchmark): one `mesh402 chain dev` chain with the contracts bound,
fresh funded accounts, ERC-8004 agents, and anvil's clock and miner."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from harness.dev_chain import DevChain

USDC = 1_000_000
VALIDATOR_STAKE = 20 * USDC
STAGE_STAKE = 20 * USDC


@dataclass
class Actor:
    key: str
    address: str
    agent_id: int = -1  # its ERC-8004 agent, when asked for one


@dataclass
class WorkEnv:
    chain: DevChain
    contracts: dict[str, str] | None = None  # other deployments of the work contracts (default: chain dev's)
    gas: dict[str, int] = field(default_factory=dict)  # the last gas used per name
    samples: dict[str, list[int]] = field(default_factory=dict)  # every one

    def __post_init__(self) -> None:
        from mesh402.economics.chain import contract_at
        from mesh402.economics.escrow import Escrow
        from mesh402.economics.quorum import Quorum
        from mesh402.economics.staking import Staking
        c = {**self.chain.dep.contracts, **(self.contracts or {})}
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
        self.samples.setdefault(name, []).append(int(rcpt["gasUsed"]))
        return rcpt

    def redeploy(self, params: Any = None) -> "WorkEnv":
        """The same chain with a fresh set of work contracts (workchain.WorkContractParams `params`)."""
        from mesh402.economics.contracts import compile_contracts
        from mesh402.economics.workchain import deploy_work_contracts

        def send(tx: dict[str, Any]) -> Any:
            return self.w3.eth.wait_for_transaction_receipt(self.w3.eth.send_transaction({"from": self.deployer, **tx}))
        fresh = deploy_work_contracts(self.w3, compile_contracts(), self.chain.dep.asset.address,
                                      self.chain.dep.contracts["IdentityRegistry"], send, treasury=self.deployer,
                                      params=params)
        return WorkEnv(self.chain, fresh, self.gas, self.samples)


@dataclass
class QuorumEnv:
    env: WorkEnv
    validators: dict[int, Actor] = field(default_factory=dict)
    devices: dict[int, str] = field(default_factory=dict)
    reporter: Actor = field(init=False)

    def __post_init__(self) -> None:
        self.reporter = self.env.actor(100 * USDC)

    def add_validator(self, device: str) -> Actor:
        """A fresh agent with VALIDATOR_STAKE staked, registered as a validator on `device`."""
        v = self.env.actor(VALIDATOR_STAKE, agent=True)
        self.env.staking.stake(v.key, v.agent_id, VALIDATOR_STAKE)
        self.env.record("registerValidator", self.env.quorum.register_validator(v.key, v.agent_id, device))
        self.validators[v.agent_id], self.devices[v.agent_id] = v, device
        return v

    def stage(self, stake: int = STAGE_STAKE) -> Actor:
        """A fresh agent with `stake` staked (the node whose work is checked)."""
        s = self.env.actor(stake, agent=True)
        self.env.staking.stake(s.key, s.agent_id, stake)
        return s

    def open(self, stage: Actor, receipt: bytes | None = None, *, exact: bool = True, device: str = "cpu") -> bytes:
        """Open a check of `stage` (random receipt hash unless given) from the reporter."""
        import secrets
        return self.env.quorum.open_check(self.reporter.key, stage.agent_id, receipt or secrets.token_bytes(32),
                                          exact=exact, device=device)

    def seat(self, check_id: bytes, name: str = "draw(3)") -> tuple[int, ...]:
        """Mine past the seed block and draw; the seated agent ids."""
        q = self.env.quorum
        c = q.check(check_id)
        behind = q.round(check_id, c.round).seed_block - self.env.block()
        if behind >= 0:  # the draw is simulated on the latest block, which must be past the seed block
            self.env.mine(behind + 1)
        self.env.record(name, q.draw(self.reporter.key, check_id))
        return q.round(check_id, c.round).members

    def vote(self, check_id: bytes, votes: Mapping[int, bool | None]) -> None:
        """Every seated validator in `votes` commits (None: stays silent), then every committer reveals."""
        q = self.env.quorum
        sealed = {a: q.seal_vote(check_id, a, fail) for a, fail in votes.items() if fail is not None}
        for a, s in sealed.items():
            self.env.record("commitVote", q.commit(self.validators[a].key, check_id, a, s.commitment))
        if len(sealed) < len(votes):
            self.env.advance(q.params().commit_window + 1)
        for a, s in sealed.items():
            self.env.record("revealVote", q.reveal(self.validators[a].key, check_id, a, s.fail, s.salt))

    def slashable(self, agent_id: int) -> int:
        return self.env.staking.info(agent_id).slashable
