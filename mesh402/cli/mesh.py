"""Mesh parts of the command line: flags shared by `serve` and `client`, and the
`client`, `invite` and `status` commands (registered on the main app by
:func:`register`). Subcommands find the running node through ``--home``: the
node records its console port in ``<home>/node.json``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from mesh402.settings import DEFAULT_CONSOLE_PORT, MeshSettings

if TYPE_CHECKING:
    from mesh402.settings import NodeConfig
    from mesh402.home import HomeLock
    from mesh402.models.catalog import ModelSource

console = Console()
err = Console(stderr=True)

PANEL = "Mesh"

JoinOpt = Annotated[Optional[list[str]], typer.Option("--join", "-j", help="Invite token of a mesh member (repeatable).", rich_help_panel=PANEL)]
JoinFileOpt = Annotated[Optional[Path], typer.Option("--join-file", help="File holding an invite token.", rich_help_panel=PANEL)]
RelayOpt = Annotated[Optional[str], typer.Option("--relay", help="iroh relay URL (online meshes); default: no relay, direct addresses only.", rich_help_panel=PANEL)]
ConsoleOpt = Annotated[Optional[int], typer.Option("--console", help=f"Management API port (default {DEFAULT_CONSOLE_PORT}).", rich_help_panel=PANEL)]
ConsoleAllOpt = Annotated[bool, typer.Option("--console-listen-all", help="Serve the management API on all interfaces (needs a console token).", rich_help_panel=PANEL)]
ConsoleTokenOpt = Annotated[Optional[Path], typer.Option("--console-token-file", help="File (0600) with the console token; or set MESH402_CONSOLE_TOKEN.", rich_help_panel=PANEL)]
BindIpOpt = Annotated[str, typer.Option("--bind-ip", help="Mesh (QUIC/UDP) bind address.", rich_help_panel=PANEL)]
BindPortOpt = Annotated[int, typer.Option("--bind-port", help="Mesh (QUIC/UDP) port; 0 = ephemeral.", rich_help_panel=PANEL)]
PolicyOpt = Annotated[str, typer.Option("--mesh-policy", help="Admission for a new mesh: 'secret' (invite tokens) or 'open' (public).", rich_help_panel=PANEL)]
InviteExpiresOpt = Annotated[str, typer.Option("--invite-expires", help="Lifetime of the token printed at start (e.g. 1h, 7d).", rich_help_panel=PANEL)]
NameOpt = Annotated[str, typer.Option("--name", help="Human label for this node (default: hostname).", rich_help_panel=PANEL)]
MeshFastOpt = Annotated[bool, typer.Option("--mesh-fast-timers", hidden=True)]
NoModelOpt = Annotated[bool, typer.Option("--no-model", hidden=True, help="Serve no model (mesh tests).")]

DPANEL = "Discovery"
PublishOpt = Annotated[bool, typer.Option("--publish", help="List this mesh on Nostr (open, with a public invite, unless --private).", rich_help_panel=DPANEL)]
PrivateOpt = Annotated[bool, typer.Option("--private", help="With --publish: list the mesh without an invite; joining needs a token.", rich_help_panel=DPANEL)]
AutoOpt = Annotated[bool, typer.Option("--auto", help="Join the best mesh listed on Nostr, or start (and publish) one.", rich_help_panel=DPANEL)]
MeshNameOpt = Annotated[str, typer.Option("--mesh-name", help="Mesh name: a deterministic mesh id (name + Nostr key); --auto joins only this name.", rich_help_panel=DPANEL)]
RegionOpt = Annotated[str, typer.Option("--region", help="Region shown in the listing (e.g. eu-west).", rich_help_panel=DPANEL)]
NostrRelayOpt = Annotated[Optional[list[str]], typer.Option("--nostr-relay", help="Nostr relay URL (repeatable).", rich_help_panel=DPANEL)]
NostrTtlOpt = Annotated[float, typer.Option("--nostr-ttl", hidden=True)]
NostrRefreshOpt = Annotated[float, typer.Option("--nostr-refresh", hidden=True)]
AutoIntervalOpt = Annotated[float, typer.Option("--auto-interval", hidden=True)]
LanOpt = Annotated[bool, typer.Option("--discover-lan", help="Announce and find meshes on the local network (mDNS); never the invite secret.", rich_help_panel=DPANEL)]

HomeOpt = Annotated[Optional[Path], typer.Option("--home", help="Node state directory, one running node per home (env MESH402_HOME; default ~/.mesh402).")]


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def mesh_errors() -> tuple[type[BaseException], ...]:
    from mesh402.mesh.invite import InviteError
    from mesh402.mesh.service import JoinError
    from mesh402.node.mesh_runtime import ConsoleError

    return (InviteError, JoinError, ConsoleError)


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
    from mesh402.home import read_secret_file
    from mesh402.mesh import invite
    from mesh402.mesh.membership import Membership

    tokens = list(join or [])
    if join_file is not None:
        tokens.append(_read_token_file(join_file, "--join-file"))
    member = Membership.load(home) if Path(home).is_dir() else None  # not a directory: preflight says so
    for t in tokens:
        try:
            tok = invite.decode_token(t)
            if not (member and member.mesh_id == tok.mesh_id and member.is_member):
                invite.check_expiry(tok.credential)
        except invite.InviteError as e:
            _fail(str(e))
    if policy not in ("secret", "open"):
        _fail("--mesh-policy must be 'secret' or 'open'")
    if private and not publish:
        _fail("--private only applies with --publish")
    if auto and tokens:
        _fail("--auto and --join exclude each other")
    if private and policy_explicit and policy == "open":
        _fail("--private conflicts with --mesh-policy open")
    if publish and not policy_explicit:
        policy = "secret" if private else "open"  # a published mesh is public unless --private
    if nostr_ttl <= 0 or nostr_refresh <= 0 or auto_interval <= 0:
        _fail("discovery timers must be positive")
    try:
        expires = invite.parse_duration(invite_expires)
    except ValueError as e:
        _fail(f"--invite-expires: {e}")
    token = None
    if console_token_file is not None:
        try:
            token = read_secret_file(console_token_file)
        except ValueError as e:
            _fail(str(e))
    else:
        token = os.environ.get("MESH402_CONSOLE_TOKEN", "").strip() or None
    if console_listen_all and not token:
        _fail("--console-listen-all needs a console token: --console-token-file FILE (mode 0600) or MESH402_CONSOLE_TOKEN")
    if kind == "client" and not tokens and not auto and not (member and member.is_member):
        _fail("a client node needs --join TOKEN (ask a member: mesh402 invite) or --auto")
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


def preflight_or_fail(config: NodeConfig, sources: list[ModelSource], *, search_api_port: bool = False) -> HomeLock:
    """startup.preflight (home lock, keys, models, ports), or one line and exit 2: a node that cannot
    start says so before it announces itself anywhere or prints a token."""
    from mesh402.node.startup import StartupError, preflight

    try:
        return preflight(config, sources, search_api_port=search_api_port)
    except StartupError as e:
        _fail(str(e))
        raise  # unreachable: _fail exits


def print_ready(rt) -> None:
    """Called by the node once it is in the mesh: print the invite token."""
    mesh = rt.mesh
    peers = len(mesh.connected_peers())
    what = f"joined mesh {mesh.mesh_id[:12]} ({peers} peer{'s' if peers != 1 else ''})" if mesh.joined_at else f"mesh {mesh.mesh_id[:12]}"
    console.print(
        f"node {mesh.node_id.hex()[:12]}: {what}, policy {mesh.membership.policy_name}; "
        f"console http://{rt.console_host}:{rt.console_port}",
        highlight=False, soft_wrap=True,
    )
    console.print("invite token (share it to let another machine join):", highlight=False)
    print(mesh.invite_token, flush=True)


# ------------------------------------------------------------------ finding the running node


def _find_console(home: Optional[Path]) -> tuple[str, dict[str, str], dict]:
    from mesh402.home import Home, resolve_home
    from mesh402.node.mesh_runtime import read_console_token

    h = Home(resolve_home(home))
    state = h.read_state()
    if state is None:
        _fail(f"no node running with home {h.path} (start one with: mesh402 serve --home {h.path})")
    pid = state.get("pid")
    if isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _fail(f"the node recorded in {h.path / 'node.json'} (pid {pid}) is not running")
        except PermissionError:
            pass
    port = (state.get("mesh") or {}).get("console_port")
    if not port:
        _fail(f"the node with home {h.path} runs no mesh console")
    headers = {}
    tok = read_console_token(h.path)
    if tok:
        headers["Authorization"] = f"Bearer {tok}"
    return f"http://127.0.0.1:{port}", headers, state


def _get(url: str, headers: dict[str, str]) -> Any:
    import httpx

    try:
        r = httpx.get(url, headers=headers, timeout=10.0)
    except httpx.HTTPError as e:
        _fail(f"cannot reach the node's console at {url}: {e}")
    if r.status_code != 200:
        _fail(f"{url}: HTTP {r.status_code} {r.text[:200]}")
    return r.json()


# ------------------------------------------------------------------ rendering


def _fmt_bytes(n: int) -> str:
    if not n:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return str(n)


def _hw(h: dict) -> str:
    parts = [h.get("device_kind") or "?"]
    if h.get("gpu_name"):
        parts.append(h["gpu_name"])
    if h.get("vram_bytes"):
        parts.append(f"VRAM {_fmt_bytes(h['vram_bytes'])}")
    if h.get("ram_bytes"):
        parts.append(f"RAM {_fmt_bytes(h['ram_bytes'])}")
    return ", ".join(parts)


def _models(ann: Optional[dict]) -> str:
    if not ann:
        return "-"
    ms = ann.get("models") or []
    return ", ".join(f"{m['model_id']} ({m['role']})" for m in ms) or "-"


def render_status(st: dict) -> None:
    me = st.get("self") or {}
    node = st.get("node") or {}
    console.print(
        f"[bold]node[/] {st['node_id'][:12]}  [bold]kind[/] {st.get('kind')}  [bold]mesh[/] {st.get('mesh_id')}  "
        f"[bold]policy[/] {st.get('policy')}  [bold]uptime[/] {st.get('uptime_s', 0):.0f}s",
        highlight=False,
    )
    if node:
        console.print(f"api {node.get('api_url')}  console port {node.get('console_port')}  pid {node.get('pid')}", highlight=False)
    console.print(f"mesh addrs {', '.join(st.get('addrs') or [])}", highlight=False)
    if st.get("invite_token"):
        console.print("invite token:", highlight=False)
        console.print(st["invite_token"], highlight=False, soft_wrap=True)

    t = Table(title=f"Peers ({len(st.get('peers') or [])})", title_justify="left")
    for col in ("node", "name", "kind", "state", "RTT ms", "API port", "models", "hardware", "version"):
        t.add_column(col)
    for p in st.get("peers") or []:
        a = p.get("announcement") or {}
        rtt = p.get("rtt_ms")
        state = p.get("state", "?")
        color = {"alive": "green", "suspect": "yellow", "down": "red", "left": "dim"}.get(state, "")
        t.add_row(
            p["node_id"][:12],
            a.get("name") or "",
            a.get("kind") or "?",
            f"[{color}]{state}[/]" if color else state,
            f"{rtt:.2f}" if rtt is not None else "-",
            str(a.get("api_port") or "-"),
            _models(a),
            _hw(a.get("hardware") or {}),
            a.get("version") or "",
        )
    console.print(t)

    models = me.get("models") or []
    if models:
        mt = Table(title="Models on this node", title_justify="left")
        for col in ("model", "role", "ready", "layers", "size", "arch", "content hash"):
            mt.add_column(col)
        for m in models:
            mt.add_row(m["model_id"], m["role"], "yes" if m.get("ready") else "no", str(m.get("n_layers") or "-"),
                       _fmt_bytes(m.get("size_bytes") or 0), m.get("architecture") or "", (m.get("content_hash") or "")[:16])
        console.print(mt)
    render_plans(st)
    counters = st.get("counters") or {}
    bad = {k: v for k, v in counters.items() if v and (".rejected." in k or k.startswith("frame.") or k in (
        "gossip.forged", "gossip.replayed", "gossip.stale", "gossip.wrong_mesh", "gossip.malformed", "gossip.forged_sender"))}
    if bad:
        console.print("rejected/dropped: " + ", ".join(f"{k}={v}" for k, v in sorted(bad.items())), highlight=False)


def render_plans(st: dict) -> None:
    """Each model's plan as its host published it: who holds which layers, bytes held and sent."""
    dist = (st.get("node") or {}).get("distributed") or {}
    plans = dist.get("plans") or {}
    if not plans:
        return
    t = Table(title="Model plans (who holds which layers / experts; * = replicated)", title_justify="left")
    for col in ("model", "epoch", "state", "stage", "node", "layers", "tensor bytes", "activations sent"):
        t.add_column(col, no_wrap=col in ("layers", "stage"))
    for key, p in sorted(plans.items()):
        model = key.rsplit("@", 1)[0]
        state = "ready" if p.get("ready") else f"waiting: {p.get('waiting', '')}"
        links = p.get("links") or {}
        stages = p.get("stages") or []
        if p.get("kind") == "experts":  # MoE expert parallel: the trunk on the host, experts by node
            ex = p.get("experts") or {}
            repl = {tuple(x) for x in p.get("replicated") or []}
            for i, (node_id, _s, _e, nbytes) in enumerate(stages):
                per = ex.get(node_id) or {}
                held = "; ".join(f"L{la}: " + ",".join(f"{e}*" if (int(la), e) in repl else str(e) for e in es)
                                 for la, es in sorted(per.items(), key=lambda kv: int(kv[0]))) or "-"
                sent = links.get(next((k for k in links if k.endswith(node_id[:8])), ""), 0)
                t.add_row(model if i == 0 else "", str(p.get("epoch")) if i == 0 else "", state if i == 0 else "",
                          "host+experts" if node_id == p.get("host") else "experts", node_id[:12],
                          ("trunk; " if node_id == p.get("host") else "") + held, _fmt_bytes(nbytes),
                          _fmt_bytes(sent) if node_id != p.get("host") else "-")
            continue
        if not stages:
            t.add_row(model, str(p.get("epoch", "-")), state, "-", (p.get("host") or "")[:12], "-", "-", "-")
        for i, (node_id, start, end, nbytes) in enumerate(stages):
            sent = "-"
            if i == 0 and len(stages) > 1:
                sent = _fmt_bytes(sum(links.values())) if links else "0 B"
            role = "host" if i == 0 else f"stage {i}"
            t.add_row(model if i == 0 else "", str(p.get("epoch")) if i == 0 else "", state if i == 0 else "",
                      role, node_id[:12], f"[{start}, {end})", _fmt_bytes(nbytes), sent)
    console.print(t)


# ------------------------------------------------------------------ commands


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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Join a mesh as an API-only node that serves no model (--join TOKEN, or --auto to find one)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mesh402.settings import NodeConfig
    from mesh402.home import resolve_home

    h = resolve_home(home)
    settings = settings_from_flags(home=h, kind="client", join=join, join_file=join_file, relay=relay,
                                   console_port=console_port, console_listen_all=console_listen_all,
                                   console_token_file=console_token_file, bind_ip=bind_ip, bind_port=bind_port,
                                   policy="secret", invite_expires=invite_expires, name=name,
                                   fast_timers=mesh_fast_timers, auto=auto, nostr_relays=nostr_relay,
                                   mesh_name=mesh_name, discover_lan=discover_lan)
    config = NodeConfig(home=h, models=[], host="127.0.0.1", port=port, mesh=settings)
    lock = preflight_or_fail(config, [])
    from mesh402.node.node import Node

    node = Node(config, [], home_lock=lock)
    node.on_mesh_ready = print_ready
    console.print(f"mesh402 client node: API on http://127.0.0.1:{port}/v1 (no local model)  home: {h}", highlight=False)
    run_node(node)


def run_node(node) -> None:
    errors = mesh_errors()
    try:
        asyncio.run(node.run())
    except KeyboardInterrupt:
        pass
    except errors as e:
        _fail(str(e))


def invite_cmd(
    home: HomeOpt = None,
    expires: Annotated[str, typer.Option("--expires", help="Token lifetime, e.g. 30m, 1h, 7d.")] = "1h",
    single_use: Annotated[bool, typer.Option(
        "--single-use", help="The token admits one node, and only this node accepts it.")] = False,
    revoke: Annotated[Optional[Path], typer.Option(
        "--revoke", help="Revoke the token in this file ('-': read it from stdin) mesh-wide instead of minting one; "
        "members it already admitted stay.", metavar="FILE")] = None,
) -> None:
    """Mint an invite token from the running node (printed alone on stdout), or revoke one."""
    import httpx

    from mesh402.mesh.invite import parse_duration

    base, headers, _ = _find_console(home)
    if revoke is not None:
        token = sys.stdin.read().strip() if str(revoke) == "-" else _read_token_file(revoke, "--revoke")
        path, body = "/api/invite/revoke", {"token": token}
    else:
        try:
            parse_duration(expires)
        except ValueError as e:
            _fail(f"--expires: {e}")
        path, body = "/api/invite", {"expires": expires, "single_use": single_use}
    try:
        r = httpx.post(f"{base}{path}", json=body, headers=headers, timeout=10.0)
    except httpx.HTTPError as e:
        _fail(f"cannot reach the node's console at {base}: {e}")
    if r.status_code != 200:
        try:
            msg = r.json().get("error")
        except ValueError:
            msg = r.text[:200]
        _fail(f"{'revoke' if revoke is not None else 'invite'} refused: {msg}")
    d = r.json()
    if revoke is not None:
        said = {"revoked": "revoked mesh-wide", "already revoked": "was already revoked",
                "expired": "has expired already: it admits no one"}[d["state"]]
        print(f"token {d['nonce'][:12]}… {said}", flush=True)
        return
    print(d["token"], flush=True)
    err.print(f"expires {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(d['expires_at']))} (mesh {d['mesh_id'][:12]})"
              + (", single use" if single_use else ""), highlight=False)


def _read_token_file(path: Path, flag: str) -> str:
    """An invite token from a file; a read error exits with one line."""
    try:
        return Path(path).expanduser().read_text().strip()
    except OSError as e:
        _fail(f"cannot read {flag} {path}: {e.strerror or e}")
        raise  # unreachable: _fail exits


def status_cmd(
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw /api/status JSON.")] = False,
) -> None:
    """Show the running node: mesh, peers with RTT, models and roles."""
    base, headers, state = _find_console(home)
    st = _get(f"{base}/api/status", headers)
    if as_json:
        print(json.dumps(st, indent=1))
        return
    render_status(st)
    try:  # payments revenue, when the economics layer is present
        from mesh402.cli.economics import payments_status_lines
    except Exception:
        return
    from mesh402.home import resolve_home

    for line in payments_status_lines(resolve_home(home), st):
        console.print(line, highlight=False)


def register(app: typer.Typer) -> None:
    """Add `client`, `invite` and `status` to the main app (replacing a plainer `status`)."""
    app.registered_commands = [c for c in app.registered_commands
                               if (c.name or getattr(c.callback, "__name__", "")) not in ("status", "client", "invite")]
    app.command("client")(client_cmd)
    app.command("invite")(invite_cmd)
    app.command("status")(status_cmd)
    app.command("discover")(discover_cmd)


# ------------------------------------------------------------------ discover


def discover_cmd(
    nostr_relay: NostrRelayOpt = None,
    model: Annotated[str, typer.Option("--model", help="Only meshes serving or wanting this model.")] = "",
    min_capacity: Annotated[float, typer.Option("--min-capacity", help="Only meshes with at least this many GB of capacity.")] = 0.0,
    mesh_name: Annotated[str, typer.Option("--name", help="Only meshes with this name.")] = "",
    region: Annotated[str, typer.Option("--region", help="Only meshes in this region.")] = "",
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the relays.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the listings as JSON.")] = False,
    lan: Annotated[bool, typer.Option("--lan", help="Look on the local network (mDNS) instead of Nostr.")] = False,
) -> None:
    """List the meshes published on Nostr, or announced on the LAN (open ones carry an invite)."""
    from dataclasses import asdict

    from mesh402.discovery.listing import by_mesh, matches

    try:
        if lan:
            from mesh402.discovery.lan import browse

            listings = asyncio.run(browse(timeout))
        else:
            from mesh402.discovery.nostr import fetch_listings

            listings = asyncio.run(fetch_listings(list(nostr_relay or []), timeout))
    except Exception as e:
        _fail(f"cannot read the {'LAN' if lan else 'Nostr relays'}: {e}")
    found = [x for x in by_mesh(listings).values()
             if matches(x, model=model, min_capacity_bytes=int(min_capacity * 1e9), name=mesh_name, region=region)]
    found.sort(key=lambda x: (-x.node_count, -x.total_capacity_bytes, x.mesh_id))
    if as_json:
        print(json.dumps([asdict(x) for x in found], indent=1))
        return
    if not found:
        console.print("no meshes found", highlight=False)
        return
    t = Table(title=f"Meshes ({len(found)})", title_justify="left")
    for col in ("mesh", "name", "region", "admission", "nodes", "clients", "capacity", "serving", "wanted"):
        t.add_column(col)
    for x in found:
        t.add_row(x.mesh_id[:16], x.name, x.region, "open" if x.is_open else "private (token needed)",
                  str(x.node_count), str(x.client_count), _fmt_bytes(x.total_capacity_bytes),
                  ", ".join(x.serving) or "-", ", ".join(x.wanted) or "-")
    console.print(t)
