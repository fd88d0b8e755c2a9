"""The node's status report and counters, as plain dicts for the management API and the CLI."""

from __future__ import annotations

import collections
from typing import Any, Optional

from mesh402.mesh.conns import PeerConn
from mesh402.mesh.context import MeshContext
from mesh402.mesh.gossip import GossipState
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.render import announcement_to_dict


def all_counters(counters: collections.Counter[str], gossip: Optional[GossipState]) -> dict[str, int]:
    """The node's counters and its gossip merge counters (prefixed ``gossip.``), sorted by name."""
    out = dict(counters)
    if gossip is not None:
        for k, v in gossip.counters.items():
            out[f"gossip.{k}"] = v
    return dict(sorted(out.items()))


def conn_path(pc: Optional[PeerConn]) -> Optional[str]:
    """How the live connection reaches the peer now: "direct" (UDP to its address) or "relay" (through the
    relay server); None when there is no connection or it cannot say."""
    paths = getattr(pc.conn, "paths", None) if pc is not None and not pc.closed else None
    if paths is None:
        return None
    try:
        selected = next((p for p in paths() if p.is_selected), None)
    except Exception:  # a closing connection may refuse: the next status asks again
        return None
    return None if selected is None else ("relay" if selected.is_relay else "direct")


def peer_rows(ctx: MeshContext) -> list[dict[str, object]]:
    """One row per peer gossip or liveness knows of."""
    rows: list[dict[str, object]] = []
    if ctx.gossip is None:
        return rows
    now_mono = ctx.clock.monotonic()
    for nid in sorted(set(ctx.gossip.peers()) | set(ctx.liveness.peers)):
        e = ctx.gossip.entries.get(nid)
        lv = ctx.liveness.get(nid)
        pc = ctx.conns.get(nid)
        rows.append({
            "node_id": nid.hex(),
            "state": (lv.state.value if lv else "learned"),
            "connected": pc is not None and not pc.closed,
            "initiator": (pc.initiator if pc else None),
            "path": conn_path(pc),
            "rtt_ms": (round(lv.rtt_ms, 3) if lv and lv.rtt_ms is not None else None),
            "last_seen_s": (round(now_mono - lv.last_seen, 3) if lv else None),
            "via": (e.via.hex() if e and e.via else None),
            "announcement": announcement_to_dict(e.ann) if e else None,
        })
    return rows


def report(ctx: MeshContext, *, kind: str, addrs: list[str], started_at: float, uptime_s: float,
           joined_at: Optional[float], invite_token: Optional[str], own: Optional[pb.PeerAnnouncement],
           demand: dict[str, dict[str, int]]) -> dict[str, Any]:
    return {
        "node_id": ctx.node_id.hex(),
        "mesh_id": ctx.membership.mesh_id,
        "policy": ctx.membership.policy_name,
        "kind": kind,
        "boot_id": ctx.boot_id,
        "addrs": addrs,
        "relay_url": ctx.config.relay_url,
        "started_at": started_at,
        "uptime_s": round(uptime_s, 3),
        "joined_at": joined_at,
        "invite_token": invite_token,
        "self": announcement_to_dict(own) if own else None,
        "models": announcement_to_dict(own)["models"] if own else [],
        "peers": peer_rows(ctx),
        "demand": demand,
        "counters": all_counters(ctx.counters, ctx.gossip),
    }
