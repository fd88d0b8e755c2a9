"""Transformer stages (llama / mistral / qwen2 / qwen3 decoder layers; MoE FFNs of mixtral / qwen2moe / qwen3moe / olmoe in moe.py).

A :class:`Stage` holds layers ``[a, b)``, plus the token embedding if ``a == 0``
and the final norm + LM head if ``b == n_layers``. It loads only its own tensors.

``Stage.forward(kv, x, start_pos)`` runs rows ``x`` at absolute positions
``[start_pos, start_pos + T)``: token ids ``[T]`` on the first stage, fp32
hidden states ``[T, hidden]`` otherwise. It returns hidden states ``[T, hidden]``
or, on the last stage, logits. Chunking/padding is the caller's job (Session);
every computation depends only on (start_pos, T, the KV prefix), so equal shapes
give bit-identical results.

Modes: ``exact`` keeps quantized weights as raw blocks and dequantizes each
weight to fp32 right before its matmul (fp32 compute, bit-compatible with
gguf-py's dequantization). ``fast`` packs weights at load for low-precision
kernels (int4 group-32 / per-row int8 with bf16 activations).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from . import accel
from .fast_loop import FastLoop
from .kv import KVCache
from .moe import ExpertBank, ExpertRunner, LocalExperts, MoEFFN
from .quant import FastLinearWeight, QWeight, Workspace, pack_fast
from .weights import MappedRows, ModelConfig, WeightSource, open_source

__all__ = ["Stage", "Linear"]

Mode = Literal["exact", "fast"]

_WS_ELEMS = 1 << 18    # exact mode: weights are dequantized in row blocks of <= 256K elements (1 MiB fp32)
_ROPE_BLOCK = 1024     # cos/sin tables are computed in fixed blocks of positions


class Linear:
    """y = x @ W^T (+ b) for one or more row-concatenated weights (fused q/k/v, gate/up)."""

    __slots__ = ("exact", "fast", "bias", "out_features", "fast_dtype")

    def __init__(self, weights: list[QWeight], bias: torch.Tensor | None, mode: Mode,
                 device: torch.device):
        same = all(w.gtype == weights[0].gtype for w in weights)
        ws = [QWeight.cat_rows(weights)] if (same and len(weights) > 1) else list(weights)
        self.out_features = sum(w.shape[0] for w in weights)
        self.bias = bias
        self.fast: list[FastLinearWeight] | None = None
        self.exact: list[QWeight] | None = None
        self.fast_dtype = torch.bfloat16
        if mode == "fast":
            packed = [pack_fast(w, device) for w in ws]
            if all(p is not None for p in packed):
                self.fast = packed
                self.fast_dtype = packed[0].dtype
        if self.fast is None:
            self.exact = [w.to(device) for w in ws]

    @property
    def nbytes(self) -> int:
        n = self.bias.numel() * 4 if self.bias is not None else 0
        if self.fast is not None:
            return n + sum(p.nbytes for p in self.fast)
        return n + sum(w.nbytes for w in self.exact)

    @property
    def max_rows_cols(self) -> int:
        return max(w.shape[0] * w.shape[1] for w in self.exact) if self.exact else 0

    def __call__(self, x: torch.Tensor, ws: Workspace | None = None) -> torch.Tensor:
        if self.fast is not None:
            xb = x.to(self.fast_dtype)
            if len(self.fast) == 1:
                y = self.fast[0](xb).float()
            else:
                y = torch.cat([p(xb) for p in self.fast], dim=-1).float()
        else:
            y = _blocked_linear(x, self.exact, ws)
        if self.bias is not None:
            y = y + self.bias
        return y


def _blocked_linear(x: torch.Tensor, weights: list[QWeight], ws: Workspace | None) -> torch.Tensor:
    """x @ W^T with each weight dequantized to fp32 in row blocks (bounded scratch, cache friendly)."""
    n_out = sum(w.shape[0] for w in weights)
    out = torch.empty((x.shape[0], n_out), dtype=torch.float32, device=x.device)
    c0 = 0
    for w in weights:
        rows, cols = w.shape
        if w.gtype == 0:  # F32: no dequantization needed
            torch.matmul(x, w.parts["w"].t(), out=out[:, c0:c0 + rows])
            c0 += rows
            continue
        step = max(1, _WS_ELEMS // cols)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            torch.matmul(x, w.dequant(slice(r0, r1), ws=ws).t(), out=out[:, c0 + r0:c0 + r1])
        c0 += rows
    return out


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # Same operation order as transformers' LlamaRMSNorm (fp32).
    var = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + eps))


class _Layer:
    __slots__ = ("attn_norm", "qkv", "q_norm", "k_norm", "wo", "ffn_norm", "gate_up", "down", "moe", "nbytes")


class Stage:
    def __init__(self, source: WeightSource, layers: tuple[int, int], *, mode: Mode = "exact",
                 device: str | torch.device = "cpu", experts: ExpertRunner | None = None):
        """``experts``: who computes the MoE experts (default: all of this stage's, held locally)."""
        cfg = source.config
        a, b = layers
        if not (0 <= a < b <= cfg.n_layers):
            raise ValueError(f"bad layer range {layers} for {cfg.n_layers} layers")
        if mode not in ("exact", "fast"):
            raise ValueError(f"mode must be 'exact' or 'fast', not {mode!r}")
        self.config: ModelConfig = cfg
        self.source_path = Path(source.path)
        self.layers = (a, b)
        self.first = a == 0
        self.last = b == cfg.n_layers
        self.mode: Mode = mode
        self.device = torch.device(device)
        # fast mode on engine.accel's dequantize-on-the-fly kernels (accelerators; the CPU twin where asked for)
        self.accel = mode == "fast" and accel.enabled(self.device)
        self.kv_dtype = torch.float32
        dev = self.device
        nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = nh, nkv, hd
        self.group = nh // nkv
        self.scale = 1.0 / math.sqrt(hd)
        self.eps = cfg.rms_eps

        def vec(name: str) -> torch.Tensor:
            return source.load_vector(name).to(dev)

        def opt_vec(name: str) -> torch.Tensor | None:
            return vec(name) if source.has(name) else None

        self.blocks: list[_Layer] = []
        for i in range(a, b):
            L = _Layer()
            L.attn_norm = vec(f"{i}.attn_norm")
            bias = None
            if cfg.qkv_bias:
                bias = torch.cat([vec(f"{i}.{n}") if source.has(f"{i}.{n}") else torch.zeros(r, device=dev)
                                  for n, r in (("bq", nh * hd), ("bk", nkv * hd), ("bv", nkv * hd))])
            L.qkv = Linear([source.load(f"{i}.wq"), source.load(f"{i}.wk"), source.load(f"{i}.wv")],
                           bias, mode, dev)
            L.q_norm = opt_vec(f"{i}.q_norm") if cfg.qk_norm else None
            L.k_norm = opt_vec(f"{i}.k_norm") if cfg.qk_norm else None
            L.wo = Linear([source.load(f"{i}.wo")], None, mode, dev)
            L.ffn_norm = vec(f"{i}.ffn_norm")
            L.moe = MoEFFN(source, i, cfg, mode, dev) if cfg.is_moe and source.has(f"{i}.moe_router") else None
            if L.moe is None:
                L.gate_up = Linear([source.load(f"{i}.w_gate"), source.load(f"{i}.w_up")], None, mode, dev)
                L.down = Linear([source.load(f"{i}.w_down")], None, mode, dev)
                ffn_bytes = L.gate_up.nbytes + L.down.nbytes
            else:
                L.gate_up = L.down = None
                ffn_bytes = L.moe.nbytes
            vb = [L.attn_norm, L.ffn_norm] + [t for t in (L.q_norm, L.k_norm) if t is not None]
            L.nbytes = (L.qkv.nbytes + L.wo.nbytes + ffn_bytes
                        + sum(t.numel() * t.element_size() for t in vb))
            self.blocks.append(L)

        self.moe_layers = [a + j for j, L in enumerate(self.blocks) if L.moe is not None]
        self.expert_bank: ExpertBank | None = None
        if self.moe_layers and experts is None:
            self.expert_bank = ExpertBank(source, [(li, e) for li in self.moe_layers for e in range(cfg.n_experts)],
                                          mode=mode, device=dev)
            experts = LocalExperts(self.expert_bank)
        self.experts: ExpertRunner | None = experts
        self._n_real = 0
        self.embed: QWeight | MappedRows | None = None
        self.norm: torch.Tensor | None = None
        self.head_exact: QWeight | None = None
        self.head_fast: FastLinearWeight | None = None
        tied = cfg.tied or not source.has("head")
        if self.last:
            self.norm = vec("norm")
            head = source.load("embed" if tied else "head").to(dev)
            if mode == "fast":
                # The head is the widest matmul (a row per vocabulary entry): one per-row int8 call, not
                # Q8_0's 18 block calls with fp32 sums, whose cost grows with every row a batched step
                # adds (B=8: 35 of a 65 ms step). Per-row int8 is also faster for one row (1.8 vs 2.8 ms).
                self.head_fast = pack_fast(head, dev, block_exact=False)
            if self.head_fast is None:
                self.head_exact = head
            del head
        if self.first:
            if tied and self.head_exact is not None:
                self.embed = self.head_exact  # one table serves both
            else:
                # Lookups touch a few rows per token: read them from the file's pages rather than hold the
                # table (a packed fast head is requantized, not exact, so the embedding never comes from it:
                # the first stage of a split must embed exactly as a solo node does).
                self.embed = source.map_rows("embed", dev) or source.load("embed").to(dev)
        rf = source.load_vector("rope_freqs") if source.has("rope_freqs") else None
        self.inv_freq = cfg.inv_freq(rf).to(dev)
        self._rope_cos: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._fast_loop: Any = None
        self._all_fast = mode == "fast" and all(
            lin.fast is not None and len(lin.fast) == 1 for L in self.blocks
            for lin in ((L.qkv, L.wo, L.gate_up, L.down) if L.moe is None else (L.qkv, L.wo)))
        self.ws = Workspace(_WS_ELEMS if mode == "exact" or self.head_exact is not None else 0, device=dev)
        self._rope_sin: list[torch.Tensor] = []

    # ------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | WeightSource, layers: tuple[int, int] | None = None, *,
             mode: Mode = "exact", device: str | torch.device = "cpu",
             experts: ExpertRunner | None = None) -> "Stage":
        src = path if isinstance(path, WeightSource) else open_source(path)
        if layers is None:
            layers = (0, src.config.n_layers)
        return cls(src, tuple(layers), mode=mode, device=device, experts=experts)

    def expert_usage(self) -> dict[tuple[int, int], int]:
        """Gate-usage counts ``{(layer, expert): tokens routed}`` since load (real rows only)."""
        return {(L.moe.layer, e): int(c) for L in self.blocks if L.moe is not None
                for e, c in enumerate(L.moe.usage.tolist())}

    @property
    def n_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights this stage holds in memory."""
        n = sum(L.nbytes for L in self.blocks)
        if self.expert_bank is not None:
            n += self.expert_bank.nbytes
        seen: set[int] = set()
        for w in (self.embed, self.head_exact, self.head_fast):
            if w is not None and id(w) not in seen:
                seen.add(id(w))
                n += w.nbytes
        if self.norm is not None:
            n += self.norm.numel() * 4
        return n

    def new_kv(self, max_len: int, chunk: int = 32) -> KVCache:
        return KVCache(self.n_layers, self.n_kv_heads, self.head_dim, max_len,
                       chunk=chunk, dtype=self.kv_dtype, device=self.device)

    def kv_bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * torch.empty((), dtype=self.kv_dtype).element_size()

    # ------------------------------------------------------------------
    def _rope(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [T, head_dim] for positions [start, start+T) (fp32, rotate-half layout)."""
        end_block = (start + T - 1) // _ROPE_BLOCK
        while len(self._rope_cos) <= end_block:
            b0 = len(self._rope_cos) * _ROPE_BLOCK
            pos = torch.arange(b0, b0 + _ROPE_BLOCK, dtype=torch.float32, device=self.device)
            freqs = pos[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope_cos.append(emb.cos())
            self._rope_sin.append(emb.sin())
        b0, b1 = start // _ROPE_BLOCK, end_block
        if b0 == b1:
            o = start - b0 * _ROPE_BLOCK
            return self._rope_cos[b0][o:o + T], self._rope_sin[b0][o:o + T]
        cos = torch.cat(self._rope_cos[b0:b1 + 1])
        sin = torch.cat(self._rope_sin[b0:b1 + 1])
        o = start - b0 * _ROPE_BLOCK
        return cos[o:o + T], sin[o:o + T]

    def _mask(self, start: int, T: int) -> torch.Tensor | None:
        L = start + T
        sw = self.config.sliding_window
        if T == 1 and not (sw and L > sw):
            return None
        i = torch.arange(start, L, device=self.device)[:, None]
        j = torch.arange(L, device=self.device)[None, :]
        allowed = j <= i
        if sw:
            allowed &= (i - j) < sw
        m = torch.zeros((T, L), dtype=torch.float32, device=self.device)
        return m.masked_fill_(~allowed, float("-inf"))

    @torch.inference_mode()
    def forward(self, kv: KVCache, x: torch.Tensor, start_pos: int, *, n_real: int | None = None,
                logits: Literal["last", "all", "hidden"] = "last") -> torch.Tensor:
        """Run rows ``x`` at positions [start_pos, start_pos+T).

        Rows at index >= ``n_real`` are padding: in exact mode computed (so shapes stay fixed) and written
        to the KV cache; in fast mode on a dense stage not computed at all (zeros in the output), since
        every kernel there gives a row the same bits whatever else is in the call. Either way the cache
        length afterwards is ``start_pos + n_real``. On the last stage returns fp32 logits of row
        ``n_real-1`` (``[vocab]``), or of all rows (``[T, vocab]``), or with ``"hidden"`` the final-normed
        hidden states of all rows (``[T, hidden]``, no LM head: what embedding models pool).
        """
        T = x.shape[0]
        n_real = T if n_real is None else n_real
        if not (0 < n_real <= T):
            raise ValueError("n_real must be in [1, T]")
        if start_pos < 0 or start_pos > kv.length:
            raise ValueError(f"start_pos {start_pos} beyond KV length {kv.length}")
        kv.ensure(start_pos + T)
        with self._lock:
            if self.first:
                h = self._embed(x.to(device=self.device, dtype=torch.long))
            else:
                h = x.to(device=self.device, dtype=torch.float32)
            self._n_real = n_real
            if self._all_fast:
                # A prompt's last chunk is padded to the chunk size so that exact mode's GEMMs keep one shape;
                # fast mode's kernels compute each row on its own, so a short prompt need not pay for 32 rows.
                # Every path (solo, split, replay) applies the same rule, so they agree whatever the kernels;
                # prefix reuse keeps whole chunks only.
                skip = n_real < T and self.skips_padding
                y = self._layers_fast(kv, h[:n_real] if skip else h, start_pos, n_real if skip else T)
                h = torch.cat((y, y.new_zeros((T - n_real, y.shape[1])))) if skip else y
            else:
                h = self._layers(kv, h, start_pos, T)
            kv.length = start_pos + n_real
            if not self.last:
                return h
            if logits == "hidden":
                return _rms_norm(h, self.norm, self.eps)
            rows = h[n_real - 1:n_real] if logits == "last" else h
            out = self._head(_rms_norm(rows, self.norm, self.eps))
        return out[0] if logits == "last" else out

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        assert self.embed is not None  # every first stage has its table
        return self.embed.dequant(ids)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        if self.head_fast is not None:
            return self.head_fast(h.to(self.head_fast.dtype)).float()
        return _blocked_linear(h, [self.head_exact], self.ws)

    def _layers(self, kv: KVCache, h: torch.Tensor, start: int, T: int) -> torch.Tensor:
        nh, nkv, hd, g = self.n_heads, self.n_kv_heads, self.head_dim, self.group
        qd, kd = nh * hd, nkv * hd
        eps = self.eps
        L = start + T
        cos, sin = self._rope(start, T)
        cos_q, sin_q = cos[:, None, :], sin[:, None, :]
        mask = self._mask(start, T)
        half = hd // 2
        ws = self.ws
        for li, lw in enumerate(self.blocks):
            x = _rms_norm(h, lw.attn_norm, eps)
            qkv = lw.qkv(x, ws)
            q = qkv[:, :qd].view(T, nh, hd)
            k = qkv[:, qd:qd + kd].view(T, nkv, hd)
            v = qkv[:, qd + kd:].view(T, nkv, hd)
            if lw.q_norm is not None and self.config.qk_norm_full:  # olmoe: over the whole projection
                q = _rms_norm(qkv[:, :qd], lw.q_norm, eps).view(T, nh, hd)
                k = _rms_norm(qkv[:, qd:qd + kd], lw.k_norm, eps).view(T, nkv, hd)
            elif lw.q_norm is not None:
                q = _rms_norm(q, lw.q_norm, eps)
                k = _rms_norm(k, lw.k_norm, eps)
            q = q * cos_q + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin_q
            k = k * cos_q + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin_q
            kc, vc = kv.k[li], kv.v[li]
            kc[:, start:L].copy_(k.transpose(0, 1))
            vc[:, start:L].copy_(v.transpose(0, 1))
            K, Vv = kc[:, :L], vc[:, :L]
            # [T, nh, hd] -> [nkv, g*T, hd] (query heads sharing a KV head are grouped)
            qg = q.view(T, nkv, g, hd).permute(1, 2, 0, 3).reshape(nkv, g * T, hd)
            s = torch.bmm(qg, K.transpose(1, 2)) * self.scale
            if mask is not None:
                s = (s.view(nkv, g, T, L) + mask).view(nkv, g * T, L)
            p = torch.softmax(s, dim=-1)
            o = torch.bmm(p, Vv).view(nkv, g, T, hd).permute(2, 0, 1, 3).reshape(T, qd)
            h = h + lw.wo(o, ws)
            x = _rms_norm(h, lw.ffn_norm, eps)
            if lw.moe is not None:
                h = h + lw.moe(x, self.experts, ws, self._n_real)
                continue
            gu = lw.gate_up(x, ws)
            ff = gu.shape[-1] // 2
            h = h + lw.down(F.silu(gu[:, :ff]) * gu[:, ff:], ws)
        return h

    def _layers_fast(self, kv: KVCache, h: torch.Tensor, start: int, T: int) -> torch.Tensor:
        """Fast-mode layer loop: packed low-precision matmuls, fused norms, SDPA, few dtype casts, run by
        the stage's TorchScript loop (engine.fast_loop); MoE layers call their experts from Python."""
        cos, sin = self._rope(start, T)
        cos, sin = cos[:, None, :], sin[:, None, :]
        mask = self._mask(start, T)
        if mask is not None:
            mask = mask[None]
        loop = self.fast_loop()
        if not self.moe_layers:
            return loop.chunk(h, kv.k, kv.v, start, cos, sin, mask)
        h = h.clone()
        for li, lw in enumerate(self.blocks):
            h = loop.attention(li, h, kv.k, kv.v, start, cos, sin, mask)
            if lw.moe is not None:
                h += lw.moe(F.rms_norm(h, (h.shape[-1],), lw.ffn_norm, self.eps), self.experts, None, self._n_real)
            else:
                h = loop.ffn(li, h, True)
        return h

    @property
    def skips_padding(self) -> bool:
        """Whether forward computes only a chunk's real rows (fast mode, dense layers; see forward)."""
        return self._all_fast and not self.moe_layers

    def fast_loop(self) -> Any:
        """The scripted fast-mode layer loop over this stage's packed weights (built on first use)."""
        if self._fast_loop is None:
            self._fast_loop = FastLoop.of(self)
        return self._fast_loop

    def repacked(self) -> None:
        """Call after changing blocks or packed weights in place: the scripted loop holds the old ones."""
        self._fast_loop = None
