"""`mesh402 status`: the running node's mesh, peers, plans, payments and identity."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table

from mesh402.cli.common import HomeOpt, console, console_get, find_console, fmt_bytes
from mesh402.economics.chain import web3_for
from mesh402.economics.erc8004 import ANNOUNCE_LABEL, check_peer_claim, parse_label
from mesh402.economics.ledger import Ledger
from mesh402.home import resolve_home
from mesh402.work.store import ReceiptStore

if TYPE_CHECKING:
    pass


def _hw(h: dict) -> str:
    parts = [h.get("device_kind") or "?"]
    if h.get("gpu_name"):
        parts.append(h["gpu_name"])
    if h.get("vram_bytes"):
        parts.append(f"VRAM {fmt_bytes(h['vram_bytes'])}")
    if h.get("ram_bytes"):
        parts.append(f"RAM {fmt_bytes(h['ram_bytes'])}")
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
                       fmt_bytes(m.get("size_bytes") or 0), m.get("architecture") or "", (m.get("content_hash") or "")[:16])
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
                          ("trunk; " if node_id == p.get("host") else "") + held, fmt_bytes(nbytes),
                          fmt_bytes(sent) if node_id != p.get("host") else "-")
            continue
        if not stages:
            t.add_row(model, str(p.get("epoch", "-")), state, "-", (p.get("host") or "")[:12], "-", "-", "-")
        for i, (node_id, start, end, nbytes) in enumerate(stages):
            sent = "-"
            if i == 0 and len(stages) > 1:
                sent = fmt_bytes(sum(links.values())) if links else "0 B"
            role = "host" if i == 0 else f"stage {i}"
            t.add_row(model if i == 0 else "", str(p.get("epoch")) if i == 0 else "", state if i == 0 else "",
                      role, node_id[:12], f"[{start}, {end})", fmt_bytes(nbytes), sent)
    console.print(t)


def status_cmd(
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw /api/status JSON.")] = False,
) -> None:
    """Show the running node: mesh, peers with RTT, models and roles."""
    base, headers, state = find_console(home)
    st = console_get(f"{base}/api/status", headers)
    if as_json:
        print(json.dumps(st, indent=1))
        return
    render_status(st)
    for line in [*escrow_status_lines(st), *stake_status_lines(st)]:
        console.print(line, highlight=False)
    try:  # payments revenue, when the economics layer is present
        from mesh402.cli.status import payments_status_lines  # lazy: kept off this module's import path
    except Exception:
        return

    for line in payments_status_lines(resolve_home(home), st):
        console.print(line, highlight=False)


def escrow_status_lines(st: dict) -> list[str]:
    """--escrow: this wallet's escrow balance, vouchers held (and the work behind them) per entry, redeemed,
    and what it vouchered to the stages it used."""
    e = ((st.get("node") or {}).get("distributed") or {}).get("escrow")
    if not e:
        return []
    usdc = lambda a: "?" if a is None else f"{int(a) / 1e6:.6f}"  # noqa: E731
    red, wk = e.get("redeemer") or {}, e.get("worker") or {}
    lines = [f"escrow: wallet {e.get('wallet')} on MeshEscrow {e.get('escrow')}, free balance "
             f"{usdc(e.get('escrow_free'))} USDC; redeemed {usdc(red.get('total', 0))} USDC since start"
             + (f" (last {red['last_tx']})" if red.get("last_tx") else "")
             + (f"; redeem error: {red['last_error']}" if red.get("last_error") else "")]
    for entry, v in sorted((e.get("held") or {}).items()):
        lines.append(f"  vouchers held from {entry}: {usdc(v.get('vouchered'))} USDC for {usdc(v.get('owed'))} of work")
    for worker, total in sorted((e.get("issued") or {}).items()):
        lines.append(f"  vouchered to {worker}: {usdc(total)} USDC")
    if wk.get("paused"):
        lines.append(f"  paused entries {wk['paused']} time(s): {wk.get('last_refusal', '')}")
    return lines


def stake_status_lines(st: dict) -> list[str]:
    """--quorum: this node's agent's stake and what quorum checks slashed from it."""
    econ = (st.get("node") or {}).get("economics") or {}
    stake, slashes = econ.get("stake"), econ.get("slashes") or {}
    if not stake:
        return []
    usdc = lambda a: f"{int(a or 0) / 1e6:.6f}"  # noqa: E731
    return [f"stake: agent {stake.get('agent_id')} active {usdc(stake.get('active'))} USDC, unbonding "
            f"{usdc(stake.get('unbonding'))} USDC, {stake.get('open_checks', 0)} open check(s); slashed "
            f"{usdc(slashes.get('as_stage'))} USDC as a stage, {usdc(slashes.get('as_validator'))} USDC as a validator"]


def payments_status_lines(home: Path, status: Optional[dict[str, Any]] = None) -> list[str]:
    """Revenue and credit from the node's payment ledger (read-only; works while the node runs or not),
    then the node's ERC-8004 agent and its peers' identity claims, checked on chain."""
    path = home / "payments.sqlite"
    if not path.exists():
        return ["payments: none (free node, or no paid request yet)"] + identity_status_lines(home, status)
    s = Ledger(path).summary()
    fmt = lambda a: f"{a / 1e6:.6f}"  # noqa: E731
    return [f"payments: {s['settled_payments']} settled, revenue {fmt(s['revenue'])} USDC "
            f"(per-request {fmt(s['revenue_per_request'])}, credit sold {fmt(s['credit_sold'])})",
            f"credit: used {fmt(s['credit_used'])}, outstanding {fmt(s['credit_outstanding'])} USDC; "
            f"in flight {s['in_flight']}, failed settlements {s['failed_settlements']}"] + identity_status_lines(home, status)


def earnings_status_lines(home: Path, *, last_epochs: int = 3) -> list[str]:
    """Epoch payouts this entry node made, per node and epoch (from <home>/receipts.sqlite)."""
    path = home / "receipts.sqlite"
    if not path.exists():
        return []
    st = ReceiptStore(path)
    try:
        rows = st.earnings()
        epochs = sorted({r["epoch"] for r in rows})[-last_epochs:]
        checks = {e: st.validations(e) for e in epochs}
    finally:
        st.close()
    out = []
    for e in epochs:
        parts = []
        for r in (r for r in rows if r["epoch"] == e):
            head = f"{r['node_id'][:12]} "
            if r["account"]:
                parts.append(head + f"{r['amount'] / 1e6:.6f} ({r['units']:.3g} units)")
                continue
            verdict = json.loads((checks[e].get(r["node_id"]) or {}).get("verdict") or "{}")
            why = "failed spot check" if verdict.get("score") == 0 else "no verified agent or passed validation"
            parts.append(head + f"not paid ({why}; {r['amount'] / 1e6:.6f} kept by the entry)")
        out.append(f"earnings epoch {e}: " + ", ".join(parts))
    return out


def _status_w3(info: dict[str, Any] | None, timeout: float) -> Any:
    rpc = os.environ.get("MESH402_RPC_URL") or (info or {}).get("rpcUrl")
    if not rpc:
        return None
    return web3_for(rpc, timeout=timeout)


def identity_status_lines(home: Path, status: Optional[dict[str, Any]] = None, *, timeout: float = 3.0) -> list[str]:
    """The node's ERC-8004 agent (from `mesh402 register`), and each peer's gossiped agent claim, checked
    on chain (RPC from the node's registration or MESH402_RPC_URL); a claim is never shown as verified
    unless the node-key binding verifies."""
    import json as _json

    try:
        info = _json.loads((home / "erc8004.json").read_text())
    except (OSError, ValueError):
        info = None
    lines: list[str] = []
    w3 = None
    try:
        w3 = _status_w3(info, timeout)
    except Exception:
        pass
    lines += earnings_status_lines(home)
    if info:
        line = f"erc8004: agent {info.get('agentId')} at {info.get('agentRegistry')}, owner {info.get('owner')}"
        lines.append(line + f", binding {_binding_state(home, info, w3)}")
    for p in (status or {}).get("peers") or []:
        label = ((p.get("announcement") or {}).get("labels") or {}).get(ANNOUNCE_LABEL)
        if not label:
            continue
        parsed = parse_label(label)
        agent = f"agent {parsed[2]} on eip155:{parsed[0]}" if parsed else repr(label[:60])
        lines.append(f"  peer {p['node_id'][:12]}: {agent}, {check_peer_claim(w3, label, p['node_id'])}")
    return lines


def _binding_state(home: Path, info: dict[str, Any], w3: Any) -> str:
    try:
        from mesh402.economics.erc8004 import verify_binding  # lazy: kept off this module's import path
        from mesh402.mesh.identity import NodeIdentity  # lazy: kept off this module's import path
        if w3 is None:
            return "unchecked (no RPC URL recorded)"
        nid = NodeIdentity.load_or_create(home).node_id
        return "verified" if verify_binding(w3, info["registry"], int(info["agentId"]), nid) else "UNVERIFIED"
    except Exception as e:
        return f"unchecked ({type(e).__name__})"
