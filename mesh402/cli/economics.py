"""Payment and chain commands: `mesh402 chain dev`, `facilitator`, `chat`, `register`, `payout`."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from mesh402.cli.common import (
    HomeOpt,
    console,
    console_get,
    err,
    fail,
    find_console,
    load_deployment,
    load_key,
    locked_or_fail,
)
from mesh402.cli.options import DeploymentOpt, IdentityRegistryOpt, NetworkOpt, RpcOpt
from mesh402.economics.chain import Anvil, DevChainSpec, deploy_dev, web3_for
from mesh402.economics.client import PayingClient, PaymentFailed, SpendCapExceeded
from mesh402.economics.erc8004 import (
    IDENTITY_FILE,
    REGISTRATION_FILE,
    REGISTRATION_PATH,
    register_node,
    registration_document,
    verify_binding,
    write_json,
)
from mesh402.economics.facilitator import build_facilitator, create_facilitator_app
from mesh402.economics.networks import NAMED, erc8004_registries
from mesh402.economics.payout import PayoutChain, PayoutError, pay_epoch
from mesh402.economics.toolchain import ToolchainError, ensure_tools, tools_ready
from mesh402.home import Home, read_secret_file, resolve_home
from mesh402.mesh.identity import NodeIdentity
from mesh402.work.store import epoch_of

if TYPE_CHECKING:
    pass

REGISTER_LOCK = "register.lock"  # held while `mesh402 register` writes the home's identity files


chain_app = typer.Typer(help="Local EVM chain for payments (anvil + the project's contracts).", no_args_is_help=True)


@chain_app.command("dev")
def chain_dev(
    port: Annotated[int, typer.Option(help="RPC port for anvil on 127.0.0.1.")] = 8545,
    out: Annotated[Optional[Path], typer.Option("--dir", help="Where to write deployment.json and keys/ (default <home>/chain).")] = None,
    nodes: Annotated[int, typer.Option(help="Node (payee) accounts to create.")] = 2,
    buyers: Annotated[int, typer.Option(help="Buyer accounts to create and fund with test USDC.")] = 2,
    usdc: Annotated[str, typer.Option(help="Test USDC minted to each buyer.")] = "1000",
    rpc_url: Annotated[Optional[str], typer.Option(help="Deploy onto an already running dev chain (anvil/hardhat, unlocked account 0) instead of starting anvil.")] = None,
    home: HomeOpt = None,
) -> None:
    """Start anvil, deploy the test USDC (EIP-3009) compiled from contracts/, fund accounts, write deployment.json."""

    out_dir = (out or resolve_home(home) / "chain").expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    anvil = None
    try:
        if rpc_url is None:
            if not tools_ready():
                err.print("installing the contract toolchain (npm: solc, anvil, OpenZeppelin) on first use…")
            ensure_tools()
            anvil = Anvil(port, log_path=out_dir / "anvil.log")
            anvil.wait_ready()
            rpc_url = anvil.rpc_url
        dep = deploy_dev(rpc_url, out_dir, DevChainSpec(nodes=nodes, buyers=buyers, usdc_each=usdc))
    except (ToolchainError, ValueError) as e:
        if anvil:
            anvil.stop()
        fail(str(e))
    except BaseException:
        if anvil:
            anvil.stop()
        raise
    console.print(f"chain {dep.network} at [bold]{dep.rpc_url}[/]", highlight=False)
    console.print(f"token {dep.asset.name} ({dep.asset.symbol}) at {dep.asset.address}", highlight=False)
    for name, acct in dep.accounts.items():
        console.print(f"  {name:12s} {acct['address']}  key: {out_dir / acct['keyFile']}", highlight=False)
    console.print(f"deployment: [bold]{dep.path}[/]", highlight=False)
    sys.stdout.flush()
    if anvil is None:
        return
    stop = {"flag": False}

    def _stop(*_: Any) -> None:
        stop["flag"] = True
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop["flag"] and anvil.proc.poll() is None:
            time.sleep(0.2)
    finally:
        anvil.stop()


def facilitator_cmd(
    port: Annotated[int, typer.Option(help="HTTP port.")] = 4021,
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    deployment: Annotated[Optional[Path], typer.Option(help="deployment.json from `mesh402 chain dev` (gives RPC URL, network and the 'facilitator' key).")] = None,
    rpc_url: Annotated[Optional[str], typer.Option(help="Chain RPC URL (e.g. https://sepolia.base.org).")] = None,
    network: Annotated[Optional[str], typer.Option(help="CAIP-2 network(s) to settle on, comma-separated (e.g. eip155:84532).")] = None,
    key_file: Annotated[Optional[Path], typer.Option(help="File (0600) with the gas-paying facilitator key; or env MESH402_FACILITATOR_KEY.")] = None,
) -> None:
    """Serve an x402 facilitator (/verify, /settle, /supported) using the x402 SDK's exact-EVM logic."""

    import uvicorn


    logging.basicConfig(level=logging.WARNING)
    dep = load_deployment(deployment)
    try:
        key = load_key(key_file, "MESH402_FACILITATOR_KEY", "facilitator key", dep, "facilitator")
    except ValueError as e:
        fail(str(e))
    nets = [n.strip() for n in (network or (dep.network if dep else "")).split(",") if n.strip()]
    nets = [NAMED[n].network if n in NAMED else n for n in nets]
    if not nets:
        fail("pass --network (e.g. eip155:84532) or --deployment")
    url = rpc_url or (dep.rpc_url if dep else None)
    if url is None:
        named = [n for n in NAMED.values() if n.network == nets[0]]
        url = named[0].rpc_url if named else None
    if url is None:
        fail("pass --rpc-url")
    fac = build_facilitator(key, url, nets)
    app = create_facilitator_app(fac, nets)
    console.print(f"x402 facilitator on http://{host}:{port} for {', '.join(nets)} via {url}", highlight=False)
    sys.stdout.flush()
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def chat_cmd(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    url: Annotated[str, typer.Option(help="Node API base URL.")] = "http://127.0.0.1:9337",
    wallet_file: Annotated[Optional[Path], typer.Option(help="File (0600) with the buyer's private key; or env MESH402_WALLET_KEY.")] = None,
    max_per_request: Annotated[str, typer.Option(help="Most one payment may be, in USDC.")] = "0.10",
    max_per_session: Annotated[str, typer.Option(help="Most this session may pay in all, in USDC.")] = "1.00",
    max_tokens: Annotated[int, typer.Option(help="Max tokens to generate.")] = 128,
    model: Annotated[Optional[str], typer.Option(help="Model id (default: the node's default).")] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Stream tokens as they arrive.")] = True,
    decimals: Annotated[int, typer.Option(help="Decimals of the payment token.")] = 6,
) -> None:
    """Ask a paid node one question, paying with x402 (per request or prepaid credit) within spending caps."""
    from decimal import Decimal


    key = load_key(wallet_file, "MESH402_WALLET_KEY", "wallet")
    scale = Decimal(10) ** decimals

    async def run() -> None:
        async with PayingClient(url, key, max_per_request=int(Decimal(max_per_request) * scale),
                                max_per_session=int(Decimal(max_per_session) * scale)) as c:
            try:
                out = await c.chat([{"role": "user", "content": prompt}], model=model, max_tokens=max_tokens,
                                   stream=stream, on_delta=lambda t: print(t, end="", flush=True))
            except (SpendCapExceeded, PaymentFailed) as e:
                fail(str(e), 1)
            if stream:
                print()
            else:
                print(out["choices"][0]["message"]["content"])
            if out.get("error"):
                err.print(f"[yellow]{out['error'].get('message')}[/]")
            sp = c.spend
            err.print(f"paid {Decimal(sp.settled) / scale} USDC this session from {c.address}"
                      + (f"; credit left {Decimal(sp.credit_balance) / scale}" if sp.credit_balance is not None else ""),
                      highlight=False)
    asyncio.run(run())


def register_cmd(
    home: HomeOpt = None,
    deployment: DeploymentOpt = None,
    account: Annotated[Optional[str], typer.Option(help="Owner account in the deployment file (e.g. node-0); each node should have its own.")] = None,
    key_file: Annotated[Optional[Path], typer.Option(help="File (0600) with the node's EVM owner key; or env MESH402_OWNER_KEY.")] = None,
    wallet_key_file: Annotated[Optional[Path], typer.Option(help="File (0600) with the key of the agentWallet to prove (default: the owner's).")] = None,
    network: NetworkOpt = None,
    rpc_url: RpcOpt = None,
    registry: IdentityRegistryOpt = None,
    public_url: Annotated[Optional[str], typer.Option(help="Base URL where others reach this node's API (default: its local API URL).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Agent name in the registration file.")] = None,
) -> None:
    """Register the running node as an ERC-8004 agent: registration file, node-key binding, agentWallet."""

    h = resolve_home(home)
    base, headers, state = find_console(h)
    with locked_or_fail(h, REGISTER_LOCK, "a registration"):  # two at once would mint two agents
        st = console_get(f"{base}/api/status", headers)
        dep = load_deployment(deployment)
        owner_key = load_key(key_file, "MESH402_OWNER_KEY", "owner key", dep, account)
        wallet_key = read_secret_file(wallet_key_file) if wallet_key_file else None
        try:
            reg_addr = registry or erc8004_registries(network, dep)["IdentityRegistry"]
        except ValueError as e:
            fail(str(e))
        url = rpc_url or (dep.rpc_url if dep else None)
        if url is None:
            key = network or "base-sepolia"
            url = NAMED[key].rpc_url if key in NAMED else None
        if url is None:
            fail("pass --rpc-url")
        w3 = web3_for(url)
        ident = NodeIdentity.load_or_create(h)
        if ident.node_id_hex != st.get("node_id", ident.node_id_hex):
            fail(f"{h}/node.key is not the running node's key")
        api = (public_url or state.get("api_url") or "").rstrip("/")
        me = st.get("self") or {}
        models = sorted((state.get("models") or {}).keys())
        doc = registration_document(name=name or me.get("name") or f"mesh402-{ident.short}", api_url=api,
                                    node_id=ident.node_id_hex, mesh_id=st.get("mesh_id"), hardware=me.get("hardware"),
                                    x402=False, models=models)
        write_json(h / REGISTRATION_FILE, doc)  # served before the registration so the URI resolves at once
        previous = None
        try:
            import json as _json
            previous = _json.loads((h / IDENTITY_FILE).read_text())
        except (OSError, ValueError):
            pass
        agent_id = None
        if previous and previous.get("registry", "").lower() == reg_addr.lower() and previous.get("chainId") == w3.eth.chain_id:
            agent_id = int(previous["agentId"])
        try:
            res = register_node(w3, owner_key, w3.to_checksum_address(reg_addr), api + REGISTRATION_PATH, ident,
                                wallet_key=wallet_key, agent_id=agent_id)
        except Exception as e:  # web3 errors: RPC down, revert, no gas
            fail(f"registration failed: {e}")
        doc["registrations"] = [{"agentId": res.agent_id, "agentRegistry": f"eip155:{res.chain_id}:{res.registry}"}]
        write_json(h / REGISTRATION_FILE, doc)
        write_json(h / IDENTITY_FILE, {**res.to_json(), "rpcUrl": url})
        ok = verify_binding(w3, res.registry, res.agent_id, ident.node_id)
        console.print(f"agent {res.agent_id} on eip155:{res.chain_id} registry {res.registry}", highlight=False)
        console.print(f"  owner {res.owner}  agentWallet {res.wallet}", highlight=False)
        console.print(f"  agentURI {res.agent_uri}", highlight=False)
        console.print(f"  node binding {'verified' if ok else 'NOT verified'} for node {ident.node_id_hex[:12]}", highlight=False)
        if res.gas:
            console.print("  gas: " + ", ".join(f"{k} {v}" for k, v in res.gas.items()), highlight=False)
        if not ok:
            raise typer.Exit(1)


def payout_cmd(
    home: HomeOpt = None,
    epoch: Annotated[Optional[int], typer.Option(help="Epoch number (default: the last complete one).")] = None,
    epoch_seconds: Annotated[int, typer.Option(help="Epoch length the node uses (payments.epoch_s).")] = 3600,
    deployment: DeploymentOpt = None,
    account: Annotated[Optional[str], typer.Option(help="Account in the deployment file that holds the revenue (the node's pay-to).")] = None,
    key_file: Annotated[Optional[Path], typer.Option(help="File (0600) with the key of the wallet that holds the revenue; or env MESH402_PAYOUT_KEY.")] = None,
    network: NetworkOpt = None,
    rpc_url: RpcOpt = None,
    rewards: Annotated[Optional[str], typer.Option(help="EpochRewards contract address (default: the deployment's).")] = None,
    registry: IdentityRegistryOpt = None,
    validation_registry: Annotated[Optional[str], typer.Option("--validation-registry", help="ValidationRegistry address (default: the network's).")] = None,
    reputation_registry: Annotated[Optional[str], typer.Option("--reputation-registry", help="ReputationRegistry address (default: the network's).")] = None,
    require_validation: Annotated[bool, typer.Option("--require-validation/--no-require-validation", help="Pay a stage node only when its spot checks passed on chain (ValidationRegistry); --no-require-validation trusts the stages (a mesh without a validator).")] = True,
    push: Annotated[bool, typer.Option("--push", help="Also send every claim (the entry pays the gas), instead of leaving them to the nodes.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the split and send nothing.")] = False,
) -> None:
    """Pay an epoch's revenue to the nodes that served it, by work units, through the EpochRewards contract
    (an entry started with --payout-key-file does this by itself after each epoch)."""
    import time as _time

    from rich.markup import escape


    h = resolve_home(home)
    if not (h / "receipts.sqlite").exists():
        fail(f"no receipts in {h} (a paid entry node keeps them for split requests)")
    dep = load_deployment(deployment)
    ep = epoch if epoch is not None else epoch_of(_time.time(), epoch_seconds) - 1
    url = rpc_url or (dep.rpc_url if dep else None) or (NAMED[network].rpc_url if network in NAMED else None)
    if url is None:
        fail("pass --rpc-url or --deployment")
    rewards_addr = rewards or (dep.contracts.get("EpochRewards") if dep else None)
    if not rewards_addr:
        fail("pass --rewards (the EpochRewards contract) or --deployment")
    regs = {"IdentityRegistry": _registry_address(registry, "IdentityRegistry", network, dep)}
    for name, explicit in (("ValidationRegistry", validation_registry), ("ReputationRegistry", reputation_registry)):
        try:  # resolved when used: a payout that needs neither works without them
            regs[name] = _registry_address(explicit, name, network, dep, fail=False)
        except ValueError:
            pass
    key = None
    if not dry_run:
        key = load_key(key_file, "MESH402_PAYOUT_KEY", "payout key", dep, account)
    try:
        pay_epoch(h, ep, PayoutChain(url, rewards_addr, regs), key=key, epoch_s=epoch_seconds, push=push,
                  require_validation=require_validation, dry_run=dry_run, validate=lambda e: _run_validation_round(h, e),
                  log=lambda s: console.print(s, highlight=False, markup=False),
                  warn=lambda s: err.print(f"[yellow]{escape(s)}[/]", highlight=False))
    except PayoutError as e:
        fail(str(e))


def _run_validation_round(home: Path, epoch: int) -> None:
    """Ask the running entry node to get every paid stage node's spot checks validated on chain (requests by
    the nodes, verdicts by the mesh's validator). Without a running node, what is on record decides."""
    import httpx

    if Home(home).read_state() is None:
        console.print("no running node for this home: paying on the validations already on chain", highlight=False)
        return
    try:
        base, headers, _ = find_console(home)
    except typer.Exit:  # it said why (not running, no console): pay on what is on chain
        console.print("paying on the validations already on chain", highlight=False)
        return
    try:
        r = httpx.post(f"{base}/api/epochs/{epoch}/validate", headers=headers, timeout=900.0)
    except httpx.HTTPError as e:
        fail(f"the validation round failed: cannot reach the node at {base}: {e}")
    if r.status_code != 200:
        fail(f"the validation round failed: HTTP {r.status_code} {r.text[:300]}")
    for node, res in sorted(r.json().get("nodes", {}).items()):
        if "score" in res:
            what = f"score {res['score']} over {res.get('checked', 0)} spot checks"
        else:
            what = res.get("error", "no verdict")
        console.print(f"  validation {node[:12]}: {what}", highlight=False)


def _registry_address(explicit: Optional[str], name: str, network: Optional[str], dep: Any, *, fail: bool = True) -> str:
    try:
        return explicit or erc8004_registries(network, dep)[name]
    except ValueError as e:
        if not fail:
            raise
        fail(str(e))
        raise  # _fail exits; this keeps the return type honest
