"""`mesh402 serve` and `mesh402 client`: start a node (flags -> NodeConfig), fail cleanly before
it announces itself, print the invite token once it is in the mesh."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from mesh402 import __version__
from mesh402.cli.common import HomeOpt, console, err, fail, read_token_file
from mesh402.cli.options import (
    DPANEL,
    AllowHostOpt,
    AutoIntervalOpt,
    AutoOpt,
    BindIpOpt,
    BindPortOpt,
    ConsoleAllOpt,
    ConsoleOpt,
    ConsoleTokenOpt,
    InviteExpiresOpt,
    JoinFileOpt,
    JoinOpt,
    LanOpt,
    MeshFastOpt,
    MeshNameOpt,
    NameOpt,
    NoModelOpt,
    NostrRefreshOpt,
    NostrRelayOpt,
    NostrTtlOpt,
    PolicyOpt,
    PrivateOpt,
    PublishOpt,
    RegionOpt,
    RelayOpt,
    ValidatorIdOpt,
    node_ids,
)
from mesh402.home import read_secret_file, resolve_home
from mesh402.mesh import invite
from mesh402.mesh.invite import InviteError
from mesh402.mesh.membership import Membership
from mesh402.mesh.errors import JoinError
from mesh402.models.catalog import BUNDLED_MODEL_ID, ModelNotFound, resolve_model
from mesh402.node.mesh_runtime import ConsoleError, console_token_path
from mesh402.node.node import Node
from mesh402.node.startup import StartupError, preflight
from mesh402.settings import (
    DEFAULT_API_PORT,
    DEFAULT_CONSOLE_PORT,
    MeshSettings,
    NodeConfig,
    load_api_key,
)

if TYPE_CHECKING:
    from mesh402.home import HomeLock
    from mesh402.models.catalog import ModelSource
    from mesh402.settings import NodeConfig


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
    max_batch: Annotated[int, typer.Option(help="Decode rows per batched step of a model served whole here (continuous batching), and per engine call on a pipeline stage this node hosts or runs (the sessions' rows of a split); each row's answer is bit-identical to running alone. 1: requests take turns.")] = 8,
    max_kv_mb: Annotated[Optional[float], typer.Option(help="KV memory of all sessions of a model, in MB (1e6 bytes); a request whose prompt + max_tokens would pass it gets 503 + Retry-After instead of memory (default: no cap beyond --max-sessions).")] = None,
    speculative: Annotated[str, typer.Option(help="Speculative decoding: 'ngram' (prompt-lookup drafts verified in one step, on a split in one round trip through the stages; the output equals plain decoding token for token) or 'none'.")] = "none",
    draft_tokens: Annotated[int, typer.Option(help="With --speculative ngram: at most this many drafts verified per step (each request drafts as many as its acceptance rate pays for, none when none pays).")] = 4,
    step_tokens: Annotated[int, typer.Option(help="Prompt rows prefilled per batched step, between the running streams' decode rows (a long prompt never stalls them longer; fast mode counts a prompt's tokens, exact mode its padded 32-row chunks).")] = 128,
    max_vram: Annotated[Optional[float], typer.Option(help="Weight budget in GB (1e9 bytes, e.g. 0.08); a model larger than the budget is split across nodes.")] = None,
    max_split_rtt: Annotated[float, typer.Option(help="Peers with a higher RTT (ms) never hold a stage of a split.")] = 80.0,
    wire_dtype: Annotated[str, typer.Option(help="Activations between stages: f32 (bit-exact), f16 or bf16.")] = "f32",
    standby: Annotated[bool, typer.Option("--standby", help="Serve no model until the mesh's demand asks for one on this node's disk.")] = False,
    session_idle_timeout: Annotated[float, typer.Option("--session-idle-timeout", help="Seconds a stage of a split (or an expert node) waits for the next step of an open session before it closes the session and frees its memory.")] = 120.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    trace_hops: Annotated[Optional[Path], typer.Option("--trace-hops", help="Append a timestamp line to this file at each hand-off of each split step this node hosts or serves (send, arrival, engine call, reply): where a hop's time goes (benchmarks/split.py --trace).")] = None,
    join: JoinOpt = None,
    join_file: JoinFileOpt = None,
    relay: RelayOpt = None,
    console_port: ConsoleOpt = None,
    console_listen_all: ConsoleAllOpt = False,
    console_token_file: ConsoleTokenOpt = None,
    bind_ip: BindIpOpt = "0.0.0.0",
    bind_port: BindPortOpt = 0,
    mesh_policy: PolicyOpt = "secret",
    invite_expires: InviteExpiresOpt = "24h",
    name: NameOpt = "",
    no_model: NoModelOpt = False,
    mesh_fast_timers: MeshFastOpt = False,
    publish: PublishOpt = False,
    private: PrivateOpt = False,
    auto: AutoOpt = False,
    mesh_name: MeshNameOpt = "",
    region: RegionOpt = "",
    nostr_relay: NostrRelayOpt = None,
    nostr_ttl: NostrTtlOpt = 120.0,
    nostr_refresh: NostrRefreshOpt = 60.0,
    auto_interval: AutoIntervalOpt = 20.0,
    discover_lan: LanOpt = False,
    discover_registry: Annotated[Optional[str], typer.Option("--discover-registry", help="Find meshes through ERC-8004 registered nodes (their node binding verified) and join the best open one: a deployment.json, a network name, or RPC_URL,REGISTRY.", rich_help_panel=DPANEL)] = None,
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
    max_exposure: Annotated[Optional[str], typer.Option("--max-exposure", help="Most USDC one wallet may have authorized for requests in flight here (a stream's tokens go out before it settles; default: 4 requests' worth).", rich_help_panel="Payments")] = None,
    epoch_seconds: Annotated[int, typer.Option("--epoch-seconds", help="Payout epoch: the stages' work receipts of split requests are grouped (and paid, automatically with --payout-key-file, else with `mesh402 payout`) per this many seconds.", rich_help_panel="Payments")] = 3600,
    payout_key_file: Annotated[Optional[Path], typer.Option("--payout-key-file", help="File (0600) with the key of the --pay-to wallet (or env MESH402_PAYOUT_KEY): a paid entry then pays each epoch automatically once it ends (plus a grace of min(60 s, epoch/4)): validation round, Merkle root published, claims sent.", rich_help_panel="Payments")] = None,
    rewards: Annotated[Optional[str], typer.Option("--rewards", help="EpochRewards contract for automatic payouts (default: the deployment's).", rich_help_panel="Payments")] = None,
    owner_key_file: Annotated[Optional[Path], typer.Option("--owner-key-file", help="File (0600) with this node's EVM owner key (the one `mesh402 register` used; or env MESH402_OWNER_KEY): lets the node request ERC-8004 validation of its own work, which payouts require.", rich_help_panel="Trust")] = None,
    validator: Annotated[bool, typer.Option("--validator", help="Re-execute other nodes' audited steps on this node's copy of the model and answer their validation requests on chain (needs --owner-key-file and --deployment/--network).", rich_help_panel="Trust")] = False,
    backend: Annotated[Optional[list[str]], typer.Option("--backend", help="An OpenAI-compatible server (its base URL, e.g. http://127.0.0.1:8000/v1) whose models this node answers too, unverified. Repeatable.", rich_help_panel="Backends")] = None,
    backend_key_file: Annotated[Optional[Path], typer.Option("--backend-key-file", help="File (mode 0600) holding the backends' API key; or set MESH402_BACKEND_KEY.", rich_help_panel="Backends")] = None,
    escrow: Annotated[bool, typer.Option("--escrow", help="Pay the stages this node uses, and be paid for stage work, with escrow vouchers as the work is done (MeshEscrow of --deployment; needs --pay-to and --payout-key-file; epoch payouts stay off). A worker refuses (`unpaid`) an entry that falls behind or whose escrow does not cover it.", rich_help_panel="Payments")] = False,
    escrow_float: Annotated[Optional[str], typer.Option("--escrow-float", help="With --escrow, as an entry: keep each worker's escrow channel this many USDC above what it vouchered, locking top-ups from the escrow account's free balance (fund it with `mesh402 escrow deposit`); without it, floats are locked by hand (`mesh402 escrow lock`).", rich_help_panel="Payments")] = None,
    redeem_every: Annotated[float, typer.Option("--redeem-every", help="With --escrow: seconds between redemptions of the vouchers held (sooner when an entry asks for its float back).", rich_help_panel="Payments")] = 300.0,
    auto_backends: Annotated[bool, typer.Option("--auto-backends", help="Let model \"auto\" on this node pick backend models (unverified: nobody can spot-check them): other nodes' and, for chat completions, this node's own --backend models. Off by default (a client may opt in per request with the header x-mesh402-auto-backends: true); naming a backend model always routes to it.", rich_help_panel="Backends")] = False,
    quorum: Annotated[bool, typer.Option("--quorum", help="Spot checks are decided by the staked validator quorum (SpotCheckQuorum of --deployment) instead of one named validator: an entry opens a check per paid stage node and epoch (its report bond is paid from the owner key); with --validator, this node votes on the checks it is drawn for (its agent must be staked and registered with `mesh402 validator register`). A failed check slashes the stage's stake.", rich_help_panel="Trust")] = False,
    audit_rate: Annotated[float, typer.Option("--audit-rate", help="Entry: share of paid split requests whose stages must reveal a step for re-execution (each node's first request per epoch is always audited).", rich_help_panel="Trust")] = 0.1,
    validator_id: ValidatorIdOpt = None,
    allow_host: AllowHostOpt = None,
    min_stake: Annotated[Optional[str], typer.Option("--min-stake", help="Give layers, experts and routed requests only to peers whose ERC-8004 agent (bound to the node with `mesh402 register`) has at least this many USDC staked in MeshStaking of --deployment (`mesh402 stake add`), and at least the mesh's own on-chain minimum: a node with nothing at risk gets no paid work. Stake is read on chain in the background: a peer not read yet waits (about 10 s), and one that unstakes loses its work within --stake-recheck.", rich_help_panel="Trust")] = None,
    stake_recheck: Annotated[float, typer.Option("--stake-recheck", help="With --min-stake: seconds between reads of a staked peer's stake (a peer that unstakes loses its layers, experts and routes within this time; unbonding stake stays slashable meanwhile).", rich_help_panel="Trust")] = 60.0,
) -> None:
    """Start a node: load models and serve the OpenAI-compatible API."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if trace_hops is not None:
        from mesh402.serving.hop_trace import enable  # lazy: keeps `mesh402 --help` light

        enable(trace_hops)
    if mode not in ("fast", "exact"):
        fail("--mode must be 'fast' or 'exact'")
    if wire_dtype not in ("f32", "f16", "bf16"):
        fail("--wire-dtype must be f32, f16 or bf16")
    if max_vram is not None and max_vram <= 0:
        fail("--max-vram must be a positive number of GB")
    if session_idle_timeout <= 0:
        fail("--session-idle-timeout must be a positive number of seconds")
    try:
        sources = [resolve_model(m) for m in (model or [BUNDLED_MODEL_ID])]
        api_key = load_api_key(api_key_file)
        from mesh402.cli.payment_flags import payments_config  # lazy: kept off this module's import path
        payments = payments_config(price=price, price_per_1k=price_per_1k,
                                   pay_to=pay_to if (price or price_per_1k or not escrow) else None, facilitator=facilitator,
                                   network=network, deployment=deployment, asset=asset, asset_name=asset_name,
                                   asset_version=asset_version, credit_topup=credit_topup,
                                   max_exposure=max_exposure)
        if epoch_seconds <= 0:
            raise ValueError("--epoch-seconds must be positive")
        payments.epoch_s = epoch_seconds
        from mesh402.cli.payment_flags import trust_config  # lazy: kept off this module's import path
        trust = trust_config(network=network, deployment=deployment, owner_key_file=owner_key_file,
                             validator=validator, audit_rate=audit_rate, quorum=quorum, min_stake=min_stake)
        if stake_recheck <= 0:
            raise ValueError("--stake-recheck must be a positive number of seconds")
        trust.stake_recheck_s = stake_recheck
        trust.validator_ids = node_ids(validator_id, "--validator-id")
        trust.allow_hosts = node_ids(allow_host, "--allow-host")
        from mesh402.cli.payment_flags import auto_payout_config  # lazy: kept off this module's import path
        if escrow:
            from mesh402.cli.payment_flags import escrow_config  # lazy: kept off this module's import path
            escrow_config(payments, pay_to=pay_to, payout_key_file=payout_key_file, deployment=deployment,
                          redeem_every_s=redeem_every, escrow_float=escrow_float)
        else:
            auto_payout_config(payments, trust, payout_key_file=payout_key_file, rewards=rewards, deployment=deployment)
        backend_key = load_backend_key(backend, backend_key_file)
    except (ModelNotFound, ValueError) as e:
        fail(str(e))
    if no_model:
        sources = []
    config = NodeConfig(home=resolve_home(home), models=[s.model_id for s in sources],
                        host="0.0.0.0" if listen_all else "127.0.0.1", port=port, api_key=api_key,
                        device=device, mode=mode, threads=threads, payments=payments, trust=trust)  # type: ignore[arg-type]
    config.limits.max_sessions = max_sessions
    if max_batch < 1 or step_tokens < 1:
        fail("--max-batch and --step-tokens must be >= 1")
    config.limits.max_batch, config.limits.step_tokens = max_batch, step_tokens
    if speculative not in ("none", "ngram") or not 1 <= draft_tokens <= 16:
        fail("--speculative is 'ngram' or 'none'; --draft-tokens in [1, 16]")
    config.limits.draft_tokens = draft_tokens if speculative == "ngram" else 0
    if max_kv_mb is not None:
        if max_kv_mb <= 0:
            fail("--max-kv-mb must be > 0")
        config.limits.max_kv_bytes = int(max_kv_mb * 1e6)
    config.max_vram_gb, config.max_split_rtt_ms, config.wire_dtype = max_vram, max_split_rtt, wire_dtype  # type: ignore[assignment]
    config.standby = standby
    config.backends, config.backend_key = list(backend or []), backend_key
    config.auto_backends = auto_backends
    config.timers.stage_idle_s = session_idle_timeout
    config.mesh = settings_from_flags(
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
    lock = preflight_or_fail(config, sources, search_api_port="--port" not in sys.argv and (auto or publish))
    if config.port != port:
        err.print(f"API port {port} is busy; using {config.port}", highlight=False)
        port = config.port

    node = Node(config, sources, home_lock=lock)
    node.on_mesh_ready = print_ready
    console.print(f"mesh402 {__version__} node: OpenAI API on [bold]http://{'0.0.0.0' if listen_all else '127.0.0.1'}:{port}/v1[/]"
                  f"  models: {', '.join(config.models)}  home: {config.home}", highlight=False)
    if api_key:
        console.print("API key required (Authorization: Bearer …)")
    if payments.escrow:
        console.print(f"escrow vouchers: wallet {payments.pay_to}, MeshEscrow {payments.escrow}", highlight=False)
    if payments.enabled:
        console.print(f"x402: {price or 0} USDC/request + {price_per_1k or 0} USDC/1k tokens on {payments.network}, "
                      f"pay to {payments.pay_to}, facilitator {payments.facilitator_url}", highlight=False)
        if payments.auto_payout:
            console.print(f"automatic payouts: every {payments.epoch_s} s epoch, {payments.grace_s:g} s after it ends, "
                          f"from {payments.pay_to} through EpochRewards {payments.rewards}", highlight=False)
    run_node(node)


def client_cmd(
    join: JoinOpt = None,
    join_file: JoinFileOpt = None,
    port: Annotated[int, typer.Option(help="OpenAI-compatible API port of this client node.")] = 9337,
    home: HomeOpt = None,
    relay: RelayOpt = None,
    console_port: ConsoleOpt = None,
    console_listen_all: ConsoleAllOpt = False,
    console_token_file: ConsoleTokenOpt = None,
    bind_ip: BindIpOpt = "0.0.0.0",
    bind_port: BindPortOpt = 0,
    invite_expires: InviteExpiresOpt = "24h",
    name: NameOpt = "",
    mesh_fast_timers: MeshFastOpt = False,
    auto: AutoOpt = False,
    nostr_relay: NostrRelayOpt = None,
    mesh_name: MeshNameOpt = "",
    discover_lan: LanOpt = False,
    allow_host: AllowHostOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Join a mesh as an API-only node that serves no model (--join TOKEN, or --auto to find one)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        allowed = node_ids(allow_host, "--allow-host")
    except ValueError as e:
        fail(str(e))

    h = resolve_home(home)
    settings = settings_from_flags(home=h, kind="client", join=join, join_file=join_file, relay=relay,
                                   console_port=console_port, console_listen_all=console_listen_all,
                                   console_token_file=console_token_file, bind_ip=bind_ip, bind_port=bind_port,
                                   policy="secret", invite_expires=invite_expires, name=name,
                                   fast_timers=mesh_fast_timers, auto=auto, nostr_relays=nostr_relay,
                                   mesh_name=mesh_name, discover_lan=discover_lan)
    config = NodeConfig(home=h, models=[], host="127.0.0.1", port=port, mesh=settings)
    config.trust.allow_hosts = allowed
    lock = preflight_or_fail(config, [])

    node = Node(config, [], home_lock=lock)
    node.on_mesh_ready = print_ready
    console.print(f"mesh402 client node: API on http://127.0.0.1:{port}/v1 (no local model)  home: {h}", highlight=False)
    run_node(node)


def settings_from_flags(
    *,
    home: Path,
    kind: str,
    join: Optional[list[str]],
    join_file: Optional[Path],
    relay: Optional[str],
    console_port: Optional[int],
    console_listen_all: bool,
    console_token_file: Optional[Path],
    bind_ip: str,
    bind_port: int,
    policy: str,
    invite_expires: str,
    name: str,
    fast_timers: bool,
    publish: bool = False,
    private: bool = False,
    auto: bool = False,
    mesh_name: str = "",
    region: str = "",
    nostr_relays: Optional[list[str]] = None,
    nostr_ttl: float = 120.0,
    nostr_refresh: float = 60.0,
    auto_interval: float = 20.0,
    policy_explicit: bool = False,
    discover_lan: bool = False,
) -> MeshSettings:
    """Validate mesh flags; a bad token or flag exits with one line."""

    tokens = list(join or [])
    if join_file is not None:
        tokens.append(read_token_file(join_file, "--join-file"))
    member = Membership.load(home) if Path(home).is_dir() else None  # not a directory: preflight says so
    for t in tokens:
        try:
            tok = invite.decode_token(t)
            if not (member and member.mesh_id == tok.mesh_id and member.is_member):
                invite.check_expiry(tok.credential)
        except invite.InviteError as e:
            fail(str(e))
    if policy not in ("secret", "open"):
        fail("--mesh-policy must be 'secret' or 'open'")
    if private and not publish:
        fail("--private only applies with --publish")
    if auto and tokens:
        fail("--auto and --join exclude each other")
    if private and policy_explicit and policy == "open":
        fail("--private conflicts with --mesh-policy open")
    if publish and not policy_explicit:
        policy = "secret" if private else "open"  # a published mesh is public unless --private
    if nostr_ttl <= 0 or nostr_refresh <= 0 or auto_interval <= 0:
        fail("discovery timers must be positive")
    try:
        expires = invite.parse_duration(invite_expires)
    except ValueError as e:
        fail(f"--invite-expires: {e}")
    token = None
    if console_token_file is not None:
        try:
            token = read_secret_file(console_token_file)
        except ValueError as e:
            fail(str(e))
    else:
        token = os.environ.get("MESH402_CONSOLE_TOKEN", "").strip() or None
    if console_listen_all and not token:
        fail("--console-listen-all needs a console token: --console-token-file FILE (mode 0600) or MESH402_CONSOLE_TOKEN")
    if kind == "client" and not tokens and not auto and not (member and member.is_member):
        fail("a client node needs --join TOKEN (ask a member: mesh402 invite) or --auto")
    return MeshSettings(
        join=tokens,
        kind=kind,
        relay_url=relay,
        bind_ip=bind_ip,
        bind_port=bind_port,
        console_port=DEFAULT_CONSOLE_PORT if console_port is None else console_port,
        console_port_explicit=console_port is not None,
        console_listen_all=console_listen_all,
        console_token=token,
        policy=policy,
        invite_expires=expires,
        name=name or socket.gethostname(),
        fast_timers=fast_timers,
        publish=publish,
        private=private,
        auto=auto,
        mesh_name=mesh_name,
        region=region,
        nostr_relays=list(nostr_relays or []),
        nostr_ttl=nostr_ttl,
        nostr_refresh=nostr_refresh,
        auto_interval=auto_interval,
        discover_lan=discover_lan,
    )


def mesh_errors() -> tuple[type[BaseException], ...]:

    return (InviteError, JoinError, ConsoleError)


def preflight_or_fail(config: NodeConfig, sources: list[ModelSource], *, search_api_port: bool = False) -> HomeLock:
    """startup.preflight (home lock, keys, models, ports), or one line and exit 2: a node that cannot
    start says so before it announces itself anywhere or prints a token."""

    try:
        return preflight(config, sources, search_api_port=search_api_port)
    except StartupError as e:
        fail(str(e))
        raise  # unreachable: _fail exits


def print_ready(rt) -> None:
    """Called by the node once it is in the mesh: print the invite token."""
    mesh = rt.mesh
    peers = len(mesh.connected_peers())
    what = f"joined mesh {mesh.mesh_id[:12]} ({peers} peer{'s' if peers != 1 else ''})" if mesh.joined_at else f"mesh {mesh.mesh_id[:12]}"
    console.print(
        f"node {mesh.node_id.hex()[:12]}: {what}, policy {mesh.membership.policy_name}; "
        f"console http://{rt.console_host}:{rt.console_port}/ (log in with the token in "
        f"{console_token_path(rt.node.config.home)})",
        highlight=False, soft_wrap=True,
    )
    console.print("invite token (share it to let another machine join):", highlight=False)
    print(mesh.invite_token, flush=True)


def run_node(node) -> None:
    errors = mesh_errors()
    try:
        asyncio.run(node.run())
    except KeyboardInterrupt:
        pass
    except errors as e:
        fail(str(e))


def load_backend_key(backends: list[str] | None, key_file: Path | None) -> str | None:
    """The backends' API key: a 0600 file or MESH402_BACKEND_KEY, never argv; each URL must be http(s)."""
    for url in backends or []:
        if not url.startswith(("http://", "https://")) or len(url) > 2048:
            raise ValueError(f"--backend {url!r}: give the server's http(s) base URL, e.g. http://127.0.0.1:8000/v1")
    if key_file is not None:
        return read_secret_file(key_file)
    return os.environ.get("MESH402_BACKEND_KEY", "").strip() or None
