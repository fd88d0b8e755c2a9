"""The public description of a mesh, and the pure decisions made from listings.

A listing says what a mesh offers (models served, models wanted, capacity, size, and what its selling
nodes charge for each model: `prices`, x402 per request and per 1k tokens on a network and asset) and, for
an open mesh only, carries a public invite token. A private mesh's listing carries no invite and never its
secret: joining it still needs a token from a member. Everything read from a listing is untrusted:
`from_json` bounds and type-checks each field (`valid_prices` for the price table).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

LISTING_KIND = 31990  # NIP-89 handler information: addressable (author + d tag)
LISTING_D_TAG = "mesh402"
LISTING_K_TAG = "mesh402"
LISTING_VERSION = 1
MESH_NAME_PREFIX = b"mesh402-mesh-name-v1\0"
MAX_PRICES = 64  # price rows a listing carries (and a reader keeps)
MAX_PRICE = 10**18  # atomic units; beyond this is not a price anyone pays (economics.charging.MAX_PRICE)
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}")
_NETWORK = re.compile(r"[-a-z0-9]{3,8}:[-_a-zA-Z0-9]{1,32}")  # CAIP-2, e.g. eip155:8453
_ASSET = re.compile(r"0x[0-9a-fA-F]{40}")


def valid_prices(raw: Any) -> list[dict[str, Any]]:
    """A listing's price rows, untrusted: each {model, network, asset, per_request, per_1k, verified} with a
    model id, a CAIP-2 network, a token address and integer prices in 0..MAX_PRICE (atomic units; the prices
    travel as decimal strings); a malformed row is dropped, at most MAX_PRICES are kept."""
    out: list[dict[str, Any]] = []
    for r in raw if isinstance(raw, list) else []:
        if len(out) >= MAX_PRICES:
            break
        if not isinstance(r, dict):
            continue
        model, network, asset = r.get("model"), r.get("network"), r.get("asset")
        if not (isinstance(model, str) and _MODEL.fullmatch(model) and isinstance(network, str)
                and _NETWORK.fullmatch(network) and isinstance(asset, str) and _ASSET.fullmatch(asset)):
            continue
        try:
            prices = [int(str(r.get(k, "0"))) for k in ("per_request", "per_1k")]
        except ValueError:
            continue
        if not all(0 <= p <= MAX_PRICE for p in prices) or not isinstance(r.get("verified", True), bool):
            continue
        out.append({"model": model, "network": network, "asset": asset, "per_request": str(prices[0]),
                    "per_1k": str(prices[1]), "verified": r.get("verified", True)})
    return out


@dataclass
class MeshListing:
    mesh_id: str
    name: str = ""
    region: str = ""
    policy: str = "open"  # "open" (invite below) or "private" (token needed)
    invite: str = ""  # public invite token; always empty for a private mesh
    serving: list[str] = field(default_factory=list)
    wanted: list[str] = field(default_factory=list)  # in demand, nobody serves them
    total_capacity_bytes: int = 0
    node_count: int = 1
    client_count: int = 0
    max_clients: int = 0
    version: str = ""
    publisher_node: str = ""  # node id (hex) of the mesh node that published
    # what selling nodes charge (x402): the lowest price per (model, network, asset); see valid_prices
    prices: list[dict[str, Any]] = field(default_factory=list)
    v: int = LISTING_VERSION
    # filled by the reader, not published
    author: str = ""  # Nostr public key (hex) that signed the event
    created_at: int = 0
    expires_at: int = 0

    def to_json(self) -> str:
        d = asdict(self)
        for k in ("author", "created_at", "expires_at"):
            d.pop(k)
        if self.policy != "open":
            d["invite"] = ""
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "MeshListing":
        d = json.loads(text)
        if not isinstance(d, dict) or not isinstance(d.get("mesh_id"), str) or not d["mesh_id"]:
            raise ValueError("listing without a mesh id")
        known = {f for f in cls.__dataclass_fields__ if f not in ("author", "created_at", "expires_at")}
        kw: dict[str, Any] = {k: v for k, v in d.items() if k in known}
        lst = cls(**kw)
        lst.serving = [str(x) for x in lst.serving][:256]
        lst.wanted = [str(x) for x in lst.wanted][:256]
        lst.prices = valid_prices(lst.prices)
        lst.node_count, lst.client_count = int(lst.node_count), int(lst.client_count)
        lst.total_capacity_bytes = int(lst.total_capacity_bytes)
        if lst.policy != "open":
            lst.invite = ""  # a private listing never carries a usable invite
        return lst

    @property
    def is_open(self) -> bool:
        return self.policy == "open" and bool(self.invite)


def named_mesh_id(name: str, publisher_key_hex: str) -> str:
    """Deterministic mesh id for `--mesh-name`: the same name and Nostr key give the same mesh."""
    h = hashlib.sha256(MESH_NAME_PREFIX + name.encode() + b"\0" + publisher_key_hex.lower().encode())
    return h.hexdigest()[:32]


def newest_per_author(listings: Iterable[MeshListing], now: float) -> list[MeshListing]:
    """Keep one listing per (author, mesh) pair: the newest unexpired one."""
    best: dict[tuple[str, str], MeshListing] = {}
    for lst in listings:
        if lst.expires_at and lst.expires_at <= now:
            continue
        k = (lst.author, lst.mesh_id)
        if k not in best or lst.created_at > best[k].created_at:
            best[k] = lst
    return sorted(best.values(), key=lambda x: (-x.node_count, -x.total_capacity_bytes, x.mesh_id))


def by_mesh(listings: Iterable[MeshListing]) -> dict[str, MeshListing]:
    """One listing per mesh id (several members may publish the same mesh): the largest, newest."""
    out: dict[str, MeshListing] = {}
    for lst in listings:
        cur = out.get(lst.mesh_id)
        if cur is None or (lst.node_count, lst.created_at) > (cur.node_count, cur.created_at):
            out[lst.mesh_id] = lst
    return out


def matches(lst: MeshListing, *, model: str = "", min_capacity_bytes: int = 0, name: str = "",
            region: str = "") -> bool:
    """The `mesh402 discover` filters."""
    if model and model not in lst.serving and model not in lst.wanted:
        return False
    if min_capacity_bytes and lst.total_capacity_bytes < min_capacity_bytes:
        return False
    if name and lst.name != name:
        return False
    if region and lst.region.lower() != region.lower():
        return False
    return True


@dataclass
class Seeker:
    """What an `--auto` node brings and wants."""

    models_on_disk: frozenset[str] = frozenset()
    capacity_bytes: int = 0
    region: str = ""
    name: str = ""  # --mesh-name: only meshes with this name
    last_mesh_id: str = ""  # the mesh this home joined last time


@dataclass(frozen=True)
class ScoredMesh:
    score: float
    listing: MeshListing
    reasons: tuple[str, ...]


def score_mesh(lst: MeshListing, me: Seeker) -> Optional[ScoredMesh]:
    """How good a listed mesh is for this node; None when it cannot be joined automatically.

    fit (models this node can serve that the mesh serves or wants), size (more nodes, more
    capacity), models served, demand (wanted models), the mesh joined last time, region."""
    if not lst.is_open:
        return None
    if me.name and lst.name != me.name:
        return None
    if lst.max_clients and lst.client_count >= lst.max_clients:
        return None
    score, why = 100.0, []
    fit_wanted = len(me.models_on_disk & set(lst.wanted))
    fit_served = len(me.models_on_disk & set(lst.serving))
    if fit_wanted:
        score += 40 * fit_wanted
        why.append(f"wanted+{fit_wanted}")
    if fit_served:
        score += 15 * fit_served
        why.append(f"replica+{fit_served}")
    score += 5 * min(lst.node_count, 10)
    score += min(lst.total_capacity_bytes / 1e9, 20)
    score += 10 * min(len(lst.serving), 10)
    score += 15 * min(len(set(lst.wanted) - set(lst.serving)), 5)
    why.append(f"nodes={lst.node_count} serving={len(lst.serving)} wanted={len(lst.wanted)}")
    if me.last_mesh_id and lst.mesh_id == me.last_mesh_id:
        score += 500
        why.append("joined last time")
    if me.region and lst.region and me.region.lower() == lst.region.lower():
        score += 50
        why.append("same region")
    return ScoredMesh(score, lst, tuple(why))


def choose_mesh(listings: Iterable[MeshListing], me: Seeker, exclude_mesh: str = "") -> Optional[ScoredMesh]:
    """The best joinable mesh (highest score; ties: more nodes, then the larger mesh id)."""
    scored = [s for lst in by_mesh(listings).values()
              if lst.mesh_id != exclude_mesh and (s := score_mesh(lst, me)) is not None]
    if not scored:
        return None
    return max(scored, key=lambda s: (s.score, s.listing.node_count, s.listing.mesh_id))
