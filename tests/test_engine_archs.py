"""llama / mistral / qwen2 / qwen3: tiny random-weight models, our logits vs transformers.

Safetensors folders come from ``save_pretrained``; GGUFs are written with
``gguf.GGUFWriter`` following llama.cpp's conventions (Q/K rows permuted for
llama) and read back by transformers' own GGUF loader, so the reference path is
independent of ours.
"""
import os

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from tests._engine_util import add_attention_and_stub_vocab, add_weight, finish_gguf, our_logits, permute_qk  # noqa: E402

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


def _ref_logits(m, seq):
    x = torch.tensor([seq])
    with torch.inference_mode():
        return m(x, attention_mask=torch.ones_like(x)).logits[0]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_safetensors_matches_transformers(arch, tmp_path):
    m = _hf_model(arch)
    m.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()
    ours = our_logits(tmp_path, SEQ, 40)[0]
    ref = _ref_logits(m, SEQ)[39:]
    diff = (ours - ref).abs().max().item()
    print(f"\n{arch} safetensors: max |logit diff| {diff:.2e}")
    assert diff < 1e-4


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
    names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
             "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
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


@pytest.mark.parametrize("arch,qname", [("llama", "Q8_0"), ("mistral", "F32"), ("qwen2", "Q8_0")])
def test_gguf_matches_transformers_gguf(arch, qname, tmp_path):
    qtype = gguf.GGMLQuantizationType[qname]
    m = _hf_model(arch, rope_scaling=False)  # transformers' GGUF loader ignores rope_freqs
    p = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(m, arch, p, qtype)
    os.environ["HF_HUB_OFFLINE"] = "1"
    ref_m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=p.name,
                                                              dtype=torch.float32).eval()
    ref = _ref_logits(ref_m, SEQ)[39:]
    ours = our_logits(p, SEQ, 40)[0]
    diff = (ours - ref).abs().max().item()
    print(f"\n{arch} gguf {qname}: max |logit diff| vs transformers-gguf {diff:.2e}")
    assert diff < 1e-4
    if qname == "F32":  # unquantized: also equal to the original HF model
        assert (ours - _ref_logits(m, SEQ)[39:]).abs().max().item() < 1e-4


def test_gguf_llama3_rope_freqs(tmp_path):
    """llama3 rope scaling stored llama.cpp-style (rope_freqs.weight) vs the HF model with rope_scaling."""
    m = _hf_model("llama", rope_scaling=True)
    p = tmp_path / "tiny-llama3.gguf"
    _write_gguf(m, "llama", p, gguf.GGMLQuantizationType.F32, rope_freqs=True)
    diff = (our_logits(p, SEQ, 40)[0] - _ref_logits(m, SEQ)[39:]).abs().max().item()
    print(f"\nllama3 rope_freqs gguf: max |logit diff| {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fast_mode_runs_on_dense_weights(arch, tmp_path):
    m = _hf_model(arch)
    m.save_pretrained(tmp_path)
    ours = our_logits(tmp_path, SEQ, 40, mode="fast")[0]
    ref = _ref_logits(m, SEQ)[39:]
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8


@pytest.mark.parametrize("qname", ["Q4_1", "Q8_0"])
def test_gguf_qwen3_matches_roundtripped_hf(qname, tmp_path):
    """transformers 5.24 cannot load this qwen3 GGUF (head_dim mismatch), so the reference is the HF
    model with its 2-D weights quantized and dequantized by gguf-py (independent of our reader)."""
    qtype = gguf.GGMLQuantizationType[qname]
    m = _hf_model("qwen3")
    p = tmp_path / "tiny-qwen3.gguf"
    _write_gguf(m, "qwen3", p, qtype)
    with torch.no_grad():
        for n, w in m.named_parameters():
            if w.dim() == 2 and n != "model.embed_tokens.weight":
                a = w.detach().numpy().astype(np.float32)
                w.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)))
    diff = (our_logits(p, SEQ, 40)[0] - _ref_logits(m, SEQ)[39:]).abs().max().item()
    print(f"\nqwen3 gguf {qname}: max |logit diff| vs round-tripped HF {diff:.2e}")
    assert diff < 1e-4
