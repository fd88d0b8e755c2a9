"""Invite tokens that admit no one any more: single-use tokens once used, and revoked tokens.

Pure state, no I/O. A token is named by its credential's nonce; an entry lives until the token would
have expired anyway. Every member keeps the mesh-wide set in ``mesh.json`` and carries it in its
signed announcement (label ``invites.spent``); members merge what they hear, so a revocation outlives
the member that made it. Nodes admitted before a revocation stay members (they hold the mesh
secret): revoking stops new joins with that token, it does not expel anyone.
"""

from __future__ import annotations

import re

SPENT_LABEL = "invites.spent"
MAX_SPENT = 128  # ~5.8 KB of label per announcement: gossip frames (1 MiB) still carry ~170 members

_ENTRY = re.compile(r"([0-9a-f]{32}):(\d{1,12})")


def encode(spent: dict[str, int]) -> str:
    """``nonce:expires_at`` pairs, comma-separated, in nonce order (deterministic announcements)."""
    return ",".join(f"{n}:{e}" for n, e in sorted(spent.items()))


def decode(text: str) -> dict[str, int]:
    """Parse a peer's label; malformed entries are skipped (the announcement is signed by a member, but
    a member running other software may still send junk)."""
    out: dict[str, int] = {}
    for part in (text or "").split(","):
        m = _ENTRY.fullmatch(part.strip())
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def prune(spent: dict[str, int], now: float) -> bool:
    """Drop the entries of expired tokens; True if any went."""
    gone = [n for n, e in spent.items() if e <= now]
    for n in gone:
        del spent[n]
    return bool(gone)


def merge(spent: dict[str, int], new: dict[str, int], now: float) -> bool:
    """Add unexpired entries of `new` to `spent` (in place, bounded by MAX_SPENT, the latest expiries
    kept); True if `spent` changed."""
    before = dict(spent)
    prune(spent, now)
    for n, e in new.items():
        if e > now and spent.get(n, 0) < e:
            spent[n] = e
    if len(spent) > MAX_SPENT:
        for n, _ in sorted(spent.items(), key=lambda kv: kv[1])[: len(spent) - MAX_SPENT]:
            del spent[n]
    return spent != before
