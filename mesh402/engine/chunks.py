"""Fixed prefill step boundaries, shared by local sessions and pipeline hosts (no torch here)."""

from __future__ import annotations


def prefill_steps(start_pos: int, n_tokens: int, chunk: int) -> list[tuple[int, int]]:
    """Split n_tokens starting at absolute position start_pos into (offset, n_real) steps.

    Boundaries fall on multiples of `chunk`, so a prompt sent whole and one continued from a
    chunk-aligned prefix run the same steps; each step is padded to `chunk` rows by the caller.
    """
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    steps = []
    pos, i = start_pos, 0
    while i < n_tokens:
        n = min(n_tokens - i, chunk - pos % chunk)
        steps.append((i, n))
        pos += n
        i += n
    return steps
