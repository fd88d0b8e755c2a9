"""Lightweight GGUF header reader (no torch).

``read_gguf_meta(path)`` parses the GGUF header (key/value metadata and the
tensor table) with plain ``struct``/numpy reads; it does not memmap or touch
tensor data, so it is much faster than ``gguf.GGUFReader`` (tens of ms against
~1.7 s for SmolLM2-135M).

Shapes in :class:`TensorInfo` are in numpy/torch order (outermost first), i.e.
``(out_features, in_features)`` for a weight matrix -- the reverse of ggml's
``ne`` order stored in the file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = [
    "GGUFMeta",
    "GGUFFormatError",
    "TensorInfo",
    "file_fingerprint",
    "read_gguf_meta",
    "tensor_nbytes",
]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)

_SCALAR_FMT = {
    _UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I", _INT32: "<i",
    _FLOAT32: "<f", _BOOL: "<?", _UINT64: "<Q", _INT64: "<q", _FLOAT64: "<d",
}
_NP_DTYPE = {
    _UINT8: "<u1", _INT8: "<i1", _UINT16: "<u2", _INT16: "<i2", _UINT32: "<u4", _INT32: "<i4",
    _FLOAT32: "<f4", _BOOL: "?", _UINT64: "<u8", _INT64: "<i8", _FLOAT64: "<f8",
}

_BLK_RE = re.compile(r"^blk\.(\d+)\.")


class GGUFFormatError(ValueError):
    """The file is not a (supported) GGUF file."""


def _ggml_type_name(t: int) -> str:
    try:
        return GGMLQuantizationType(t).name
    except ValueError:
        return f"TYPE_{t}"


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Exact number of bytes a tensor of ``ggml_type`` and ``shape`` occupies."""
    n = 1
    for d in shape:
        n *= int(d)
    try:
        block, tsize = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError) as e:
        raise GGUFFormatError(f"unknown ggml type {ggml_type}") from e
    if n % block:
        raise GGUFFormatError(f"tensor of {n} elements not a multiple of block size {block}")
    return n // block * tsize


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int        # numeric GGMLQuantizationType
    type_name: str        # e.g. "Q4_1", "F32"
    shape: tuple[int, ...]  # numpy order: (rows, cols) for a matrix
    n_bytes: int
    offset: int           # absolute byte offset of the tensor data in the file

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def layer(self) -> int | None:
        m = _BLK_RE.match(self.name)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class GGUFMeta:
    path: str
    architecture: str
    name: str
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_ctx: int
    vocab_size: int
    rope_theta: float
    rms_eps: float
    expert_count: int
    expert_used_count: int
    file_size: int
    quant: str                     # dominant ggml type (by bytes of >=2-D tensors)
    quant_counts: dict[str, int] = field(compare=False, hash=False, repr=False)
    tensors: tuple[TensorInfo, ...] = field(compare=False, hash=False, repr=False)
    data_offset: int = 0
    alignment: int = DEFAULT_ALIGNMENT
    version: int = 3
    # All key/value metadata (arrays as python lists / numpy arrays). Large
    # tokenizer arrays included; used by the tokenizer and loaders.
    fields: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    # -- helpers ---------------------------------------------------------
    @property
    def tied_embeddings(self) -> bool:
        return self.tensor("output.weight") is None

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def tensor(self, name: str) -> TensorInfo | None:
        return self._index().get(name)

    def _index(self) -> dict[str, TensorInfo]:
        idx = self.__dict__.get("_idx")
        if idx is None:
            idx = {t.name: t for t in self.tensors}
            object.__setattr__(self, "_idx", idx)
        return idx

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def stage_tensors(self, start: int, end: int) -> list[TensorInfo]:
        """Tensors a pipeline stage holding layers [start, end) needs.

        Embeddings if ``start == 0``; final norm + lm_head if ``end == n_layers``
        (a tied embedding counts on both end stages); per-layer tensors of its
        layers; any other global tensor (e.g. ``rope_freqs``) on every stage.
        """
        if not (0 <= start < end <= self.n_layers):
            raise ValueError(f"bad layer range [{start}, {end}) for {self.n_layers} layers")
        first, last = start == 0, end == self.n_layers
        out = []
        for t in self.tensors:
            layer = t.layer
            if layer is not None:
                if start <= layer < end:
                    out.append(t)
            elif t.name.startswith("token_embd."):
                if first or (last and t.name == "token_embd.weight" and self.tied_embeddings):
                    out.append(t)
            elif t.name.startswith("output_norm.") or t.name.startswith("output."):
                if last:
                    out.append(t)
            else:
                out.append(t)
        return out

    def stage_bytes(self, start: int, end: int) -> int:
        """Exact tensor bytes a stage holding layers [start, end) needs."""
        return sum(t.n_bytes for t in self.stage_tensors(start, end))


# ---------------------------------------------------------------------------
# parsing


class _Buf:
    """Sequential reader over a bytes buffer (the header is read in one go)."""

    __slots__ = ("f", "buf", "pos", "base")

    def __init__(self, f: BinaryIO):
        self.f = f
        self.buf = b""
        self.pos = 0
        self.base = 0  # file offset of buf[0]

    def _need(self, n: int) -> None:
        if self.pos + n <= len(self.buf):
            return
        rest = self.buf[self.pos:]
        chunk = self.f.read(max(n - len(rest), 4 << 20))
        self.base += self.pos
        self.buf = rest + chunk
        self.pos = 0
        if len(self.buf) < n:
            raise GGUFFormatError("unexpected end of file in GGUF header")

    def tell(self) -> int:
        return self.base + self.pos

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        self._need(n)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def bytes(self, n: int) -> bytes:
        self._need(n)
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def string(self) -> str:
        n = self.unpack("<Q")
        return self.bytes(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<IQ")
            if etype == _STRING:
                return self._string_array(count)
            if etype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            dt = np.dtype(_NP_DTYPE[etype])
            raw = self.bytes(count * dt.itemsize)
            return np.frombuffer(raw, dtype=dt).copy()
        fmt = _SCALAR_FMT.get(vtype)
        if fmt is None:
            raise GGUFFormatError(f"unknown GGUF value type {vtype}")
        return self.unpack(fmt)

    def _string_array(self, count: int) -> list[str]:
        # A tokenizer's vocabulary and merges: ~100k short strings, so the loop stays lean (locals only, the
        # buffer refilled only when a string could cross its end).
        out: list[str] = []
        append = out.append
        unpack_from = struct.unpack_from
        buf, pos = self.buf, self.pos
        for _ in range(count):
            if pos + 8 > len(buf):
                self.pos = pos
                self._need(8)
                buf, pos = self.buf, self.pos
            (n,) = unpack_from("<Q", buf, pos)
            pos += 8
            if pos + n > len(buf):
                self.pos = pos
                self._need(n)
                buf, pos = self.buf, self.pos
            append(buf[pos:pos + n].decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out


def read_gguf_meta(path: str | os.PathLike, *, vocabulary: bool = False) -> GGUFMeta:
    """Parse the header of a GGUF file into a :class:`GGUFMeta`.

    A node reads the same header from its start-up checks, its profile, its listing, the engine's layout and
    the work store; the parse (~0.1 s, mostly the vocabulary) is kept per file version (path, size, mtime)
    without the tokenizer's arrays (vocabulary, merges, scores: megabytes nobody but the tokenizer reads), so
    those callers share it. ``vocabulary=True`` parses the file again and keeps everything, for the tokenizer.
    Each caller gets its own ``fields`` dict; the values in it are shared and read-only."""
    path = Path(path).resolve()
    st = path.stat()
    if vocabulary:
        return _parse(path, st.st_size)
    meta = _read_light(path, st.st_size, st.st_mtime_ns)
    return dataclasses.replace(meta, fields=dict(meta.fields))


@functools.lru_cache(maxsize=8)
def _read_light(path: Path, file_size: int, mtime_ns: int) -> GGUFMeta:
    meta = _parse(path, file_size)
    light = {k: v for k, v in meta.fields.items()
             if not (k.startswith("tokenizer.ggml.") and isinstance(v, (list, np.ndarray)))}
    return dataclasses.replace(meta, fields=light)


def _parse(path: Path, file_size: int) -> GGUFMeta:
    with open(path, "rb") as f:
        r = _Buf(f)
        if r.bytes(4) != GGUF_MAGIC:
            raise GGUFFormatError(f"{path}: not a GGUF file")
        version = r.unpack("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: unsupported GGUF version {version} (big-endian?)")
        n_tensors, n_kv = r.unpack("<QQ")
        fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            vtype = r.unpack("<I")
            fields[key] = r.value(vtype)
        raw_tensors = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.unpack("<I")
            dims = r.unpack("<" + "Q" * n_dims) if n_dims else ()
            if n_dims == 1:
                dims = (dims,)
            ttype, off = r.unpack("<IQ")
            raw_tensors.append((name, tuple(int(d) for d in dims), int(ttype), int(off)))
        header_end = r.tell()

    alignment = int(fields.get("general.alignment", DEFAULT_ALIGNMENT))
    data_offset = (header_end + alignment - 1) // alignment * alignment
    tensors = []
    for name, ne, ttype, off in raw_tensors:
        shape = tuple(reversed(ne))
        nb = tensor_nbytes(ttype, shape)
        abs_off = data_offset + off
        if abs_off + nb > file_size:
            raise GGUFFormatError(f"{path}: tensor {name} extends past end of file")
        tensors.append(TensorInfo(name, ttype, _ggml_type_name(ttype), shape, nb, abs_off))

    arch = str(fields.get("general.architecture", "llama"))

    def g(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

    def gi(key: str, default: int = 0) -> int:
        v = g(key, default)
        if isinstance(v, np.ndarray):  # per-layer arrays (rare): take the max
            v = int(v.max()) if v.size else default
        return int(v)

    n_layers = gi("block_count")
    hidden = gi("embedding_length")
    n_heads = gi("attention.head_count")
    n_kv = gi("attention.head_count_kv", n_heads) or n_heads
    head_dim = gi("attention.key_length", 0) or (hidden // n_heads if n_heads else 0)
    vocab = g("vocab_size")
    if vocab is None:
        toks = fields.get("tokenizer.ggml.tokens")
        if toks is not None:
            vocab = len(toks)
        else:
            emb = next((t for t in tensors if t.name == "token_embd.weight"), None)
            vocab = emb.shape[0] if emb else 0
    quant_bytes: dict[str, int] = {}
    quant_counts: dict[str, int] = {}
    for t in tensors:
        quant_counts[t.type_name] = quant_counts.get(t.type_name, 0) + 1
        if len(t.shape) >= 2:
            quant_bytes[t.type_name] = quant_bytes.get(t.type_name, 0) + t.n_bytes
    quant = max(quant_bytes, key=quant_bytes.get) if quant_bytes else (
        max(quant_counts, key=quant_counts.get) if quant_counts else "")

    return GGUFMeta(
        path=str(path),
        architecture=arch,
        name=str(fields.get("general.name", path.stem)),
        n_layers=n_layers,
        hidden=hidden,
        ffn=gi("feed_forward_length"),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        n_ctx=gi("context_length"),
        vocab_size=int(vocab),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rms_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        expert_count=gi("expert_count", 0),
        expert_used_count=gi("expert_used_count", 0),
        file_size=file_size,
        quant=quant,
        quant_counts=quant_counts,
        tensors=tuple(tensors),
        data_offset=data_offset,
        alignment=alignment,
        version=version,
        fields=fields,
    )


def file_fingerprint(path: str | os.PathLike, chunk: int = 8 << 20) -> str:
    """sha256 (hex) of the whole file, streamed in 8 MiB chunks. Callers cache it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
