"""Meshes on the local network via mDNS/DNS-SD (zeroconf), opt-in with `--discover-lan`.

Each node announces ``<node id>._mesh402._udp.local.`` with TXT fields: mesh id, name,
region, admission (open/private), the announcing node's id and mesh addresses, models served,
node count, version, and ``tok_fp`` (a SHA-256 fingerprint of its current invite token, so a
token holder can tell which LAN mesh the token belongs to). Never the token, never the secret:
joining a private mesh still needs a token; an open mesh admits anyone, so the joiner builds
its own open-policy token from the node id and addresses.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from typing import Any, Optional

from mesh402.discovery.listing import MAX_PRICES, MeshListing, valid_prices
from mesh402.mesh import invite
from mesh402.mesh.proto import mesh_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "_mesh402._udp.local."
TOKEN_FP_PREFIX = b"mesh402-lan-invite-v1\0"
MAX_TXT = 200  # bytes per TXT value


def token_fingerprint(token: str) -> str:
    return hashlib.sha256(TOKEN_FP_PREFIX + token.encode()).hexdigest()[:32]


def txt_for(listing: MeshListing, node_id: str, addrs: list[str], token: str) -> dict[str, str]:
    """The TXT record (pure): listing facts, where to dial, and only a fingerprint of the token."""
    return {
        "v": "1", "mesh_id": listing.mesh_id, "name": listing.name[:64], "region": listing.region[:32],
        "policy": listing.policy, "node": node_id, "addrs": ",".join(addrs)[:MAX_TXT],
        "serving": ",".join(listing.serving)[:MAX_TXT], "wanted": ",".join(listing.wanted)[:MAX_TXT],
        "nodes": str(listing.node_count), "clients": str(listing.client_count),
        "capacity": str(listing.total_capacity_bytes), "version": listing.version[:32],
        "tok_fp": token_fingerprint(token) if token else "",
        **prices_txt(listing.prices),
    }


def prices_txt(prices: list[dict[str, Any]]) -> dict[str, str]:
    """The price rows of the first network and asset as TXT values: `x402` = "network,asset", `prices` =
    "model=per_request/per_1k/verified,..." (whole rows only, within MAX_TXT)."""
    if not prices:
        return {}
    net, asset = prices[0]["network"], prices[0]["asset"]
    rows: list[str] = []
    for p in prices:
        if (p["network"], p["asset"]) != (net, asset):
            continue
        row = f"{p['model']}={p['per_request']}/{p['per_1k']}/{int(bool(p['verified']))}"
        if len(",".join([*rows, row])) > MAX_TXT:
            break
        rows.append(row)
    return {"x402": f"{net},{asset}", "prices": ",".join(rows)}


def prices_from_txt(props: dict[str, str]) -> list[dict[str, Any]]:
    """`prices_txt` read back, each row validated (listing.valid_prices)."""
    net, _, asset = props.get("x402", "").partition(",")
    rows = []
    for item in props.get("prices", "").split(",")[:MAX_PRICES]:
        model, _, price = item.partition("=")
        parts = price.split("/")
        if len(parts) == 3:
            rows.append({"model": model, "network": net, "asset": asset, "per_request": parts[0],
                         "per_1k": parts[1], "verified": parts[2] != "0"})
    return valid_prices(rows)


def listing_from_txt(props: dict[str, str], now: float) -> Optional[MeshListing]:
    """A LAN listing; an open mesh gets an invite minted here (open meshes need no credential)."""

    mesh_id, node = props.get("mesh_id", ""), props.get("node", "")
    if not mesh_id or len(node) != 64:
        return None
    addrs = [a for a in props.get("addrs", "").split(",") if a]
    lst = MeshListing(mesh_id=mesh_id, name=props.get("name", ""), region=props.get("region", ""),
                      policy="open" if props.get("policy") == "open" else "private",
                      serving=[x for x in props.get("serving", "").split(",") if x],
                      wanted=[x for x in props.get("wanted", "").split(",") if x],
                      node_count=int(props.get("nodes", "1") or 1), client_count=int(props.get("clients", "0") or 0),
                      total_capacity_bytes=int(props.get("capacity", "0") or 0), version=props.get("version", ""),
                      publisher_node=node, author="lan:" + node, created_at=int(now), prices=prices_from_txt(props))
    if lst.policy == "open" and addrs:
        lst.invite = invite.mint_token(mesh_id=mesh_id, secret=None, policy=pb.ADMISSION_OPEN,
                                       node_id=bytes.fromhex(node), addrs=addrs, expires_in=3600, now=now)
    return lst


def _decode(props: dict[bytes, Optional[bytes]]) -> dict[str, str]:
    return {k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in props.items()}


class LanAnnouncer:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._zc: Any = None
        self._info: Any = None
        self._txt: dict[str, str] = {}

    async def update(self, txt: dict[str, str], ips: list[str], port: int) -> None:
        from zeroconf import ServiceInfo
        from zeroconf.asyncio import AsyncZeroconf

        if txt == self._txt:
            return
        if self._zc is None:
            self._zc = AsyncZeroconf()
        info = ServiceInfo(SERVICE, f"{self.node_id[:32]}.{SERVICE}", port=port, properties=txt,
                           addresses=[socket.inet_aton(ip) for ip in ips], server=f"m402-{self.node_id[:16]}.local.")
        if self._info is None:
            await self._zc.async_register_service(info)
        else:
            await self._zc.async_update_service(info)
        self._info, self._txt = info, dict(txt)

    async def close(self) -> None:
        if self._zc is not None:
            try:
                if self._info is not None:
                    await asyncio.wait_for(self._zc.async_unregister_service(self._info), 2.0)
            except Exception:
                pass
            await self._zc.async_close()
            self._zc = None


async def browse(timeout_s: float = 2.0, exclude_node: str = "") -> list[MeshListing]:
    """Meshes announced on the LAN within ``timeout_s``."""
    import time

    from zeroconf import ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    names: set[str] = set()

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated):
            names.add(name)

    azc = AsyncZeroconf()
    browser = AsyncServiceBrowser(azc.zeroconf, [SERVICE], handlers=[on_change])
    out: list[MeshListing] = []
    try:
        await asyncio.sleep(timeout_s)
        for name in sorted(names):
            info = AsyncServiceInfo(SERVICE, name)
            if not await info.async_request(azc.zeroconf, 1500):
                continue
            lst = listing_from_txt(_decode(info.properties), time.time())
            if lst is not None and lst.publisher_node != exclude_node:
                out.append(lst)
    finally:
        await browser.async_cancel()
        await azc.async_close()
    return out
