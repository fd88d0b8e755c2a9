"""Tiny random-weight dense models (llama / mistral / qwen2 / qwen3) for the engine tests: a transformers
model, and the same weights as a GGUF written the way llama.cpp's converter does (Q/K rows permuted)."""

from __future__ import annotations

import numpy as np
import torch
import transformers
import gguf

from harness.tiny_gguf import HF_ATTENTION_NAMES, add_attention_and_stub_vocab, add_weight, finish_gguf, permute_qk

V, H, FF, NH, NKV, HD, NL = 256, 64, 128, 4, 2, 16, 3
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 10000.0}
SEQ = [int(x) for x in np.random.default_rng(1).integers(0, V, 45)]  # crosses a chunk boundary


def _hf_model(arch: str, rope_scaling: bool = True):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    kw = dict(vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=NL,
              num_attention_heads=NH, num_key_value_heads=NKV, max_position_embeddings=256,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
    if arch == "llama":
        cfg = LlamaConfig(**kw, rope_theta=10000.0, rope_scaling=LLAMA3_ROPE if rope_scaling else None)
    elif arch == "mistral":
        cfg = MistralConfig(**kw, sliding_window=None)
    elif arch == "qwen2":
        cfg = Qwen2Config(**kw, rope_theta=1e6)
    else:
        cfg = Qwen3Config(**kw, head_dim=HD, rope_theta=1e6)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # norms are initialised to ones; randomise them so they matter
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            if n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return m


def _llama3_rope_factors() -> np.ndarray:
    # llama.cpp's converter stores llama3 rope scaling as per-frequency divisors (rope_freqs.weight)
    r = LLAMA3_ROPE
    inv = 1.0 / (r["rope_theta"] ** (np.arange(0, HD, 2, dtype=np.float32) / HD))
    lo_wl = r["original_max_position_embeddings"] / r["low_freq_factor"]
    hi_wl = r["original_max_position_embeddings"] / r["high_freq_factor"]
    out = []
    for f in inv:
        wl = 2 * np.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(r["factor"])
        else:
            sm = (r["original_max_position_embeddings"] / wl - r["low_freq_factor"]) / (
                r["high_freq_factor"] - r["low_freq_factor"])
            out.append(1 / ((1 - sm) / r["factor"] + sm))
    return np.array(out, dtype=np.float32)


def _write_gguf(m, arch: str, path, qtype, rope_freqs: bool = False, uint32_kv: dict | None = None):
    gg_arch = "llama" if arch in ("llama", "mistral") else arch
    w = gguf.GGUFWriter(str(path), gg_arch)
    for key, value in (uint32_kv or {}).items():  # extra metadata, e.g. an embedding model's pooling_type
        w.add_uint32(key, value)
    w.add_block_count(NL)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FF)
    rope = (float(m.config.rope_parameters["rope_theta"]) if hasattr(m.config, "rope_parameters")
            and m.config.rope_parameters else float(m.config.rope_theta))
    add_attention_and_stub_vocab(w, n_heads=NH, n_kv_heads=NKV, head_dim=HD, rope_base=rope, rms_eps=1e-5, vocab=V)
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors())
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    names = {**HF_ATTENTION_NAMES, "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
             "mlp.down_proj.weight": "ffn_down.weight"}
    for k, a in sd.items():
        if k == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif k == "model.norm.weight":
            name = "output_norm.weight"
        elif k == "lm_head.weight":
            name = "output.weight"
        else:
            parts = k.split(".")
            name = f"blk.{parts[2]}." + names[".".join(parts[3:])]
        if gg_arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            a = permute_qk(a, NH if "attn_q" in name else NKV)
        a = np.ascontiguousarray(a, dtype=np.float32)
        add_weight(w, name, a, qtype, quantize=a.ndim == 2 and name != "token_embd.weight")
    finish_gguf(w)
