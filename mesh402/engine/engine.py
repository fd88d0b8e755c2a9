"""Engine (a model as a pipeline of local stages) and Session (one sequence's KV state).

Prefill is chunked at fixed absolute positions: chunk boundaries fall on
multiples of ``prefill_chunk`` (C) and every chunk is padded to C rows, so each
prefill token meets the same matmul shapes no matter how the prompt was split
across calls (fast mode's dense stages compute only a chunk's real rows: Stage.forward).
A prompt sent whole and the same prompt continued from a cached chunk-aligned prefix
give bit-identical logits. Decode runs one row per step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence, overload

import numpy as np
import torch

from .batch import batchable, forward_rows, rows_independent
from .chunks import prefill_steps
from .errors import ContextTooLong, EngineError, EngineFull
from .grammar import GrammarCompiler
from .kv import KVCache, kv_capacity
from .model import Stage
from .tokenizer import Tokenizer
from .weights import GGUFSource, HFSource, WeightSource, open_source

__all__ = ["Engine", "Session", "ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    arch: str
    n_layers: int
    n_ctx: int
    vocab_size: int
    hidden: int
    n_params: int
    file_bytes: int


def _meta_reader(meta):
    """A ``gguf.GGUFReader`` look-alike over our already-parsed header fields.

    ``gguf.GGUFReader`` memory-maps and indexes the whole file (~1.7 s and ~160 MB
    of RSS for SmolLM2); the tokenizer only needs the metadata we already hold.
    Provides ``fields[key]`` with ``types``/``parts``/``data`` like ReaderField.
    """
    import gguf
    import numpy as np

    VT = gguf.GGUFValueType

    class _Field:
        __slots__ = ("name", "types", "parts", "data")

        def __init__(self, name, value):
            self.name = name
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                self.types = [VT.ARRAY, VT.STRING]
                self.parts = [v.encode("utf-8") for v in value]
                self.data = range(len(value))
            elif isinstance(value, (list, np.ndarray)):
                arr = np.asarray(value)
                self.types = [VT.ARRAY, VT.INT32 if arr.dtype.kind in "iub" else VT.FLOAT32]
                self.parts = arr.reshape(-1, 1)
                self.data = range(arr.shape[0])
            elif isinstance(value, str):
                self.types = [VT.STRING]
                self.parts = [value.encode("utf-8")]
                self.data = [0]
            else:
                self.types = [VT.BOOL if isinstance(value, bool) else
                              VT.FLOAT32 if isinstance(value, float) else VT.UINT32]
                self.parts = [np.array([value])]
                self.data = [0]

    class _MetaReader(gguf.GGUFReader):
        def __init__(self, fields):  # noqa: D401 - deliberately does not call super().__init__
            self.fields = _LazyFields(fields)

    class _LazyFields(dict):
        def __init__(self, raw):
            super().__init__()
            self._raw = raw

        def get(self, key, default=None):
            if key not in self._raw:
                return default
            return _Field(key, self._raw[key])

        def __getitem__(self, key):
            return _Field(key, self._raw[key])

        def __contains__(self, key):
            return key in self._raw

    return _MetaReader(meta.fields)


def _load_tokenizer(src: WeightSource):
    """(tokenizer, chat_template) from the helper's modules; (None, None) if unavailable."""
    try:
        from .tokenizer import Tokenizer
    except Exception:  # pragma: no cover - module missing
        return None, None
    try:
        if isinstance(src, GGUFSource):
            try:
                tok = Tokenizer.from_gguf(_meta_reader(src.meta))
            except Exception:
                tok = Tokenizer.from_gguf(src.path)
            # the tokenizer now owns the vocabulary: drop our parsed copy (~7 MB for a 49k vocab)
            for k in [k for k, v in src.meta.fields.items()
                      if k.startswith("tokenizer.ggml.") and isinstance(v, (list, np.ndarray))]:
                del src.meta.fields[k]
        elif isinstance(src, HFSource) and (src.path / "tokenizer.json").exists():
            tok = Tokenizer.from_hf_dir(src.path)
        else:
            return None, None
    except Exception:
        return None, None
    tmpl = None
    src_t = getattr(tok, "chat_template", None)
    if src_t:
        try:
            from .chat_template import ChatTemplate

            tmpl = ChatTemplate(src_t, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        except Exception:
            tmpl = None
    return tok, tmpl


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc): load-time transients otherwise stay resident.

    Also pins glibc's mmap threshold: by default it rises after large blocks are freed (up to 32 MiB),
    so big load-time and per-step blocks come from the heap and fragment it; pinned, blocks above it are
    mmapped and returned at once (measured: ~10 MB less steady-state RSS on SmolLM2). Pinned at 2 MiB,
    not lower: a step's temporaries (a 32-row prefill chunk's activations, a batched step's logits rows)
    stay below it and reuse heap pages. At 64 KiB each was a fresh mmap, page-faulted on every step: on
    the engine thread a prefill chunk took 46-59 ms instead of 26-28, an 8-row decode step 15.4-16.4 ms
    instead of 13.7-14.6, for about +0.01 of peak RSS / file (tests/engine/test_memory.py).
    """
    try:
        import ctypes
        import sys

        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(_M_MMAP_THRESHOLD, 2 * 1024 * 1024)
            libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
            libc.malloc_trim(0)
    except Exception:  # pragma: no cover - non-glibc
        pass


class Engine:
    """A loaded model (or a layer range of it) in this process."""

    def __init__(self, source: WeightSource, stages: list[Stage], *, max_sessions: int = 16,
                 max_kv_bytes: int | None = None, prefill_chunk: int = 32, load_tokenizer: bool = True):
        cfg = source.config
        self.source = source
        self.config = cfg
        self.stages = stages
        self.mode = stages[0].mode
        self.device = stages[0].device
        self.layers = (stages[0].layers[0], stages[-1].layers[1])
        self.max_sessions = max_sessions
        self.max_kv_bytes = max_kv_bytes
        self.prefill_chunk = prefill_chunk
        self.info = ModelInfo(arch=cfg.arch, n_layers=cfg.n_layers, n_ctx=cfg.n_ctx,
                              vocab_size=cfg.vocab_size, hidden=cfg.hidden, n_params=source.n_params,
                              file_bytes=source.file_bytes)
        self.tokenizer, self.chat_template = _load_tokenizer(source) if load_tokenizer else (None, None)
        eos = list(getattr(self.tokenizer, "eos_ids", []) or [])
        if not eos and isinstance(source, GGUFSource):
            e = source.meta.get("tokenizer.ggml.eos_token_id")
            eos = [int(e)] if e is not None else []
        if not eos and isinstance(source, HFSource):
            e = source.hf_config.get("eos_token_id")
            eos = [int(x) for x in (e if isinstance(e, list) else [e]) if x is not None]
        self.eos_token_ids: list[int] = eos
        self._lock = threading.Lock()
        self._sessions: set[Session] = set()
        self._reserved = 0
        self._rows_batched: dict[int, bool] = {}  # decode width -> fast kernels proven row-independent
        self._grammars: GrammarCompiler | None = None  # GrammarCompiler, built on first use (grammar_compiler)

    # ------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, mode: Literal["exact", "fast"] = "exact", device: str = "cpu",
             layers: tuple[int, int] | None = None, max_sessions: int = 16, prefill_chunk: int = 32,
             max_kv_bytes: int | None = None, splits: Sequence[int] | None = None,
             load_tokenizer: bool = True, experts=None) -> "Engine":
        """Load a GGUF file or a Hugging Face folder.

        ``layers=(a, b)`` loads only that range (a pipeline stage). ``splits``
        (e.g. ``[0, 10, 20, 30]``) runs the range as several stages in this
        process (testing / pipeline emulation). ``experts``: an MoE expert runner (e.g. expert
        parallel over other nodes); default: every expert of the loaded layers held here.
        """
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        src = open_source(path)
        n = src.config.n_layers
        a, b = layers if layers is not None else (0, n)
        bounds = list(splits) if splits is not None else [a, b]
        if bounds[0] != a or bounds[-1] != b or any(x >= y for x, y in zip(bounds, bounds[1:])):
            raise ValueError(f"splits {bounds} do not cover layers [{a}, {b})")
        stages = [Stage(src, (x, y), mode=mode, device=device, experts=experts)
                  for x, y in zip(bounds, bounds[1:])]
        eng = cls(src, stages, max_sessions=max_sessions, max_kv_bytes=max_kv_bytes,
                  prefill_chunk=prefill_chunk, load_tokenizer=load_tokenizer)
        _trim_heap()
        return eng

    def grammar_compiler(self) -> GrammarCompiler:
        """This model's `GrammarCompiler` (one per loaded model, ~0.3 s to build, on first use). A stage loaded
        without its tokenizer (the last stage of a split draws constrained tokens) reads the vocabulary now."""
        with self._lock:
            if self._grammars is None:
                tok = self.tokenizer
                if tok is None:
                    tok = Tokenizer.from_gguf(self.source.path) if isinstance(self.source, GGUFSource) \
                        else Tokenizer.from_hf_dir(self.source.path)
                self._grammars = GrammarCompiler(tok)
            return self._grammars

    @property
    def is_full_model(self) -> bool:
        return self.stages[0].first and self.stages[-1].last

    @property
    def weight_bytes(self) -> int:
        return sum(s.weight_bytes for s in self.stages)

    def prefill_rows(self, n: int) -> int:
        """Rows a prefill chunk of ``n`` real tokens computes: ``n`` where every stage skips the padding (fast
        mode, dense), else the whole chunk. What a step's token budget should be charged."""
        if all(st.skips_padding for st in self.stages):
            return n
        return self.prefill_chunk

    def kv_bytes_for(self, max_len: int) -> int:
        cap = kv_capacity(max_len, self.prefill_chunk)
        return sum(s.kv_bytes_per_token() for s in self.stages) * cap

    @property
    def kv_bytes_in_use(self) -> int:
        with self._lock:
            return sum(s.kv_bytes for s in self._sessions)

    @property
    def kv_bytes_reserved(self) -> int:
        return self._reserved

    @property
    def n_sessions(self) -> int:
        return len(self._sessions)

    def rows_batched(self, width: int) -> bool:
        """Whether a decode step of ``width`` rows may run each fast kernel once for all rows (probed once
        per width: see engine.batch.rows_independent); otherwise the rows are multiplied one by one."""
        proven = max((w for w, ok in self._rows_batched.items() if ok), default=0)
        if width <= proven:  # a probe of width w covers every width up to w
            return True
        if width not in self._rows_batched:
            self._rows_batched[width] = all(rows_independent(st, width) for st in self.stages)
        return self._rows_batched[width]

    @torch.inference_mode()
    def decode_batch(self, sessions: Sequence["Session"], tokens: Sequence[int]) -> torch.Tensor:
        """One decode step for several sessions at once: fp32 logits ``[B, vocab]``, row ``i`` bit-identical
        to ``sessions[i].decode(tokens[i])`` alone (engine.batch). A session may take several adjacent rows
        (speculative verification): they are its next positions, each computed as successive 1-row decodes
        would compute it. Full-model engines only."""
        if len(sessions) != len(tokens) or not sessions:
            raise ValueError("one token per session, at least one session")
        runs = [s for i, s in enumerate(sessions) if i == 0 or sessions[i - 1] is not s]
        if len({id(s) for s in runs}) != len(runs):
            raise ValueError("a session's rows must be adjacent in one step")
        for s in runs:
            if s.engine is not self:
                raise EngineError("session of another engine")
            s._check(sum(1 for t in sessions if t is s))
        V = self.config.vocab_size
        ids = [int(t) for t in tokens]
        if min(ids) < 0 or max(ids) >= V:
            raise ValueError(f"token id out of range [0, {V})")
        if len(sessions) == 1 or not all(batchable(st) for st in self.stages):
            return torch.stack([s.decode(t) for s, t in zip(sessions, ids)])
        pos = []
        for i, s in enumerate(sessions):
            pos.append(pos[-1] + 1 if i and sessions[i - 1] is s else len(s))
        x = self._rows(sessions, pos, torch.tensor(ids, dtype=torch.long, device=self.device))
        for s, p, t in zip(sessions, pos, ids):
            s.tokens[p:] = [t]
        return x

    @torch.inference_mode()
    def forward_batch(self, sessions: Sequence["Session"], xs: Sequence[torch.Tensor | Sequence[int]]
                      ) -> list[torch.Tensor | Exception]:
        """One decode step of a partial engine (a pipeline stage) for several sessions at once: ``xs[i]`` is
        the next row of ``sessions[i]`` (one row per session): token ids on the first stage (a list, or a long
        tensor ``[1]``), an fp32 hidden row ``[1, hidden]`` otherwise. Returns, per row, exactly what
        ``sessions[i].forward(xs[i], len(sessions[i]))`` alone returns, bit for bit (engine.batch): a hidden
        row ``[1, hidden]``, on the last stage fp32 logits ``[vocab]``; or the exception that forward raised.
        Rows that are not one well-formed row of an open session with room (what a peer could get wrong) run
        alone, so they fail only their own session."""
        if len(sessions) != len(xs) or len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("one row per session, each session once")
        rows = [x if isinstance(x, torch.Tensor) else torch.tensor([int(t) for t in x], dtype=torch.long) for x in xs]
        out: list[torch.Tensor | Exception | None] = [None] * len(rows)
        fit = [i for i, (s, x) in enumerate(zip(sessions, rows)) if self._row_fits(s, x)]
        if len(fit) > 1 and all(batchable(st) for st in self.stages):
            ss = [sessions[i] for i in fit]
            y = self._rows(ss, [len(s) for s in ss], torch.cat([rows[i] for i in fit]))
            for r, i in enumerate(fit):
                s = sessions[i]
                self._keep_tokens(s, len(s) - 1, rows[i])
                out[i] = y[r] if self.stages[-1].last else y[r:r + 1]
        for i, (s, x) in enumerate(zip(sessions, rows)):
            if out[i] is None:
                try:
                    out[i] = s.forward(x, len(s), 1)
                except Exception as e:  # noqa: BLE001 - this row's own error; the other rows stand
                    out[i] = e
        return [o for o in out if o is not None]

    @torch.inference_mode()
    def forward_session_rows(self, session: "Session", x: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The next ``n`` rows of one session through this (partial) engine, as ``n`` successive 1-row forwards
        compute them, bit for bit (engine.batch): speculative verification on a pipeline stage. ``x``: token ids
        ``[n]`` on the first stage, fp32 hidden rows ``[n, hidden]`` otherwise. Returns hidden rows
        ``[n, hidden]``, on the last stage fp32 logits ``[n, vocab]``."""
        if not isinstance(x, torch.Tensor):
            x = torch.tensor([int(t) for t in x], dtype=torch.long)
        if session.engine is not self:
            raise EngineError("session of another engine")
        n = int(x.shape[0]) if x.dim() >= 1 else 0
        first = self.stages[0].first
        ok = x.dtype == torch.long and x.dim() == 1 if first else \
            x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == self.config.hidden
        if n < 1 or not ok:
            raise ValueError("rows must be token ids [n] on a first stage, fp32 [n, hidden] otherwise")
        if first and (int(x.min()) < 0 or int(x.max()) >= self.config.vocab_size):
            raise ValueError(f"token id out of range [0, {self.config.vocab_size})")
        if session.closed:
            raise EngineError("session is closed")
        if len(session) + n > session.max_len:
            raise ContextTooLong(f"{len(session)} + {n} rows exceed session max_len {session.max_len}")
        p0 = len(session)
        if n == 1 or not all(batchable(st) for st in self.stages):
            outs = [session.forward(x[i:i + 1], p0 + i, 1) for i in range(n)]
            return torch.stack(outs) if self.stages[-1].last else torch.cat(outs)
        y = self._rows([session] * n, [p0 + i for i in range(n)], x.to(self.device))
        self._keep_tokens(session, p0, x)
        return y

    def _keep_tokens(self, s: "Session", p0: int, x: torch.Tensor) -> None:
        """A session's tokens from position p0 after rows `x` ran, as Session.forward keeps them: token inputs
        only (a first stage's), nothing past p0 otherwise."""
        if self.stages[0].first:
            s.tokens[p0:] = [int(t) for t in x.reshape(-1).tolist()]
        else:
            del s.tokens[p0:]

    def _row_fits(self, s: "Session", x: torch.Tensor) -> bool:
        """One well-formed decode row of an open session of this engine with room for it."""
        if s.engine is not self or s.closed or len(s) + 1 > s.max_len:
            return False
        if self.stages[0].first:
            return x.dtype == torch.long and tuple(x.shape) == (1,) and 0 <= int(x[0]) < self.config.vocab_size
        return x.dtype == torch.float32 and tuple(x.shape) == (1, self.config.hidden)

    def _rows(self, sessions: Sequence["Session"], pos: list[int], x: torch.Tensor) -> torch.Tensor:
        """engine.batch.forward_rows through every stage of this engine."""
        batched = self.rows_batched(len(sessions))
        for j, st in enumerate(self.stages):
            x = forward_rows(st, [s.kvs[j] for s in sessions], pos, x, batched=batched)
        return x

    def new_session(self, max_len: int) -> "Session":
        if max_len < 1:
            raise ValueError("max_len must be >= 1")
        if max_len > self.config.n_ctx:
            raise ContextTooLong(f"max_len {max_len} exceeds the model context {self.config.n_ctx}")
        need = self.kv_bytes_for(max_len)
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise EngineFull(f"all {self.max_sessions} sessions in use")
            if self.max_kv_bytes is not None and self._reserved + need > self.max_kv_bytes:
                raise EngineFull(f"KV budget exhausted: {self._reserved} + {need} > {self.max_kv_bytes} bytes")
            self._reserved += need
            s = Session(self, max_len, need)
            self._sessions.add(s)
        return s

    def _release(self, s: "Session") -> None:
        with self._lock:
            if s in self._sessions:
                self._sessions.discard(s)
                self._reserved -= s._reserved


class Session:
    """One sequence's KV state across the engine's stages."""

    def __init__(self, engine: Engine, max_len: int, reserved: int):
        self.engine = engine
        self.max_len = max_len
        self._reserved = reserved
        C = engine.prefill_chunk
        self.kvs: list[KVCache] = [st.new_kv(max_len, chunk=C) for st in engine.stages]
        self.tokens: list[int] = []
        self.closed = False

    # ------------------------------------------------------------------
    def __len__(self) -> int:
        return self.kvs[0].length

    @property
    def kv_bytes(self) -> int:
        return sum(kv.nbytes for kv in self.kvs)

    def _check(self, n_new: int) -> None:
        if self.closed:
            raise EngineError("session is closed")
        if not self.engine.is_full_model:
            raise EngineError("this engine holds only layers %r; use forward()" % (self.engine.layers,))
        if len(self) + n_new > self.max_len:
            raise ContextTooLong(f"{len(self)} + {n_new} tokens exceed session max_len {self.max_len}")

    def _run(self, x: torch.Tensor, start: int, n_real: int, logits: bool = True) -> torch.Tensor:
        """The stages over rows at [start, start + T); ``logits`` False: the last stage stops at its final
        norm (no LM head: the widest matmul, and in exact mode a dequantization of the whole table)."""
        last = len(self.engine.stages) - 1
        for i, (st, kv) in enumerate(zip(self.engine.stages, self.kvs)):
            x = st.forward(kv, x, start, n_real=n_real, logits="last" if logits or i < last else "hidden")
        return x

    @overload
    def prefill(self, token_ids: Sequence[int]) -> torch.Tensor: ...
    @overload
    def prefill(self, token_ids: Sequence[int], logits: bool) -> torch.Tensor | None: ...

    @torch.inference_mode()
    def prefill(self, token_ids: Sequence[int], logits: bool = True) -> torch.Tensor | None:
        """Append tokens; returns fp32 logits [vocab] of the last one (``logits`` False: None, and no LM
        head runs, for a prompt prefilled in pieces whose last piece is still to come). Only the last
        chunk's head runs either way: the logits of earlier chunks were never used."""
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("prefill needs at least one token")
        self._check(len(ids))
        V = self.engine.config.vocab_size
        if min(ids) < 0 or max(ids) >= V:
            raise ValueError(f"token id out of range [0, {V})")
        C = self.engine.prefill_chunk
        dev = self.engine.device
        pos = len(self)
        out = None
        steps = prefill_steps(pos, len(ids), C)          # boundaries on multiples of C
        for j, (i, n) in enumerate(steps):
            chunk = ids[i:i + n] + [0] * (C - n)         # every step padded to C rows
            out = self._run(torch.tensor(chunk, dtype=torch.long, device=dev), pos, n,
                            logits=logits and j == len(steps) - 1)
            self.tokens[pos:] = ids[i:i + n]
            pos += n
        return out if logits else None

    @torch.inference_mode()
    def decode(self, token_id: int) -> torch.Tensor:
        """One step; returns fp32 logits [vocab]."""
        self._check(1)
        pos = len(self)
        x = torch.tensor([int(token_id)], dtype=torch.long, device=self.engine.device)
        logits = self._run(x, pos, 1)
        self.tokens[pos:] = [int(token_id)]
        return logits

    def forward(self, x: torch.Tensor, start_pos: int, n_real: int | None = None) -> torch.Tensor:
        """Raw pass through this engine's stages (for partial-layer engines)."""
        if self.closed:
            raise EngineError("session is closed")
        n_real = x.shape[0] if n_real is None else n_real
        if start_pos + n_real > self.max_len:
            raise ContextTooLong(f"position {start_pos + n_real} exceeds session max_len {self.max_len}")
        out = self._run(x, start_pos, n_real)
        if x.dtype == torch.long and x.dim() == 1:
            self.tokens[start_pos:] = [int(t) for t in x[:n_real].tolist()]
        else:
            del self.tokens[start_pos:]
        return out

    def truncate(self, n: int) -> None:
        if self.closed:
            raise EngineError("session is closed")
        for kv in self.kvs:
            kv.truncate(n)
        del self.tokens[n:]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for kv in self.kvs:
            kv.free()
        self.engine._release(self)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
