"""A hostile Nostr publisher: re-lists a real mesh under a fresh key with a node count it made up."""

from __future__ import annotations

import asyncio
import dataclasses

from nostr_sdk import Keys

from mesh402.discovery.listing import MeshListing
from mesh402.discovery.nostr import NostrDirectory


def publish_inflated(relay_url: str, real: MeshListing, node_count: int, ttl_s: float = 300.0) -> None:
    """Publish ``real`` (its real mesh id and invite) claiming ``node_count`` nodes, signed by a stranger's key."""
    async def go() -> None:
        d = NostrDirectory([relay_url], Keys.generate())
        try:
            fake = dataclasses.replace(real, node_count=node_count, total_capacity_bytes=10**15,
                                       author="", created_at=0, expires_at=0)
            assert await d.publish(fake, ttl_s)
        finally:
            await d.close()

    asyncio.run(go())
