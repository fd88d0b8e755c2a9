"""Commit–reveal of activations and the spot checks built from a reveal (see docs/verification.md).

Pure code: hashes and JSON, no torch. The re-execution itself is engine code (mesh402.engine.verify)."""

from __future__ import annotations

import hashlib
import struct

FP_SIZE = 256  # logits the last stage commits to per step
LAST_STEP_DOMAIN = b"mesh402 last-stage step v1"


def fingerprint_ids(request_id: str, vocab_size: int, n: int = FP_SIZE) -> list[int]:
    """`n` distinct vocabulary ids picked by SHA-256 in counter mode over the request id (sorted)."""
    n = min(n, vocab_size)
    out: set[int] = set()
    counter = 0
    while len(out) < n:
        block = hashlib.sha256(b"mesh402 fingerprint ids\0" + request_id.encode() + struct.pack("<Q", counter)).digest()
        for j in range(0, 32, 4):
            out.add(int.from_bytes(block[j:j + 4], "little") % vocab_size)
            if len(out) == n:
                break
        counter += 1
    return sorted(out)


def last_step_hash(token: int | None, fingerprint: bytes) -> bytes:
    """The last stage's per-step output hash: the token it drew (-1: none) and its logits fingerprint."""
    t = -1 if token is None else int(token)
    return hashlib.sha256(LAST_STEP_DOMAIN + struct.pack("<q", t) + bytes(fingerprint)).digest()
