"""Which peers proved to this node that they hold a model's tensors (mesh402/models/holding.py), and this
node's answers to such challenges.

A node believes a peer holds a model (so it may elect it host, give it layers or experts, or route to it
as a replica) only after the peer answered a fresh challenge over random slices of the model from its own
copy, checked against this node's copy. Proofs are asked in the background as soon as a peer announces a
model this node holds, cached for `ttl_s`; a failed one is asked again after a backoff that starts at
`first_retry_s` and doubles up to `retry_s` (a peer that just joined often cannot answer yet: its serving
side starts after it joins, and a flat 30 s wait left a new split unformed that long). A node
answers a bounded number of challenges per peer and minute (each one reads ~n_layers KiB from disk).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.models.holding import Slice, answer, challenge
from mesh402.serving.stage_link import K, Link, dump_json, error_frame, expect_stage, stage_frame

log = logging.getLogger(__name__)

PROOF_TTL_S = 3600.0
RETRY_S = 30.0
FIRST_RETRY_S = 1.0
TIMEOUT_S = 15.0
MAX_PENDING = 16  # proofs this node asks at once
ANSWERS_PER_MINUTE = 30  # challenges one peer may have this node answer per minute
MAX_TRACKED = 4096  # (peer, model) proofs remembered


class Holdings:
    def __init__(self, me: str, connect: Callable[[str], Awaitable[Link]], path_of: Callable[[str], Path | None],
                 *, clock: Callable[[], float] = time.monotonic, ttl_s: float = PROOF_TTL_S,
                 retry_s: float = RETRY_S, first_retry_s: float = FIRST_RETRY_S, timeout_s: float = TIMEOUT_S,
                 on_change: Callable[[], None] | None = None) -> None:
        """`path_of(content_hash)`: this node's copy of a model (None when it holds none)."""
        self.me, self.connect, self.path_of, self.clock = me, connect, path_of, clock
        self.ttl_s, self.retry_s, self.first_retry_s, self.timeout_s = ttl_s, retry_s, first_retry_s, timeout_s
        self.on_change = on_change
        self._proven: dict[tuple[str, str], float] = {}  # (peer, content hash) -> proven at
        self._failed: dict[tuple[str, str], float] = {}  # -> failed at
        self._fails: dict[tuple[str, str], int] = {}  # -> failures in a row (sets the backoff)
        self._pending: dict[tuple[str, str], asyncio.Task[bool]] = {}
        self._answered: dict[str, list[float]] = {}  # peer -> times this node answered it (last minute)
        self.asked = self.passed = self.refused = self.answered = 0

    # ------------------------------------------------------------------ challenger
    def proven(self, peer: str, content_hash: str) -> bool:
        t = self._proven.get((peer, content_hash))
        return t is not None and self.clock() - t < self.ttl_s

    def holders(self, content_hash: str) -> list[str]:
        """Peers with a current proof for the model."""
        return sorted(p for (p, ch) in list(self._proven) if ch == content_hash and self.proven(p, ch))

    def want(self, peer: str, content_hash: str) -> None:
        """Ask `peer` for a proof in the background unless one is current, pending, or failed just now."""
        key = (peer, content_hash)
        if self.proven(*key) or key in self._pending or len(self._pending) >= MAX_PENDING:
            return
        failed = self._failed.get(key)
        if failed is not None and self.clock() - failed < self.backoff(key):
            return
        if self.path_of(content_hash) is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(self.prove(peer, content_hash))
        except RuntimeError:
            return
        self._pending[key] = task
        task.add_done_callback(lambda _t, k=key: self._pending.pop(k, None))

    def backoff(self, key: tuple[str, str]) -> float:
        """How long after its last failure a proof is asked again: 1, 2, 4 ... seconds, at most `retry_s`."""
        fails = self._fails.get(key, 1)
        return min(self.retry_s, self.first_retry_s * 2 ** min(fails - 1, 16))

    async def ensure(self, peer: str, content_hash: str) -> bool:
        """Whether `peer` holds the model, asking it now (or joining the proof under way) if need be."""
        key = (peer, content_hash)
        if self.proven(*key):
            return True
        task = self._pending.get(key)
        if task is not None:
            return await asyncio.shield(task)
        return await self.prove(peer, content_hash)

    async def prove(self, peer: str, content_hash: str) -> bool:
        path = self.path_of(content_hash)
        if path is None:
            return False
        key = (peer, content_hash)
        self.asked += 1
        nonce = secrets.token_bytes(16)
        ok, why = False, ""
        try:
            slices = await asyncio.to_thread(challenge, path)
            want = await asyncio.to_thread(answer, path, peer, nonce, slices)
            link = await self.connect(peer)
            try:
                await link.send(stage_frame(K.STAGE_KIND_HOLDING_PROOF, content_hash=content_hash,
                                            params={"nonce": nonce.hex(),
                                                    "slices": dump_json([s.to_json() for s in slices])}))
                rs = expect_stage(await link.recv(self.timeout_s), K.STAGE_KIND_RESULT, f"node {peer[:12]}")
            finally:
                try:
                    await link.finish()
                except Exception:
                    pass
            got = rs.params.get("proof", "")
            ok = secrets.compare_digest(got.encode(), want.encode())
            why = "" if ok else "wrong proof"
        except Exception as e:  # no answer, an error, a refusal: not proven (asked again after retry_s)
            why = f"{type(e).__name__}: {e}"
        self._remember(key, ok)
        if ok:
            self.passed += 1
        else:
            log.info("%s did not prove it holds %s: %s", peer[:12], content_hash[:12], why[:200])
        return ok

    def _remember(self, key: tuple[str, str], ok: bool) -> None:
        was = self.proven(*key)
        (self._proven if ok else self._failed)[key] = self.clock()
        (self._failed if ok else self._proven).pop(key, None)
        if ok:
            self._fails.pop(key, None)
        else:
            self._fails[key] = self._fails.get(key, 0) + 1
        for table in (self._proven, self._failed, self._fails):
            while len(table) > MAX_TRACKED:
                table.pop(next(iter(table)))
        if ok != was and self.on_change is not None:
            self.on_change()

    def forget(self, peer: str) -> None:
        """A peer that left: its proofs go (a node that comes back proves again)."""
        for table in (self._proven, self._failed, self._fails):
            for key in [k for k in table if k[0] == peer]:
                del table[key]

    # ------------------------------------------------------------------ prover
    async def on_challenge(self, peer: str, sf: pb.StageFrame) -> pb.Frame:
        """Answer a challenge from this node's own copy of the model (the STAGE_KIND_HOLDING_PROOF service)."""
        now = self.clock()
        recent = [t for t in self._answered.get(peer, []) if now - t < 60.0]
        if len(recent) >= ANSWERS_PER_MINUTE:
            self.refused += 1
            return error_frame(sf.request_id, "too many holding challenges from this peer", self.me, "busy")
        recent.append(now)  # every challenge counts, answered or not
        self._answered[peer] = recent
        while len(self._answered) > MAX_TRACKED:
            self._answered.pop(next(iter(self._answered)))
        path = self.path_of(sf.content_hash)
        if path is None:
            self.refused += 1
            return error_frame(sf.request_id, f"no model {sf.content_hash[:16]} on this node", self.me, "not_held")
        try:
            nonce = bytes.fromhex(sf.params.get("nonce", ""))
            raw = json.loads(sf.params.get("slices", "[]"))
            if not isinstance(raw, list) or len(nonce) > 64:
                raise ValueError("a challenge is a nonce and a list of slices")
            slices = [Slice.from_json(v) for v in raw]
            proof = await asyncio.to_thread(answer, path, self.me, nonce, slices)
        except ValueError as e:
            self.refused += 1
            return error_frame(sf.request_id, f"bad challenge: {e}", self.me, "bad_challenge")
        self.answered += 1
        return stage_frame(K.STAGE_KIND_RESULT, request_id=sf.request_id, params={"proof": proof})

    def status(self) -> dict[str, Any]:
        return {"asked": self.asked, "passed": self.passed, "answered": self.answered, "refused": self.refused,
                "proven": len([k for k in self._proven if self.proven(*k)])}
