"""Proof that a node holds a model's tensors: hashes of random slices of its own copy.

Before a node makes a peer the host of a model, gives it layers or experts, or routes to it as a replica,
it challenges the peer: a fresh nonce and a list of random slices of the model file (for a GGUF, one
slice inside a random tensor of every layer plus a few of the other tensors, so every layer range is
covered; for a folder, random slices of its weight files). The peer answers

    sha256("mesh402 holding proof v1\\n" || its node id || nonce || the bytes of every slice, in order)

from its own file, and the challenger computes the same from its copy. The peer's node id is in the hash,
so an answer relayed from another holder does not pass. A node that does not hold the bytes cannot answer
without fetching them from someone who does, slice by fresh slice; it can then serve the model anyway.
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOMAIN = b"mesh402 holding proof v1\n"
SLICE_BYTES = 1024
EXTRA_TENSORS = 4  # slices in non-layer tensors (embeddings, output, norms) besides one per layer
MAX_SLICES = 1024  # what a prover answers at most (a 1000-layer model)
MAX_SLICE_BYTES = 4096
FOLDER_SLICES = 32
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass(frozen=True)
class Slice:
    file: str  # "" for a single-file model; a file name inside a model folder
    offset: int
    length: int

    def to_json(self) -> list[Any]:
        return [self.file, self.offset, self.length]

    @classmethod
    def from_json(cls, v: Any) -> "Slice":
        """A slice from a challenger (untrusted): ValueError unless [file name, offset >= 0, 1..4096]."""
        if not (isinstance(v, list) and len(v) == 3):
            raise ValueError("a slice is [file, offset, length]")
        f, o, n = v
        if not isinstance(f, str) or len(f) > 255 or "/" in f or "\\" in f or f.startswith("."):
            raise ValueError("a slice names a plain file name")
        if type(o) is not int or type(n) is not int or o < 0 or not 0 < n <= MAX_SLICE_BYTES:
            raise ValueError(f"a slice is an offset >= 0 and 1..{MAX_SLICE_BYTES} bytes")
        return cls(f, o, n)


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def challenge(path: str | os.PathLike, rng: random.Random | None = None) -> list[Slice]:
    """Random slices of the model at `path` that only a node holding every layer can hash."""
    rng = rng or secrets.SystemRandom()
    p = Path(path)
    if p.is_dir():
        files = [(f.name, f.stat().st_size) for f in _weight_files(p)]
        files = [(n, s) for n, s in files if s > 0]
        if not files:
            raise ValueError(f"{p} has no weight files")
        out = []
        for _ in range(FOLDER_SLICES):
            name, size = rng.choice(files)
            n = min(SLICE_BYTES, size)
            out.append(Slice(name, rng.randrange(0, size - n + 1), n))
        return out
    from mesh402.models.gguf_meta import read_gguf_meta

    meta = read_gguf_meta(p)
    by_layer: dict[int, list[Any]] = {}
    other = []
    for t in meta.tensors:
        if t.n_bytes <= 0:
            continue
        (other if t.layer is None else by_layer.setdefault(t.layer, [])).append(t)
    picks = [rng.choice(ts) for _, ts in sorted(by_layer.items())]
    picks += rng.sample(other, min(EXTRA_TENSORS, len(other)))
    out = []
    for t in picks:
        n = min(SLICE_BYTES, t.n_bytes)
        out.append(Slice("", t.offset + rng.randrange(0, t.n_bytes - n + 1), n))
    return out


def answer(path: str | os.PathLike, node_id: str, nonce: bytes, slices: list[Slice]) -> str:
    """The proof (hex) over `slices` of the model at `path`, as node `node_id` for `nonce`. ValueError when
    a slice lies outside the model's files (a challenge no holder could answer)."""
    if len(slices) > MAX_SLICES:
        raise ValueError(f"at most {MAX_SLICES} slices per challenge")
    p = Path(path)
    h = hashlib.sha256(DOMAIN + node_id.encode() + b"\0" + bytes(nonce))
    handles: dict[str, Any] = {}
    try:
        for s in slices:
            if s.file not in handles:
                target = (p / s.file) if p.is_dir() else p
                if (s.file == "") == p.is_dir() or not target.is_file():
                    raise ValueError(f"no such weight file {s.file!r}")
                handles[s.file] = open(target, "rb")
            f = handles[s.file]
            f.seek(s.offset)
            data = f.read(s.length)
            if len(data) != s.length:
                raise ValueError("a slice lies beyond the end of the file")
            h.update(data)
    finally:
        for f in handles.values():
            f.close()
    return h.hexdigest()
