"""Money for work without trusting the entry: `mesh402 escrow`, `mesh402 stake`, `mesh402 validator` and
`mesh402 redeem` (docs/payments.md, "Escrow, vouchers and stake").

Every command talks to the chain of a `--deployment` (or `--rpc-url` with contract addresses) with a key from a
0600 file or an environment variable, never from the command line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mesh402.cli.common import HomeOpt, console, fail, load_deployment, load_key
from mesh402.cli.options import DeploymentOpt
from mesh402.economics.contractcall import ChainCallError
from mesh402.economics.erc8004 import IDENTITY_FILE
from mesh402.home import resolve_home

escrow_app = typer.Typer(help="The entry's escrow account: deposit, lock a float per worker, unlock, withdraw.",
                         no_args_is_help=True)
stake_app = typer.Typer(help="Stake bound to this node's ERC-8004 agent: paid work needs it, a failed check slashes it.",
                        no_args_is_help=True)
validator_app = typer.Typer(help="Spot-check validators: registered with stake, seated by the quorum contract.",
                            no_args_is_help=True)

KeyFileOpt = Annotated[Optional[Path], typer.Option("--key-file", help="File (0600) with the wallet's EVM key; or env MESH402_PAYOUT_KEY (entry) / MESH402_OWNER_KEY (stake, validator).")]
AccountOpt = Annotated[Optional[str], typer.Option("--account", help="Account in the deployment file (e.g. node-0) whose key to use.")]
AmountArg = Annotated[str, typer.Argument(help="Amount in token units (e.g. 1.5 USDC).")]


@dataclass
class WorkChain:
    """The chain, the token and the work contracts of a deployment."""

    dep: Any
    w3: Any

    def contract(self, name: str) -> str:
        addr = self.dep.contracts.get(name)
        if not addr:
            fail(f"the deployment has no {name} contract (redeploy with `mesh402 chain dev`)")
        return str(addr)

    def atomic(self, amount: str) -> int:
        try:
            return self.dep.asset.to_atomic(amount)
        except ValueError as e:
            fail(str(e))
            raise

    def fmt(self, atomic: int) -> str:
        return f"{Decimal(atomic) / (Decimal(10) ** self.dep.asset.decimals):f} {self.dep.asset.symbol}"


def _chain(deployment: Optional[Path]) -> WorkChain:
    from mesh402.economics.chain import web3_for

    dep = load_deployment(deployment)
    if dep is None:
        fail("pass --deployment (deployment.json from `mesh402 chain dev`)")
    return WorkChain(dep, web3_for(dep.rpc_url))


def _agent_id(home: Optional[Path], agent_id: Optional[int]) -> int:
    """This node's agent id: given, or from `mesh402 register` (erc8004.json in the home)."""
    if agent_id is not None:
        return agent_id
    path = resolve_home(home) / IDENTITY_FILE
    try:
        return int(json.loads(path.read_text())["agentId"])
    except (OSError, ValueError, KeyError, TypeError):
        fail(f"no registered agent in {path}: run `mesh402 register` first, or pass --agent-id")
        raise


def _tx(what: str, call: Any, *args: Any) -> Any:
    """Run a contract call; a refusal is one line with the contract's reason."""
    try:
        return call(*args)
    except ChainCallError as e:
        fail(f"{what} refused: {e}")
    except ValueError as e:
        fail(f"{what}: {e}")


# ---- escrow (the entry) -----------------------------------------------------------------------------------

@escrow_app.command("status")
def escrow_status(deployment: DeploymentOpt = None, key_file: KeyFileOpt = None, account: AccountOpt = None,
                  worker: Annotated[Optional[list[str]], typer.Option("--worker", help="Also show this worker's channel (repeatable).")] = None) -> None:
    """The entry's free balance, vault and the channel of each given worker."""
    from mesh402.economics.escrow import Escrow
    from mesh402.economics.evm import account_of

    c = _chain(deployment)
    me = account_of(load_key(key_file, "MESH402_PAYOUT_KEY", "the entry's wallet", c.dep, account)).address
    esc = Escrow(c.w3, c.contract("MeshEscrow"))
    console.print(f"entry {me}: free {c.fmt(esc.free_balance(me))}, vault {esc.vault_of(me)}, "
                  f"unlock delay {esc.unlock_delay} s", highlight=False)
    for w in worker or []:
        ch = esc.channel(me, w)
        console.print(f"  worker {w}: locked {c.fmt(ch.balance)}, redeemed {c.fmt(ch.redeemed)}, "
                      f"coverage {c.fmt(ch.coverage)}" + (f", unlock of {c.fmt(ch.pending_unlock)} pending"
                                                           if ch.pending_unlock else ""), highlight=False)


@escrow_app.command("deposit")
def escrow_deposit(amount: AmountArg, deployment: DeploymentOpt = None, key_file: KeyFileOpt = None,
                   account: AccountOpt = None) -> None:
    """Move tokens from the wallet into its free escrow balance."""
    from mesh402.economics.escrow import Escrow

    c = _chain(deployment)
    key = load_key(key_file, "MESH402_PAYOUT_KEY", "the entry's wallet", c.dep, account)
    _tx("deposit", Escrow(c.w3, c.contract("MeshEscrow")).deposit, key, c.atomic(amount))
    console.print(f"deposited {amount}", highlight=False)


@escrow_app.command("lock")
def escrow_lock(worker: Annotated[str, typer.Argument(help="The worker's wallet address.")], amount: AmountArg,
                deployment: DeploymentOpt = None, key_file: KeyFileOpt = None, account: AccountOpt = None) -> None:
    """Lock part of the free balance for one worker: the float its vouchers are covered by."""
    from mesh402.economics.escrow import Escrow

    c = _chain(deployment)
    key = load_key(key_file, "MESH402_PAYOUT_KEY", "the entry's wallet", c.dep, account)
    _tx("lock", Escrow(c.w3, c.contract("MeshEscrow")).lock, key, {worker: c.atomic(amount)})
    console.print(f"locked {amount} for {worker}", highlight=False)


@escrow_app.command("unlock")
def escrow_unlock(worker: Annotated[str, typer.Argument(help="The worker's wallet address.")], amount: AmountArg,
                  finalize: Annotated[bool, typer.Option("--finalize", help="Complete an unlock requested at least the unlock delay ago.")] = False,
                  deployment: DeploymentOpt = None, key_file: KeyFileOpt = None, account: AccountOpt = None) -> None:
    """Ask for a worker's float back (it comes back after the unlock delay: the worker can redeem first)."""
    from mesh402.economics.escrow import Escrow

    c = _chain(deployment)
    key = load_key(key_file, "MESH402_PAYOUT_KEY", "the entry's wallet", c.dep, account)
    esc = Escrow(c.w3, c.contract("MeshEscrow"))
    if finalize:
        _tx("finalize unlock", esc.finalize_unlock, key, worker)
        console.print(f"unlock from {worker} finalized", highlight=False)
        return
    _tx("unlock", esc.request_unlock, key, worker, c.atomic(amount))
    console.print(f"unlock of {amount} from {worker} requested; finalize after {esc.unlock_delay} s", highlight=False)


@escrow_app.command("withdraw")
def escrow_withdraw(amount: AmountArg, deployment: DeploymentOpt = None, key_file: KeyFileOpt = None,
                    account: AccountOpt = None) -> None:
    """Move free escrow balance back to the wallet (never what is locked for workers)."""
    from mesh402.economics.escrow import Escrow

    c = _chain(deployment)
    key = load_key(key_file, "MESH402_PAYOUT_KEY", "the entry's wallet", c.dep, account)
    _tx("withdraw", Escrow(c.w3, c.contract("MeshEscrow")).withdraw, key, c.atomic(amount))
    console.print(f"withdrew {amount}", highlight=False)


# ---- stake (a worker or validator) ------------------------------------------------------------------------

def _owner_staking(home: Optional[Path], agent_id: Optional[int], deployment: Optional[Path],
                   key_file: Optional[Path], account: Optional[str]) -> tuple[Any, Any, str, int]:
    """What every stake command that sends a transaction needs: the chain, MeshStaking, the agent owner's key
    and this node's agent id."""
    from mesh402.economics.staking import Staking  # lazy: web3 stays unloaded for other commands

    c = _chain(deployment)
    key = load_key(key_file, "MESH402_OWNER_KEY", "the agent owner's key", c.dep, account)
    return c, Staking(c.w3, c.contract("MeshStaking")), key, _agent_id(home, agent_id)


@stake_app.command("add")
def stake_add(amount: AmountArg, home: HomeOpt = None, agent_id: Annotated[Optional[int], typer.Option("--agent-id")] = None,
              deployment: DeploymentOpt = None, key_file: KeyFileOpt = None, account: AccountOpt = None) -> None:
    """Stake tokens for this node's agent (the owner's key pays)."""
    c, st, key, agent = _owner_staking(home, agent_id, deployment, key_file, account)
    _tx("stake", st.stake, key, agent, c.atomic(amount))
    console.print(f"agent {agent} stakes {c.fmt(st.stake_of(agent))}", highlight=False)


@stake_app.command("unstake")
def stake_unstake(amount: AmountArg, home: HomeOpt = None, agent_id: Annotated[Optional[int], typer.Option("--agent-id")] = None,
                  deployment: DeploymentOpt = None, key_file: KeyFileOpt = None, account: AccountOpt = None) -> None:
    """Start unbonding (withdrawable after the unbonding delay, slashable until then)."""
    c, st, key, agent = _owner_staking(home, agent_id, deployment, key_file, account)
    _tx("unstake", st.request_unstake, key, agent, c.atomic(amount))
    console.print(f"unbonding {amount}; withdraw after {st.unbonding_delay} s", highlight=False)


@stake_app.command("withdraw")
def stake_withdraw(home: HomeOpt = None, agent_id: Annotated[Optional[int], typer.Option("--agent-id")] = None,
                   deployment: DeploymentOpt = None, key_file: KeyFileOpt = None, account: AccountOpt = None) -> None:
    """Withdraw stake whose unbonding delay has passed."""
    _, st, key, agent = _owner_staking(home, agent_id, deployment, key_file, account)
    _tx("withdraw", st.withdraw, key, agent)
    console.print("withdrawn", highlight=False)


@stake_app.command("status")
def stake_status(home: HomeOpt = None, agent_id: Annotated[Optional[int], typer.Option("--agent-id")] = None,
                 deployment: DeploymentOpt = None) -> None:
    """This agent's stake: active, unbonding, open checks."""
    from mesh402.economics.staking import Staking

    c = _chain(deployment)
    agent = _agent_id(home, agent_id)
    i = Staking(c.w3, c.contract("MeshStaking")).info(agent)
    console.print(f"agent {agent}: active {c.fmt(i.active)}, unbonding {c.fmt(i.unbonding)}, "
                  f"open checks {i.open_checks}", highlight=False)


# ---- validators -------------------------------------------------------------------------------------------

@validator_app.command("register")
def validator_register(home: HomeOpt = None, agent_id: Annotated[Optional[int], typer.Option("--agent-id")] = None,
                       device: Annotated[str, typer.Option("--device", help="Torch device the validator replays on (its device signature is recorded: fast-mode checks go to validators with the stage's).")] = "cpu",
                       deployment: DeploymentOpt = None, key_file: KeyFileOpt = None, account: AccountOpt = None) -> None:
    """Register this node's (staked) agent as a spot-check validator."""
    from mesh402.economics.quorum import Quorum
    from mesh402.engine.replay import device_signature  # lazy: loads torch only for this command

    c = _chain(deployment)
    key = load_key(key_file, "MESH402_OWNER_KEY", "the agent owner's key", c.dep, account)
    agent = _agent_id(home, agent_id)
    _tx("validator registration", Quorum(c.w3, c.contract("SpotCheckQuorum")).register_validator, key, agent,
        device_signature(device))
    console.print(f"agent {agent} is a validator", highlight=False)


# ---- redemption (a worker) --------------------------------------------------------------------------------

def redeem_cmd(home: HomeOpt = None, deployment: DeploymentOpt = None, key_file: KeyFileOpt = None,
               account: AccountOpt = None) -> None:
    """Redeem every voucher this node holds (one transaction for all entries); any key may pay the gas,
    the tokens always go to the worker the vouchers name."""
    from mesh402.economics.vouchers import VOUCHER_FILE, EscrowRef, VoucherBook, VoucherWallet
    from mesh402.economics.escrow import Escrow

    h = resolve_home(home)
    if not (h / VOUCHER_FILE).exists():
        fail(f"no vouchers in {h} (a worker keeps the vouchers entries pay it with there)")
    c = _chain(deployment)
    key = load_key(key_file, "MESH402_OWNER_KEY", "a key to pay the gas", c.dep, account)
    esc = Escrow(c.w3, c.contract("MeshEscrow"))
    book = VoucherBook(h)
    try:
        todo = [v for v in VoucherWallet(book, "", EscrowRef(esc.chain_id, esc.address)).best()
                if v.cumulative > esc.channel(v.entry, v.worker).redeemed]
        if not todo:
            console.print("nothing to redeem", highlight=False)
            return
        rcpt = _tx("redeem", esc.redeem_batch, key, todo)
        console.print(f"redeemed {len(todo)} voucher(s) in {rcpt['transactionHash'].hex()}", highlight=False)
    finally:
        book.close()
