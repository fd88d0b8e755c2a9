"""Mesh listings on Nostr (nostr-sdk): publish, refresh, withdraw, fetch.

A listing is one addressable kind-31990 event per Nostr key (tags ``d`` and ``k`` =
``mesh402``, NIP-40 ``expiration``); a newer event replaces the older one on the relay, a
refresh before expiry keeps it listed, and a NIP-09 deletion withdraws it on leave. The Nostr
key is ``<home>/nostr.key`` (hex, mode 0600), separate from the node's mesh identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Iterable

from mesh402.discovery.listing import (
    LISTING_D_TAG,
    LISTING_K_TAG,
    LISTING_KIND,
    MeshListing,
    newest_per_author,
)
from mesh402.mesh.identity import write_private

log = logging.getLogger(__name__)

NOSTR_KEY_FILE = "nostr.key"
DEFAULT_RELAYS = ("wss://relay.damus.io", "wss://nos.lol")
DEFAULT_TTL_S = 120.0
DEFAULT_REFRESH_S = 60.0
FETCH_TIMEOUT_S = 5.0


def load_or_create_keys(home: Path):
    """The node's Nostr keys from ``<home>/nostr.key`` (created 0600 on first use)."""
    from nostr_sdk import Keys

    p = Path(home) / NOSTR_KEY_FILE
    if p.exists():
        return Keys.parse(p.read_text().strip())
    keys = Keys.generate()
    write_private(p, keys.secret_key().to_hex() + "\n")
    return keys



async def _client(relays: Iterable[str]):
    from nostr_sdk import Client, RelayUrl

    client = Client()
    n = 0
    for url in relays:
        try:
            await client.add_relay(RelayUrl.parse(url))
            n += 1
        except Exception as e:  # a malformed URL: skip it, say so
            log.warning("nostr relay %s ignored: %s", url, e)
    if n == 0:
        raise ValueError("no usable --nostr-relay")
    await client.connect()
    return client


class NostrDirectory:
    """One Nostr client for a node: publish its listing and read everybody's."""

    def __init__(self, relays: list[str], keys=None) -> None:
        self.relays = list(relays) or list(DEFAULT_RELAYS)
        self.keys = keys
        self._client = None
        self._lock = asyncio.Lock()
        self.published_at = 0.0

    async def client(self):
        if self._client is None:
            self._client = await _client(self.relays)
        return self._client

    async def publish(self, listing: MeshListing, ttl_s: float = DEFAULT_TTL_S) -> bool:
        from nostr_sdk import EventBuilder, Kind, Tag, Timestamp

        assert self.keys is not None
        now = time.time()
        created = int(now)
        tags = [Tag.identifier(LISTING_D_TAG), Tag.parse(["k", LISTING_K_TAG]),
                Tag.expiration(Timestamp.from_secs(int(now + ttl_s)))]
        ev = (EventBuilder(Kind(LISTING_KIND), listing.to_json()).tags(tags)
              .custom_created_at(Timestamp.from_secs(created)).finalize(self.keys))
        async with self._lock:
            out = await (await self.client()).send_event(ev)
        ok = bool(out.success)
        if ok:
            self.published_at = now
        else:
            log.warning("nostr publish failed: %s", out.failed)
        return ok

    async def withdraw(self) -> None:
        """NIP-09 deletion of this key's listing (the relay drops it at once)."""
        from nostr_sdk import EventBuilder, Kind, Tag

        if self.keys is None or self._client is None:
            return
        coord = f"{LISTING_KIND}:{self.keys.public_key().to_hex()}:{LISTING_D_TAG}"
        ev = EventBuilder(Kind(5), "mesh left").tags([Tag.parse(["a", coord]), Tag.parse(["k", str(LISTING_KIND)])]).finalize(self.keys)
        async with self._lock:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.send_event(ev), 3.0)

    async def fetch(self, timeout_s: float = FETCH_TIMEOUT_S) -> list[MeshListing]:
        from nostr_sdk import Filter, Kind, ReqTarget, SingleLetterTag

        f = Filter().kind(Kind(LISTING_KIND)).custom_tag(SingleLetterTag.from_byte(ord("k")), LISTING_K_TAG).limit(500)
        client = await self.client()
        events = await client.fetch_events(ReqTarget.auto([f]), timedelta(seconds=timeout_s))
        return parse_events(events, time.time())

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.shutdown(), 3.0)
            self._client = None


def parse_events(events, now: float) -> list[MeshListing]:
    out = []
    for ev in events:
        try:
            if not ev.verify():
                continue
            expires = 0
            tags = {}
            for t in ev.tags():
                v = t.to_vec()
                if len(v) >= 2:
                    tags.setdefault(v[0], v[1])
            if tags.get("d") != LISTING_D_TAG:
                continue
            if "expiration" in tags:
                expires = int(tags["expiration"])
            if expires and expires <= now:
                continue
            lst = MeshListing.from_json(ev.content())
            lst.author = ev.author().to_hex()
            lst.created_at = ev.created_at().as_secs()
            lst.expires_at = expires
            out.append(lst)
        except Exception:  # a malformed listing is not ours to fix
            continue
    return newest_per_author(out, now)


async def fetch_listings(relays: list[str], timeout_s: float = FETCH_TIMEOUT_S) -> list[MeshListing]:
    d = NostrDirectory(relays)
    try:
        return await d.fetch(timeout_s)
    finally:
        await d.close()
