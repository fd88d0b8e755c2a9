"""Mesh settings a node is started with (filled from CLI flags; see mesh402.mesh_cli)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

DEFAULT_CONSOLE_PORT = 3131
DEFAULT_INVITE_EXPIRES = 24 * 3600.0


@dataclass
class MeshSettings:
    join: list[str] = field(default_factory=list)  # invite tokens
    kind: str = "serving"  # "serving" or "client" (API-only, no model)
    relay_url: Optional[str] = None
    bind_ip: str = "0.0.0.0"
    bind_port: int = 0
    console_port: int = DEFAULT_CONSOLE_PORT
    console_port_explicit: bool = False  # a busy default port falls back to an ephemeral one
    console_listen_all: bool = False
    console_token: Optional[str] = None
    policy: str = "secret"  # admission policy when this node creates a mesh: "secret" or "open"
    invite_expires: float = DEFAULT_INVITE_EXPIRES
    name: str = ""
    fast_timers: bool = False  # tests and benchmarks: short heartbeats and timeouts
    # discovery (mesh402.discovery)
    publish: bool = False  # list the mesh on Nostr
    private: bool = False  # a published mesh without a public invite
    auto: bool = False  # join the best listed mesh, or start (and publish) one
    mesh_name: str = ""  # deterministic mesh id; --auto only joins meshes of this name
    region: str = ""
    nostr_relays: list[str] = field(default_factory=list)
    nostr_ttl: float = 120.0  # NIP-40 expiration of a listing
    nostr_refresh: float = 60.0  # republish this often (and when the mesh changes)
    auto_interval: float = 20.0  # --auto: look for a larger mesh to merge into this often
    discover_timeout: float = 5.0  # one relay query
    discover_lan: bool = False  # announce and find meshes on the LAN (mDNS)
    lan_browse_s: float = 2.0  # how long one LAN browse listens
    discover_registry: str = ""  # also find meshes through ERC-8004 registered nodes (mesh402.economics.identity)
