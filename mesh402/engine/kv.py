"""Per-session, per-stage KV cache.

Layout: ``k``/``v`` are ``[n_layers, n_kv_heads, cap, head_dim]``. Capacity grows
in multiples of the prefill chunk (never the full context) up to ``max_cap``,
which is ``max_len`` rounded up to a chunk plus one chunk of slack: a padded
prefill chunk starting at position ``s`` writes rows ``[s, s + C)``.
"""

from __future__ import annotations

import torch

from .errors import ContextTooLong

__all__ = ["KVCache", "kv_capacity", "kv_bytes_for"]


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def kv_capacity(max_len: int, chunk: int) -> int:
    return _round_up(max(max_len, 1), chunk) + chunk


def kv_bytes_for(n_layers: int, n_kv_heads: int, head_dim: int, cap: int, dtype: torch.dtype) -> int:
    return 2 * n_layers * n_kv_heads * cap * head_dim * torch.empty((), dtype=dtype).element_size()


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int, *,
                 chunk: int = 32, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", initial: int | None = None):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.max_len = max_len
        self.chunk = chunk
        self.max_cap = kv_capacity(max_len, chunk)
        self.dtype = dtype
        self.device = torch.device(device)
        self.length = 0
        self.cap = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.closed = False
        self.ensure(initial if initial is not None else min(self.max_cap, 4 * chunk))

    # -- capacity ---------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes currently allocated."""
        return kv_bytes_for(self.n_layers, self.n_kv_heads, self.head_dim, self.cap, self.dtype)

    @property
    def max_bytes(self) -> int:
        """Bytes this cache may grow to."""
        return kv_bytes_for(self.n_layers, self.n_kv_heads, self.head_dim, self.max_cap, self.dtype)

    def ensure(self, n: int) -> None:
        """Make room for positions [0, n)."""
        if self.closed:
            raise RuntimeError("KV cache is closed")
        if n <= self.cap:
            return
        if n > self.max_cap:
            raise ContextTooLong(f"KV needs {n} positions, session capacity is {self.max_cap}")
        new_cap = min(self.max_cap, max(_round_up(n, self.chunk), 2 * self.cap))
        shape = (self.n_layers, self.n_kv_heads, new_cap, self.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.k is not None and self.length:
            k[:, :, :self.cap].copy_(self.k)
            v[:, :, :self.cap].copy_(self.v)
        self.k, self.v, self.cap = k, v, new_cap

    # -- contents ---------------------------------------------------------
    def __len__(self) -> int:
        return self.length

    def truncate(self, n: int) -> None:
        if n < 0 or n > self.length:
            raise ValueError(f"cannot truncate KV of length {self.length} to {n}")
        self.length = n

    def free(self) -> None:
        self.k = self.v = None
        self.cap = 0
        self.length = 0
        self.closed = True
