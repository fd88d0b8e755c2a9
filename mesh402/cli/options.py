"""Option types the commands share (typer Annotated types), grouped by help panel."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from mesh402.settings import DEFAULT_CONSOLE_PORT

if TYPE_CHECKING:
    pass




PANEL = "Mesh"
JoinOpt = Annotated[Optional[list[str]], typer.Option("--join", "-j", help="Invite token of a mesh member (repeatable).", rich_help_panel=PANEL)]
JoinFileOpt = Annotated[Optional[Path], typer.Option("--join-file", help="File holding an invite token.", rich_help_panel=PANEL)]
RelayOpt = Annotated[Optional[str], typer.Option("--relay", help="iroh relay URL (online meshes); default: no relay, direct addresses only.", rich_help_panel=PANEL)]
ConsoleOpt = Annotated[Optional[int], typer.Option("--console", help=f"Management API and web console port (default {DEFAULT_CONSOLE_PORT}; open http://127.0.0.1:PORT/).", rich_help_panel=PANEL)]
ConsoleAllOpt = Annotated[bool, typer.Option("--console-listen-all", help="Serve the management API and web console on all interfaces (needs a console token).", rich_help_panel=PANEL)]
ConsoleTokenOpt = Annotated[Optional[Path], typer.Option("--console-token-file", help="File (0600) with the console token; or set MESH402_CONSOLE_TOKEN (default: one generated into <home>/console.token, which the CLI reads).", rich_help_panel=PANEL)]
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

TPANEL = "Trust"
AllowHostOpt = Annotated[Optional[list[str]], typer.Option("--allow-host", help="Node id (64 hex digits) allowed to host, hold layers or experts of, or serve a model for this node; repeatable. With any, requests are routed only to these nodes (and this one): nobody else sees this node's prompts or activations.", rich_help_panel=TPANEL)]
ValidatorIdOpt = Annotated[Optional[list[str]], typer.Option("--validator-id", help="Node id of a validator this entry trusts to re-execute its stages' spot checks; repeatable. A node announcing the validator label is used only when named here.", rich_help_panel=TPANEL)]


def node_ids(values: Optional[list[str]], flag: str) -> list[str]:
    """Node ids from a repeatable flag, lower-cased; ValueError naming the flag for anything else."""
    out = []
    for v in values or []:
        v = v.strip().lower()
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError(f"{flag} takes a node id (64 hex digits, see `mesh402 status`), got {v[:80]!r}")
        out.append(v)
    return out


# the chain options `register` and `payout` share
DeploymentOpt = Annotated[Optional[Path], typer.Option("--deployment", help="deployment.json from `mesh402 chain dev` (RPC URL, contracts, keys).")]
NetworkOpt = Annotated[Optional[str], typer.Option("--network", help="base-sepolia, base or eip155:N (picks the ERC-8004 registries).")]
RpcOpt = Annotated[Optional[str], typer.Option("--rpc-url", help="Chain RPC URL.")]
IdentityRegistryOpt = Annotated[Optional[str], typer.Option("--identity-registry", help="IdentityRegistry address (default: the network's).")]
