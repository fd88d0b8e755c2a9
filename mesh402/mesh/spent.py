"""Invite tokens that admit no one any more: single-use tokens once used, and revoked tokens.

Pure state, no I/O. A token is named by its credential's nonce; an entry lives until the token would
have expired anyway. Every member keeps the mesh-wide set in ``mesh.json`` and carries it in its
signed announcement (label ``invites.spent``); members merge what they hear, so a revocation outlives
the member that made it. Nodes admitted before a revocation stay members (they hold the mesh
secret): revoking stops new joins with that token, it does not expel anyone.

Each entry is vouched for by the member that spent or revoked the token: its id and its Ed25519
signature over the mesh, the nonce and the expiry travel with the entry, and an entry whose signature
does not verify is dropped. So entries are attributed, whoever relays them, and the set is bounded
per member as well as in all: at most ``MAX_PER_MEMBER`` entries of any one member are kept, and when
the whole set is over ``MAX_SPENT`` the member holding the most loses its soonest-expiring entry.
One member filling the set with junk only ever evicts its own entries.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import Callable

SPENT_LABEL = "invites.spent"
MAX_SPENT = 128  # ~30 KB of label per announcement when full
MAX_PER_MEMBER = 32  # entries one member may vouch for (a fair share when four members revoke at once)

_ENTRY = re.compile(r"([0-9a-f]{32}):(\d{1,12}):([0-9a-f]{64}):([0-9a-f]{128})")

Verify = Callable[[bytes, bytes, bytes], bool]  # (node id, message, signature) -> valid


@dataclass(frozen=True)
class Revocation:
    expires_at: int
    by: bytes = b""  # the member that spent or revoked the token (empty: ours, from before entries were signed)
    sig: bytes = b""  # its signature over payload(mesh_id, nonce, expires_at)


def payload(mesh_id: str, nonce: str, expires_at: int) -> bytes:
    return b"mesh402-spent-v1\0" + mesh_id.encode() + b"\0" + bytes.fromhex(nonce) + int(expires_at).to_bytes(8, "big")


def vouch(sign: Callable[[bytes], bytes], node_id: bytes, mesh_id: str, nonce: str, expires_at: int) -> Revocation:
    return Revocation(int(expires_at), bytes(node_id), sign(payload(mesh_id, nonce, expires_at)))


def encode(spent: dict[str, Revocation]) -> str:
    """``nonce:expires_at:member:signature`` entries, comma-separated, in nonce order (deterministic
    announcements); entries not yet vouched for are left out."""
    return ",".join(f"{n}:{r.expires_at}:{r.by.hex()}:{r.sig.hex()}" for n, r in sorted(spent.items()) if r.sig)


def decode(text: str) -> dict[str, Revocation]:
    """Parse a peer's label; malformed entries are skipped (the signatures are checked by ``merge``)."""
    out: dict[str, Revocation] = {}
    for part in (text or "").split(",")[: 2 * MAX_SPENT]:
        m = _ENTRY.fullmatch(part.strip())
        if m:
            out[m.group(1)] = Revocation(int(m.group(2)), bytes.fromhex(m.group(3)), bytes.fromhex(m.group(4)))
    return out


def prune(spent: dict[str, Revocation], now: float) -> bool:
    """Drop the entries of expired tokens; True if any went."""
    gone = [n for n, r in spent.items() if r.expires_at <= now]
    for n in gone:
        del spent[n]
    return bool(gone)


def bound(spent: dict[str, Revocation], self_id: bytes = b"") -> None:
    """Hold each member to ``MAX_PER_MEMBER`` entries and the set to ``MAX_SPENT``: the member with the
    most entries loses its soonest-expiring one first."""
    per = collections.Counter(r.by or self_id for r in spent.values())
    while per and (len(spent) > MAX_SPENT or max(per.values()) > MAX_PER_MEMBER):
        heavy = max(per, key=lambda k: per[k])
        n = min((n for n, r in spent.items() if (r.by or self_id) == heavy), key=lambda n: spent[n].expires_at)
        del spent[n]
        per[heavy] -= 1


def merge(spent: dict[str, Revocation], new: dict[str, Revocation], now: float, mesh_id: str, verify: Verify,
          self_id: bytes = b"") -> tuple[bool, int]:
    """Add the unexpired, validly vouched entries of ``new`` to ``spent`` (in place, bounded); returns
    (whether ``spent`` changed, how many entries had a bad signature)."""
    before = dict(spent)
    prune(spent, now)
    bad = 0
    for n, r in new.items():
        if r.expires_at <= now or n in spent:
            continue  # a nonce already spent gains nothing from a second voucher
        if not verify(r.by, payload(mesh_id, n, r.expires_at), r.sig):
            bad += 1
            continue
        spent[n] = r
    bound(spent, self_id)
    return spent != before, bad
