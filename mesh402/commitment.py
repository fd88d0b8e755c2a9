"""The hash that commits to an activation payload on the wire.

Torch-free and shared: the engine's wire format, the stages' receipts and the entry's reveal checks
(mesh402.work.evidence) must hash the same bytes the same way."""

from __future__ import annotations

import hashlib


def activation_hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()
