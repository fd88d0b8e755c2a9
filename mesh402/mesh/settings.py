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
