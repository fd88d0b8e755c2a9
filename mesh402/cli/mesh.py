"""`mesh402 invite` and `mesh402 discover`."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from mesh402.cli.common import (
    HomeOpt,
    console,
    err,
    fail,
    find_console,
    fmt_bytes,
    read_token_file,
)
from mesh402.cli.options import NostrRelayOpt
from mesh402.discovery.listing import by_mesh, matches
from mesh402.mesh.invite import parse_duration

if TYPE_CHECKING:
    pass


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


    base, headers, _ = find_console(home)
    if revoke is not None:
        token = sys.stdin.read().strip() if str(revoke) == "-" else read_token_file(revoke, "--revoke")
        path, body = "/api/invite/revoke", {"token": token}
    else:
        try:
            parse_duration(expires)
        except ValueError as e:
            fail(f"--expires: {e}")
        path, body = "/api/invite", {"expires": expires, "single_use": single_use}
    try:
        r = httpx.post(f"{base}{path}", json=body, headers=headers, timeout=10.0)
    except httpx.HTTPError as e:
        fail(f"cannot reach the node's console at {base}: {e}")
    if r.status_code != 200:
        try:
            msg = r.json().get("error")
        except ValueError:
            msg = r.text[:200]
        fail(f"{'revoke' if revoke is not None else 'invite'} refused: {msg}")
    d = r.json()
    if revoke is not None:
        said = {"revoked": "revoked mesh-wide", "already revoked": "was already revoked",
                "expired": "has expired already: it admits no one"}[d["state"]]
        print(f"token {d['nonce'][:12]}… {said}", flush=True)
        return
    print(d["token"], flush=True)
    err.print(f"expires {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(d['expires_at']))} (mesh {d['mesh_id'][:12]})"
              + (", single use" if single_use else ""), highlight=False)


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


    try:
        if lan:
            from mesh402.discovery.lan import browse  # lazy: kept off this module's import path

            listings = asyncio.run(browse(timeout))
        else:
            from mesh402.discovery.nostr import fetch_listings  # lazy: kept off this module's import path

            listings = asyncio.run(fetch_listings(list(nostr_relay or []), timeout))
    except Exception as e:
        fail(f"cannot read the {'LAN' if lan else 'Nostr relays'}: {e}")
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
    for col in ("mesh", "name", "region", "admission", "nodes", "clients", "capacity", "serving", "wanted",
                "prices (x402, atomic: request + 1k tokens)"):
        t.add_column(col)
    for x in found:
        prices = ", ".join(f"{p['model']}: {p['per_request']} + {p['per_1k']}/1k" for p in x.prices)
        t.add_row(x.mesh_id[:16], x.name, x.region, "open" if x.is_open else "private (token needed)",
                  str(x.node_count), str(x.client_count), fmt_bytes(x.total_capacity_bytes),
                  ", ".join(x.serving) or "-", ", ".join(x.wanted) or "-", prices or "free")
    console.print(t)
