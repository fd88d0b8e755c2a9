"""Model configuration and weight sources (GGUF file or Hugging Face folder).

Both sources expose the same canonical tensor names so the model code is
format-agnostic:

* globals: ``embed`` [vocab, hidden], ``norm`` [hidden], ``head`` [vocab, hidden]
  (absent when tied to ``embed``), ``rope_freqs`` [head_dim/2] (optional)
* per layer ``i``: ``{i}.attn_norm``, ``{i}.wq/wk/wv/wo``, ``{i}.bq/bk/bv``
  (optional), ``{i}.q_norm/k_norm`` (optional), ``{i}.ffn_norm``,
  ``{i}.w_gate/w_up/w_down``

Only the tensors a stage asks for are read from disk. Q/K rows of llama-style
GGUFs are un-permuted back to Hugging Face (rotate-half) order while loading;
quantized rows are independent so this is done on the raw block bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mesh402.models.gguf_meta import GGUFMeta, TensorInfo, read_gguf_meta

from .quant import GGML_QUANT_SIZES, SUPPORTED_TYPES, QWeight, from_dense, from_raw

__all__ = ["ModelConfig", "WeightSource", "GGUFSource", "HFSource", "MappedRows", "open_source",
           "SUPPORTED_ARCHS"]

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2moe", "qwen3moe", "olmoe")
# Hugging Face model_type -> our arch name
_HF_ARCH = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
# Whether the top-k gate weights are renormalised when the file does not say (as llama.cpp defines
# each architecture; the "llama" GGUF arch with experts is mixtral).
_NORM_TOPK_DEFAULT = {"llama": True, "mixtral": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False}
# llama.cpp's converter permutes Q/K rows of these architectures for its
# adjacent-pair RoPE; qwen2/qwen3 use NEOX-style RoPE and are stored as-is.
_PERMUTED_ARCHS = ("llama", "mistral")


@dataclass(frozen=True)
class ModelConfig:
    arch: str
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
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    sliding_window: int | None = None
    # mixture of experts (0 experts: dense)
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0
    norm_topk: bool = False
    qk_norm_full: bool = False  # olmoe: q/k RMS norm over the whole projection, not per head

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def inv_freq(self, rope_freqs: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 [head_dim/2] RoPE inverse frequencies, scaling applied."""
        hd = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        rs = self.rope_scaling or {}
        kind = rs.get("rope_type", rs.get("type"))
        if rope_freqs is not None:
            inv = inv / rope_freqs.float()
        elif kind == "llama3":
            factor = float(rs["factor"])
            lo = float(rs.get("low_freq_factor", 1.0))
            hi = float(rs.get("high_freq_factor", 4.0))
            old = float(rs.get("original_max_position_embeddings", 8192))
            lo_wl, hi_wl = old / lo, old / hi
            wl = 2 * math.pi / inv
            scaled = torch.where(wl > lo_wl, inv / factor, inv)
            smooth = (old / wl - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            mid = ~(wl < hi_wl) & ~(wl > lo_wl)
            inv = torch.where(mid, smoothed, scaled)
        elif kind == "linear":
            inv = inv / float(rs["factor"])
        return inv


class WeightSource:
    """Reads canonical tensors from a model file/folder."""

    config: ModelConfig
    path: Path
    file_bytes: int
    n_params: int

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def load(self, name: str) -> QWeight:
        """A 2-D weight (kept quantized when quantized on disk)."""
        raise NotImplementedError

    def load_vector(self, name: str) -> torch.Tensor:
        """A 1-D tensor (norm weight, bias) as fp32."""
        w = self.load(name)
        return w.dequant().reshape(-1)

    def load_experts(self, name: str, experts: list[int] | None = None) -> dict[int, QWeight]:
        """Per-expert 2-D weights of a 3-D expert tensor (``{i}.exp_gate/exp_up/exp_down``),
        kept quantized; only ``experts`` (default all) are kept in memory."""
        raise NotImplementedError

    def stage_bytes(self, start: int, end: int) -> int:
        raise NotImplementedError

    def map_rows(self, name: str, device: torch.device | str = "cpu") -> "MappedRows | None":
        """A 2-D table whose rows are read from the file's pages when looked up (None: not mappable)."""
        return None


class MappedRows:
    """A ``[rows, cols]`` ggml table looked up row by row straight from the model file (mmap).

    An embedding lookup touches a few rows per token, so the table need not sit in the process's own
    memory: the pages it touches are the kernel's page cache, shared and reclaimable. Rows are dequantized
    by the same code a loaded :class:`QWeight` uses, so a lookup is bit-identical to ``load(name).dequant(ids)``.
    ``nbytes`` is the whole table (the most it can occupy), as memory planning (``stage_bytes``) counts it.
    """

    def __init__(self, path: Path, t: TensorInfo, device: torch.device | str = "cpu"):
        if t.ggml_type not in SUPPORTED_TYPES or len(t.shape) != 2:
            raise ValueError(f"{t.name}: not a mappable table")
        self.gtype = t.ggml_type
        self.shape = (int(t.shape[0]), int(t.shape[1]))
        bs, ts = GGML_QUANT_SIZES[self.gtype]
        row_bytes = self.shape[1] // bs * ts
        if row_bytes * self.shape[0] != t.n_bytes:
            raise ValueError(f"{t.name}: {t.n_bytes} bytes is not {self.shape[0]} rows of {row_bytes}")
        self.nbytes = t.n_bytes
        self.device = torch.device(device)
        self._rows = np.memmap(path, dtype=np.uint8, mode="r", offset=t.offset, shape=(self.shape[0], row_bytes))

    def dequant(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 ``[len(ids), cols]`` of the rows ``ids`` (1-D integer tensor), on this table's device."""
        idx = ids.detach().reshape(-1).to("cpu", torch.int64).numpy()
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise IndexError(f"row id out of range [0, {self.shape[0]})")
        raw = torch.from_numpy(np.ascontiguousarray(self._rows[idx]))  # a copy of just these rows
        return from_raw(raw, self.gtype, (idx.size, self.shape[1])).dequant().to(self.device)


# ---------------------------------------------------------------------------
# GGUF

_GGUF_LAYER = {
    "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
    "wv": "attn_v.weight", "wo": "attn_output.weight", "bq": "attn_q.bias", "bk": "attn_k.bias",
    "bv": "attn_v.bias", "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
    "ffn_norm": "ffn_norm.weight", "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
    "moe_router": "ffn_gate_inp.weight", "exp_gate": "ffn_gate_exps.weight", "exp_up": "ffn_up_exps.weight",
    "exp_down": "ffn_down_exps.weight", "sh_gate": "ffn_gate_shexp.weight", "sh_up": "ffn_up_shexp.weight",
    "sh_down": "ffn_down_shexp.weight", "sh_router": "ffn_gate_inp_shexp.weight",
}
_GGUF_GLOBAL = {"embed": "token_embd.weight", "norm": "output_norm.weight", "head": "output.weight",
                "rope_freqs": "rope_freqs.weight"}


def _gguf_name(name: str) -> str:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    i, key = name.split(".", 1)
    return f"blk.{int(i)}.{_GGUF_LAYER[key]}"


def _unpermute_rows(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation; x: [rows, ...] (rows = n_head*head_dim)."""
    rows = x.shape[0]
    rest = x.shape[1:]
    return x.reshape(n_head, rows // n_head // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest).contiguous()


class GGUFSource(WeightSource):
    def __init__(self, path: str | Path, meta: GGUFMeta | None = None):
        self.path = Path(path)
        self.meta = meta or read_gguf_meta(self.path, vocabulary=True)  # the engine builds its tokenizer from it
        m = self.meta
        arch = m.architecture
        if arch not in SUPPORTED_ARCHS:
            raise NotImplementedError(f"architecture {arch!r} not supported (have {SUPPORTED_ARCHS})")
        moe = {}
        if m.expert_count:
            gexp = m.tensor("blk.0.ffn_gate_exps.weight") or next(
                (t for t in m.tensors if t.name.endswith("ffn_gate_exps.weight")), None)
            if gexp is None:
                raise NotImplementedError("MoE GGUF without merged *_exps expert tensors is not supported")
            sh = next((t for t in m.tensors if t.name.endswith("ffn_gate_shexp.weight")), None)
            norm = m.get(f"{arch}.expert_weights_norm")
            moe = dict(n_experts=m.expert_count, n_experts_used=m.expert_used_count,
                       expert_ffn=int(m.get(f"{arch}.expert_feed_forward_length") or gexp.shape[-2]),
                       shared_ffn=int(m.get(f"{arch}.expert_shared_feed_forward_length") or
                                      (sh.shape[-2] if sh is not None else 0)),
                       norm_topk=bool(norm) if norm is not None else _NORM_TOPK_DEFAULT.get(arch, False))
        rs = None
        stype = m.get(f"{arch}.rope.scaling.type")
        if stype and stype != "none":
            rs = {"rope_type": stype, "factor": float(m.get(f"{arch}.rope.scaling.factor", 1.0))}
            if stype not in ("linear",) and m.tensor("rope_freqs.weight") is None:
                raise NotImplementedError(f"rope scaling {stype!r} not supported")
        blk0 = {t.name for t in m.tensors if t.layer == 0}
        sw = m.get(f"{arch}.attention.sliding_window")
        self.config = ModelConfig(
            arch=arch, n_layers=m.n_layers, hidden=m.hidden, ffn=m.ffn, n_heads=m.n_heads,
            n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, n_ctx=m.n_ctx, vocab_size=m.vocab_size,
            rope_theta=m.rope_theta, rms_eps=m.rms_eps, tied=m.tied_embeddings,
            qkv_bias="blk.0.attn_q.bias" in blk0, qk_norm="blk.0.attn_q_norm.weight" in blk0,
            rope_scaling=rs, sliding_window=int(sw) if sw else None,
            qk_norm_full=arch == "olmoe", **moe,
        )
        self.file_bytes = m.file_size
        self.n_params = m.n_params
        self._permuted = arch in _PERMUTED_ARCHS

    def has(self, name: str) -> bool:
        return self.meta.tensor(_gguf_name(name)) is not None

    def _read(self, t: TensorInfo) -> torch.Tensor:
        buf = torch.empty(t.n_bytes, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            n = f.readinto(memoryview(buf.numpy()))
        if n != t.n_bytes:
            raise IOError(f"short read for {t.name}")
        return buf

    def load(self, name: str) -> QWeight:
        t = self.meta.tensor(_gguf_name(name))
        if t is None:
            raise KeyError(name)
        shape = t.shape if len(t.shape) == 2 else (1, t.n_elements)
        raw = self._read(t)
        key = name.split(".", 1)[-1]
        if self._permuted and key in ("wq", "wk", "bq", "bk"):
            nh = self.config.n_heads if key in ("wq", "bq") else self.config.n_kv_heads
            if len(t.shape) == 2:
                raw = _unpermute_rows(raw.reshape(shape[0], -1), nh).reshape(-1)
            else:  # a bias: permute its elements (dense types only)
                w = from_raw(raw, t.ggml_type, shape).dequant().reshape(-1)
                return from_dense(_unpermute_rows(w, nh).reshape(1, -1))
        return from_raw(raw, t.ggml_type, shape)

    def load_experts(self, name: str, experts: list[int] | None = None) -> dict[int, QWeight]:
        t = self.meta.tensor(_gguf_name(name))
        if t is None:
            raise KeyError(name)
        n_exp, rows, cols = t.shape
        per = t.n_bytes // n_exp
        want = range(n_exp) if experts is None else sorted(set(experts))
        out: dict[int, QWeight] = {}
        with open(self.path, "rb") as f:
            for e in want:
                buf = torch.empty(per, dtype=torch.uint8)
                f.seek(t.offset + e * per)
                if f.readinto(memoryview(buf.numpy())) != per:
                    raise IOError(f"short read for {t.name}")
                out[e] = from_raw(buf, t.ggml_type, (rows, cols))
        return out

    def stage_bytes(self, start: int, end: int) -> int:
        return self.meta.stage_bytes(start, end)

    def map_rows(self, name: str, device: torch.device | str = "cpu") -> MappedRows | None:
        t = self.meta.tensor(_gguf_name(name))
        if t is None or (self._permuted and name.split(".", 1)[-1] in ("wq", "wk")):
            return None  # absent, or its rows are reordered while loading
        try:
            return MappedRows(self.path, t, device)
        except ValueError:
            return None


# ---------------------------------------------------------------------------
# Hugging Face folder (config.json + *.safetensors)

_HF_LAYER = {
    "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight", "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias", "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight", "ffn_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
}
_HF_GLOBAL = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "head": "lm_head.weight"}


_HF_MOE = {  # canonical -> (name, with {e} for an expert index)
    "moe_router": "mlp.gate.weight", "exp_gate": "mlp.experts.{e}.gate_proj.weight",
    "exp_up": "mlp.experts.{e}.up_proj.weight", "exp_down": "mlp.experts.{e}.down_proj.weight",
    "sh_gate": "mlp.shared_expert.gate_proj.weight", "sh_up": "mlp.shared_expert.up_proj.weight",
    "sh_down": "mlp.shared_expert.down_proj.weight", "sh_router": "mlp.shared_expert_gate.weight",
}
_HF_MIXTRAL = {"moe_router": "block_sparse_moe.gate.weight", "exp_gate": "block_sparse_moe.experts.{e}.w1.weight",
               "exp_up": "block_sparse_moe.experts.{e}.w3.weight",
               "exp_down": "block_sparse_moe.experts.{e}.w2.weight"}


def _hf_name(name: str, arch: str = "llama", e: int = 0) -> str:
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    if name == "rope_freqs":
        return "__none__"
    i, key = name.split(".", 1)
    if key in _HF_LAYER:
        return f"model.layers.{int(i)}.{_HF_LAYER[key]}"
    tmpl = (_HF_MIXTRAL if arch == "mixtral" else _HF_MOE).get(key, "__none__")
    return f"model.layers.{int(i)}.{tmpl.format(e=e)}"


class HFSource(WeightSource):
    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        cfg = json.loads((self.path / "config.json").read_text())
        self.hf_config = cfg
        arch = cfg.get("model_type", "llama")
        arch = _HF_ARCH.get(arch, arch)
        if arch not in SUPPORTED_ARCHS:
            raise NotImplementedError(f"model_type {arch!r} not supported (have {SUPPORTED_ARCHS})")
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {self.path}")
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._nbytes: dict[str, int] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    self._where[k] = f
                    sl = sf.get_slice(k)
                    shp = tuple(sl.get_shape())
                    self._shapes[k] = shp
                    dt = sl.get_dtype()
                    esz = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(dt, 4)
                    self._nbytes[k] = int(np.prod(shp, dtype=np.int64)) * esz
        rp = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rp.get("rope_theta", 10000.0))
        rs = cfg.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        if rs and rs.get("rope_type", rs.get("type")) not in ("llama3", "linear", "default", None):
            raise NotImplementedError(f"rope scaling {rs!r} not supported")
        n_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        tied = bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in self._where
        sw = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch in ("mistral", "mixtral")) else None
        n_exp = int(cfg.get("num_local_experts", cfg.get("num_experts", 0)) or 0)
        moe = {}
        if n_exp:
            moe = dict(n_experts=n_exp, n_experts_used=int(cfg["num_experts_per_tok"]),
                       expert_ffn=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
                       shared_ffn=int(cfg.get("shared_expert_intermediate_size") or 0)
                       if "model.layers.0.mlp.shared_expert.gate_proj.weight" in self._where else 0,
                       norm_topk=True if arch == "mixtral" else bool(cfg.get("norm_topk_prob", False)))
        self.config = ModelConfig(
            arch=arch, n_layers=cfg["num_hidden_layers"], hidden=hidden,
            ffn=cfg["intermediate_size"], n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or hidden // n_heads,
            n_ctx=cfg.get("max_position_embeddings", 2048), vocab_size=cfg["vocab_size"],
            rope_theta=float(theta), rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), tied=tied,
            qkv_bias="model.layers.0.self_attn.q_proj.bias" in self._where,
            qk_norm="model.layers.0.self_attn.q_norm.weight" in self._where,
            rope_scaling=rs, sliding_window=int(sw) if sw else None,
            qk_norm_full=arch == "olmoe", **moe,
        )
        self._arch = arch
        self.file_bytes = sum(f.stat().st_size for f in files)
        self.n_params = sum(int(np.prod(s, dtype=np.int64)) for s in self._shapes.values())

    def has(self, name: str) -> bool:
        return _hf_name(name, self._arch) in self._where

    def load(self, name: str) -> QWeight:
        return self._load_key(_hf_name(name, self._arch), name)

    def load_experts(self, name: str, experts: list[int] | None = None) -> dict[int, QWeight]:
        want = range(self.config.n_experts) if experts is None else sorted(set(experts))
        return {e: self._load_key(_hf_name(name, self._arch, e), name) for e in want}

    def _load_key(self, k: str, name: str) -> QWeight:
        from safetensors import safe_open

        if k not in self._where:
            raise KeyError(name)
        with safe_open(str(self._where[k]), framework="pt") as sf:
            t = sf.get_tensor(k)
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            t = t.float()
        if t.dim() == 1:
            t = t.reshape(1, -1)
        return from_dense(t.contiguous())

    def stage_bytes(self, start: int, end: int) -> int:
        L = self.config.n_layers
        total = 0
        for k, nb in self._nbytes.items():
            if k.startswith("model.layers."):
                i = int(k.split(".")[2])
                total += nb if start <= i < end else 0
            elif k == "model.embed_tokens.weight":
                total += nb if (start == 0 or (end == L and self.config.tied)) else 0
            elif k in ("model.norm.weight", "lm_head.weight"):
                total += nb if end == L else 0
            else:
                total += nb
        return total


def open_source(path: str | Path) -> WeightSource:
    p = Path(path)
    if p.is_dir():
        if (p / "config.json").exists():
            return HFSource(p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return GGUFSource(ggufs[0])
        raise FileNotFoundError(f"{p}: no config.json and not exactly one .gguf")
    return GGUFSource(p)
