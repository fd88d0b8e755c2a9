"""The `mesh402` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from mesh402 import __version__
from mesh402.cli import mesh as _mesh
from mesh402.settings import DEFAULT_API_PORT, NodeConfig, load_api_key
from mesh402.home import resolve_home
from mesh402.models.catalog import BUNDLED_MODEL_ID, ModelNotFound, resolve_model

app = typer.Typer(help="mesh402: pool machines into one LLM inference mesh, and pay the ones doing the work.",
                  no_args_is_help=True, add_completion=False)
console = Console()
err = Console(stderr=True)

HomeOpt = Annotated[Optional[Path], typer.Option("--home", help="Node state directory, one running node per home (env MESH402_HOME; default ~/.mesh402).")]


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def serve(
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help=f"Model to serve: '{BUNDLED_MODEL_ID}' (bundled, default), a .gguf file, or a safetensors folder. Repeatable.")] = None,
    port: Annotated[int, typer.Option(help="OpenAI-compatible API port.")] = DEFAULT_API_PORT,
    listen_all: Annotated[bool, typer.Option("--listen-all", help="Bind the API on all interfaces (default: loopback only).")] = False,
    home: HomeOpt = None,
    api_key_file: Annotated[Optional[Path], typer.Option(help="File (mode 0600) holding the API key that /v1 requires; or set MESH402_API_KEY.")] = None,
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, cuda:N or mps.")] = "cpu",
    mode: Annotated[str, typer.Option(help="Numerics: 'fast' (packed quantized kernels) or 'exact' (fp32 dequantized).")] = "fast",
    threads: Annotated[int, typer.Option(help="Torch threads for this node.")] = 1,
    max_sessions: Annotated[int, typer.Option(help="Concurrent generations per model before 503.")] = 16,
    max_vram: Annotated[Optional[float], typer.Option(help="Weight budget in GB (1e9 bytes, e.g. 0.08); a model larger than the budget is split across nodes.")] = None,
    max_split_rtt: Annotated[float, typer.Option(help="Peers with a higher RTT (ms) never hold a stage of a split.")] = 80.0,
    wire_dtype: Annotated[str, typer.Option(help="Activations between stages: f32 (bit-exact), f16 or bf16.")] = "f32",
    standby: Annotated[bool, typer.Option("--standby", help="Serve no model until the mesh's demand asks for one on this node's disk.")] = False,
    session_idle_timeout: Annotated[float, typer.Option("--session-idle-timeout", help="Seconds a stage of a split (or an expert node) waits for the next step of an open session before it closes the session and frees its memory.")] = 120.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    join: _mesh.JoinOpt = None,
    join_file: _mesh.JoinFileOpt = None,
    relay: _mesh.RelayOpt = None,
    console_port: _mesh.ConsoleOpt = None,
    console_listen_all: _mesh.ConsoleAllOpt = False,
    console_token_file: _mesh.ConsoleTokenOpt = None,
    bind_ip: _mesh.BindIpOpt = "0.0.0.0",
    bind_port: _mesh.BindPortOpt = 0,
    mesh_policy: _mesh.PolicyOpt = "secret",
    invite_expires: _mesh.InviteExpiresOpt = "24h",
    name: _mesh.NameOpt = "",
    no_model: _mesh.NoModelOpt = False,
    mesh_fast_timers: _mesh.MeshFastOpt = False,
    publish: _mesh.PublishOpt = False,
    private: _mesh.PrivateOpt = False,
    auto: _mesh.AutoOpt = False,
    mesh_name: _mesh.MeshNameOpt = "",
    region: _mesh.RegionOpt = "",
    nostr_relay: _mesh.NostrRelayOpt = None,
    nostr_ttl: _mesh.NostrTtlOpt = 120.0,
    nostr_refresh: _mesh.NostrRefreshOpt = 60.0,
    auto_interval: _mesh.AutoIntervalOpt = 20.0,
    discover_lan: _mesh.LanOpt = False,
    discover_registry: Annotated[Optional[str], typer.Option("--discover-registry", help="Find meshes through ERC-8004 registered nodes (their node binding verified) and join the best open one: a deployment.json, a network name, or RPC_URL,REGISTRY.", rich_help_panel=_mesh.DPANEL)] = None,
    price: Annotated[Optional[str], typer.Option(help="x402 price per request in USDC (e.g. 0.01); free when no price is set.", rich_help_panel="Payments")] = None,
    price_per_1k: Annotated[Optional[str], typer.Option("--price-per-1k", help="USDC per 1k tokens (prompt + completion), from prepaid credit bought with x402.", rich_help_panel="Payments")] = None,
    pay_to: Annotated[Optional[str], typer.Option(help="Address that receives payments (or an account name from --deployment, e.g. node-0).", rich_help_panel="Payments")] = None,
    facilitator: Annotated[Optional[str], typer.Option(help="x402 facilitator URL (`mesh402 facilitator`, or any external one).", rich_help_panel="Payments")] = None,
    network: Annotated[Optional[str], typer.Option(help="Payment network: base-sepolia (default), base, or CAIP-2 eip155:N.", rich_help_panel="Payments")] = None,
    deployment: Annotated[Optional[Path], typer.Option(help="deployment.json from `mesh402 chain dev` (local chain and token).", rich_help_panel="Payments")] = None,
    asset: Annotated[Optional[str], typer.Option(help="Token address, overriding the network's USDC.", rich_help_panel="Payments")] = None,
    asset_name: Annotated[Optional[str], typer.Option(help="The token's EIP-712 domain name.", rich_help_panel="Payments")] = None,
    asset_version: Annotated[Optional[str], typer.Option(help="The token's EIP-712 domain version.", rich_help_panel="Payments")] = None,
    credit_topup: Annotated[Optional[str], typer.Option(help="Metered billing: smallest credit purchase in USDC (default 0.10).", rich_help_panel="Payments")] = None,
    epoch_seconds: Annotated[int, typer.Option("--epoch-seconds", help="Payout epoch: the stages' work receipts of split requests are grouped (and paid, automatically with --payout-key-file, else with `mesh402 payout`) per this many seconds.", rich_help_panel="Payments")] = 3600,
    payout_key_file: Annotated[Optional[Path], typer.Option("--payout-key-file", help="File (0600) with the key of the --pay-to wallet (or env MESH402_PAYOUT_KEY): a paid entry then pays each epoch automatically once it ends (plus a grace of min(60 s, epoch/4)): validation round, Merkle root published, claims sent.", rich_help_panel="Payments")] = None,
    rewards: Annotated[Optional[str], typer.Option("--rewards", help="EpochRewards contract for automatic payouts (default: the deployment's).", rich_help_panel="Payments")] = None,
    owner_key_file: Annotated[Optional[Path], typer.Option("--owner-key-file", help="File (0600) with this node's EVM owner key (the one `mesh402 register` used; or env MESH402_OWNER_KEY): lets the node request ERC-8004 validation of its own work, which payouts require.", rich_help_panel="Trust")] = None,
    validator: Annotated[bool, typer.Option("--validator", help="Re-execute other nodes' audited steps on this node's copy of the model and answer their validation requests on chain (needs --owner-key-file and --deployment/--network).", rich_help_panel="Trust")] = False,
    audit_rate: Annotated[float, typer.Option("--audit-rate", help="Entry: share of paid split requests whose stages must reveal a step for re-execution (each node's first request per epoch is always audited).", rich_help_panel="Trust")] = 0.1,
) -> None:
    """Start a node: load models and serve the OpenAI-compatible API."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if mode not in ("fast", "exact"):
        _fail("--mode must be 'fast' or 'exact'")
    if wire_dtype not in ("f32", "f16", "bf16"):
        _fail("--wire-dtype must be f32, f16 or bf16")
    if max_vram is not None and max_vram <= 0:
        _fail("--max-vram must be a positive number of GB")
    if session_idle_timeout <= 0:
        _fail("--session-idle-timeout must be a positive number of seconds")
    try:
        sources = [resolve_model(m) for m in (model or [BUNDLED_MODEL_ID])]
        api_key = load_api_key(api_key_file)
        from mesh402.cli.payment_flags import payments_config
        payments = payments_config(price=price, price_per_1k=price_per_1k, pay_to=pay_to, facilitator=facilitator,
                                   network=network, deployment=deployment, asset=asset, asset_name=asset_name,
                                   asset_version=asset_version, credit_topup=credit_topup)
        if epoch_seconds <= 0:
            raise ValueError("--epoch-seconds must be positive")
        payments.epoch_s = epoch_seconds
        from mesh402.cli.payment_flags import trust_config
        trust = trust_config(network=network, deployment=deployment, owner_key_file=owner_key_file,
                             validator=validator, audit_rate=audit_rate)
        from mesh402.cli.payment_flags import auto_payout_config
        auto_payout_config(payments, trust, payout_key_file=payout_key_file, rewards=rewards, deployment=deployment)
    except (ModelNotFound, ValueError) as e:
        _fail(str(e))
    if no_model:
        sources = []
    config = NodeConfig(home=resolve_home(home), models=[s.model_id for s in sources],
                        host="0.0.0.0" if listen_all else "127.0.0.1", port=port, api_key=api_key,
                        device=device, mode=mode, threads=threads, payments=payments, trust=trust)  # type: ignore[arg-type]
    config.limits.max_sessions = max_sessions
    config.max_vram_gb, config.max_split_rtt_ms, config.wire_dtype = max_vram, max_split_rtt, wire_dtype  # type: ignore[assignment]
    config.standby = standby
    config.timers.stage_idle_s = session_idle_timeout
    config.mesh = _mesh.settings_from_flags(
        home=config.home, kind="serving", join=join, join_file=join_file, relay=relay, console_port=console_port,
        console_listen_all=console_listen_all, console_token_file=console_token_file, bind_ip=bind_ip,
        bind_port=bind_port, policy=mesh_policy, invite_expires=invite_expires, name=name, fast_timers=mesh_fast_timers,
        publish=publish, private=private, auto=auto, mesh_name=mesh_name, region=region, nostr_relays=nostr_relay,
        nostr_ttl=nostr_ttl, nostr_refresh=nostr_refresh, auto_interval=auto_interval,
        policy_explicit="--mesh-policy" in " ".join(sys.argv), discover_lan=discover_lan)
    if discover_registry:  # alongside Nostr/LAN: --auto with the registry as one more source
        config.mesh.discover_registry = discover_registry
        config.mesh.auto = not config.mesh.join
    # a discovered node on the default API port moves to the next free one instead of failing
    lock = _mesh.preflight_or_fail(config, sources, search_api_port="--port" not in sys.argv and (auto or publish))
    if config.port != port:
        err.print(f"API port {port} is busy; using {config.port}", highlight=False)
        port = config.port
    from mesh402.node.node import Node

    node = Node(config, sources, home_lock=lock)
    node.on_mesh_ready = _mesh.print_ready
    console.print(f"mesh402 {__version__} node: OpenAI API on [bold]http://{'0.0.0.0' if listen_all else '127.0.0.1'}:{port}/v1[/]"
                  f"  models: {', '.join(config.models)}  home: {config.home}", highlight=False)
    if api_key:
        console.print("API key required (Authorization: Bearer …)")
    if payments.enabled:
        console.print(f"x402: {price or 0} USDC/request + {price_per_1k or 0} USDC/1k tokens on {payments.network}, "
                      f"pay to {payments.pay_to}, facilitator {payments.facilitator_url}", highlight=False)
        if payments.auto_payout:
            console.print(f"automatic payouts: every {payments.epoch_s} s epoch, {payments.grace_s:g} s after it ends, "
                          f"from {payments.pay_to} through EpochRewards {payments.rewards}", highlight=False)
    _mesh.run_node(node)


from mesh402.cli.economics import chain_app, chat_cmd, facilitator_cmd, payout_cmd, register_cmd  # noqa: E402

app.add_typer(chain_app, name="chain")
app.command("facilitator")(facilitator_cmd)
app.command("chat")(chat_cmd)
app.command("register")(register_cmd)
app.command("payout")(payout_cmd)


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


_mesh.register(app)  # client, invite, status (mesh402.cli.mesh)


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    main()
