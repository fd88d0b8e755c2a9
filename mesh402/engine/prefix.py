"""Prompt-prefix KV reuse across requests (one engine, whole model).

Only rows computed by prefill chunks at chunk-aligned positions are kept: a prompt continued
from such a prefix runs exactly the prefill steps (same boundaries, same padding, same KV
rows) that the whole prompt would, so warm and cold runs give bit-identical logits. Rows
written by decode steps (one row at a time) or by a partial last chunk are never reused.

The cache is bounded (entries and bytes) and evicts the least recently used entry.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class _Entry:
    tokens: tuple[int, ...]  # chunk-aligned length
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per stage: k, v [layers, heads, len, dim]
    nbytes: int


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    def __init__(self, chunk: int, max_entries: int = 32, max_bytes: int = 256 * 1024 * 1024,
                 min_tokens: int | None = None) -> None:
        self.chunk = chunk
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.min_tokens = chunk if min_tokens is None else max(chunk, min_tokens)
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def _usable(self, entry_len: int, common: int, n_prompt: int) -> int:
        n = min(entry_len, common, n_prompt - 1)  # at least one token left to prefill (logits)
        return n // self.chunk * self.chunk

    def restore(self, session, ids: Sequence[int]) -> int:
        """Copy the longest cached chunk-aligned prefix of ``ids`` into an empty session; returns
        how many positions it now holds (0 on a miss)."""
        if len(session) != 0:
            return 0
        best, best_n = None, 0
        with self._lock:
            for key, e in self._entries.items():
                n = self._usable(len(key), _common(key, ids), len(ids))
                if n > best_n:
                    best, best_n = e, n
            if best is None or best_n < self.min_tokens:
                self.misses += 1
                return 0
            self._entries.move_to_end(best.tokens)
            self.hits += 1
            for kv, (k, v) in zip(session.kvs, best.kv):
                kv.ensure(best_n)
                kv.k[:, :, :best_n].copy_(k[:, :, :best_n])
                kv.v[:, :, :best_n].copy_(v[:, :, :best_n])
                kv.length = best_n
        session.tokens[:] = list(ids[:best_n])
        return best_n

    def store(self, session, n_prompt: int) -> None:
        """Keep the chunk-aligned prefill rows of a session's prompt (call right after prefill)."""
        n = n_prompt // self.chunk * self.chunk
        if n < self.min_tokens:
            return
        key = tuple(session.tokens[:n])
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            # an entry that is a prefix of this one is superseded by it
            for k in [k for k in self._entries if len(k) < n and key[:len(k)] == k]:
                self._drop(k)
            kv = [(c.k[:, :, :n].clone(), c.v[:, :, :n].clone()) for c in session.kvs]
            nbytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv)
            if nbytes > self.max_bytes:
                return
            self._entries[key] = _Entry(key, kv, nbytes)
            self.nbytes += nbytes
            while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self.evictions += 1

    def _drop(self, key: tuple[int, ...]) -> None:
        e = self._entries.pop(key)
        self.nbytes -= e.nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.nbytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}


# ---- row copies for pipeline stages (the host and each stage keep their own layers' rows)

def copy_rows(session, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Clones of KV rows [0, n) of every stage of a session."""
    return [(kv.k[:, :, :n].clone(), kv.v[:, :, :n].clone()) for kv in session.kvs]


def load_rows(session, rows: list[tuple[torch.Tensor, torch.Tensor]], n: int, tokens: Sequence[int] = ()) -> None:
    """Put rows [0, n) into an empty session (what prefilling those positions would have written)."""
    for kv, (k, v) in zip(session.kvs, rows):
        kv.ensure(n)
        kv.k[:, :, :n].copy_(k[:, :, :n])
        kv.v[:, :, :n].copy_(v[:, :, :n])
        kv.length = n
    session.tokens[:] = list(tokens[:n])


class RowStore:
    """A bounded LRU of row copies by key (pipeline hosts and stage workers)."""

    def __init__(self, max_entries: int = 16, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._d: OrderedDict = OrderedDict()
        self.nbytes = 0
        self._lock = threading.Lock()

    def put(self, key, value, nbytes: int) -> None:
        with self._lock:
            if key in self._d:
                self.nbytes -= self._d.pop(key)[1]
            self._d[key] = (value, nbytes)
            self.nbytes += nbytes
            while len(self._d) > self.max_entries or self.nbytes > self.max_bytes:
                _, (_, b) = self._d.popitem(last=False)
                self.nbytes -= b

    def get(self, key):
        with self._lock:
            hit = self._d.get(key)
            if hit is None:
                return None
            self._d.move_to_end(key)
            return hit[0]

    def items(self):
        with self._lock:
            return list((k, v[0]) for k, v in self._d.items())

    def __len__(self) -> int:
        return len(self._d)


def rows_nbytes(rows) -> int:
    return sum(k.numel() * k.element_size() * 2 for k, _ in rows)
