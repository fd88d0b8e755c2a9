"""Tiny random-weight MoE models (mixtral, qwen2moe, qwen3moe, olmoe) for engine tests.

``hf_moe(arch)`` builds transformers' own model (the reference); ``write_moe_gguf`` writes the
same weights as a GGUF with ``gguf.GGUFWriter`` following llama.cpp's conventions (3-D expert-major
``ffn_*_exps`` tensors, Q/K rows permuted for the llama/mixtral arch).
"""
from __future__ import annotations

import numpy as np
import torch

from harness.synthetic_gguf import copy_tokenizer
from harness.tiny_gguf import HF_ATTENTION_NAMES, add_attention_and_stub_vocab, add_weight, finish_gguf, permute_qk

V, H, NH, NKV, HD, NL = 128, 64, 4, 2, 16, 2
E, K, FFE, FFS = 8, 2, 32, 64
ARCHS = ("mixtral", "qwen2moe", "qwen3moe", "olmoe")
GGUF_ARCH = {"mixtral": "llama", "qwen2moe": "qwen2moe", "qwen3moe": "qwen3moe", "olmoe": "olmoe"}
SEQ = [int(x) for x in np.random.default_rng(1).integers(0, V, 40)]  # crosses a chunk boundary


def hf_moe(arch: str, seed: int = 0, hot: int | None = None):
    """transformers' model with random weights. ``hot``: bias every router towards that expert."""
    import transformers
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    kw = dict(vocab_size=V, hidden_size=H, num_hidden_layers=NL, num_attention_heads=NH,
              num_key_value_heads=NKV, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=False, num_experts_per_tok=K)
    if arch == "mixtral":
        cfg = MixtralConfig(**kw, intermediate_size=FFE, num_local_experts=E, sliding_window=None,
                            rope_theta=10000.0)
    elif arch == "qwen2moe":
        cfg = Qwen2MoeConfig(**kw, intermediate_size=FFE, moe_intermediate_size=FFE, num_experts=E,
                             shared_expert_intermediate_size=FFS, norm_topk_prob=False, rope_theta=1e6)
    elif arch == "qwen3moe":
        cfg = Qwen3MoeConfig(**kw, intermediate_size=FFE, moe_intermediate_size=FFE, num_experts=E,
                             head_dim=HD, norm_topk_prob=True, rope_theta=1e6)
    else:
        cfg = OlmoeConfig(**kw, intermediate_size=FFE, num_experts=E, norm_topk_prob=False,
                          pad_token_id=1, eos_token_id=1, bos_token_id=0)
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif n.endswith("mlp.gate.weight"):  # a router that discriminates between experts
                p.copy_(0.3 * torch.randn_like(p))
            elif "experts" in n or "shared_expert" in n:
                p.copy_(0.05 * torch.randn_like(p))
        if hot is not None:
            # skewed gate usage: every embedding shares a direction u and each router's row `hot`
            # points along u, so expert `hot` is in (nearly) every token's top-k
            u = torch.randn(H)
            u /= u.norm()
            m.model.embed_tokens.weight += 0.2 * u
            for n, p in m.named_parameters():
                if n.endswith("mlp.gate.weight"):
                    p[hot] = 4.0 * u
    return m


def ref_logits(m, seq) -> torch.Tensor:
    x = torch.tensor([seq])
    with torch.inference_mode():
        return m(x, attention_mask=torch.ones_like(x)).logits[0]


def state(m) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in m.state_dict().items()}


_NAMES = {**HF_ATTENTION_NAMES, "mlp.gate.weight": "ffn_gate_inp.weight",
          "mlp.experts.down_proj": "ffn_down_exps.weight",
          "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
          "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
          "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
          "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight"}


def gguf_tensors(m, arch: str) -> dict[str, np.ndarray]:
    """GGUF tensor name -> fp32 array (llama.cpp layout) for the HF model ``m``."""
    out = {}
    for k, a in state(m).items():
        if k == "model.embed_tokens.weight":
            out["token_embd.weight"] = a
            continue
        if k == "model.norm.weight":
            out["output_norm.weight"] = a
            continue
        if k == "lm_head.weight":
            out["output.weight"] = a
            continue
        parts = k.split(".")
        pre, rest = f"blk.{parts[2]}.", ".".join(parts[3:])
        if rest == "mlp.experts.gate_up_proj":  # [E, 2I, H], gate rows first
            ff = a.shape[1] // 2
            out[pre + "ffn_gate_exps.weight"] = a[:, :ff]
            out[pre + "ffn_up_exps.weight"] = a[:, ff:]
            continue
        name = pre + _NAMES[rest]
        if GGUF_ARCH[arch] == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            a = permute_qk(a, NH if "attn_q" in name else NKV)
        if name.endswith("ffn_gate_inp_shexp.weight"):
            a = a.reshape(-1)  # llama.cpp stores the shared-expert gate as a vector
        out[name] = np.ascontiguousarray(a, dtype=np.float32)
    return out


def write_moe_gguf(m, arch: str, path, qname: str = "F32") -> None:
    import gguf

    qtype = gguf.GGMLQuantizationType[qname]
    ga = GGUF_ARCH[arch]
    c = m.config
    w = gguf.GGUFWriter(str(path), ga)
    w.add_block_count(NL)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FFE)
    w.add_expert_feed_forward_length(FFE)
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(FFS)
    w.add_expert_count(E)
    w.add_expert_used_count(K)
    rp = getattr(c, "rope_parameters", None) or {}
    add_attention_and_stub_vocab(w, n_heads=NH, n_kv_heads=NKV, head_dim=HD,
                                 rope_base=float(rp.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
                                 rms_eps=1e-5, vocab=V)
    for name, a in gguf_tensors(m, arch).items():
        add_weight(w, name, a, qtype, quantize=a.ndim >= 2 and name != "token_embd.weight" and "ffn_gate_inp" not in name)
    finish_gguf(w)


def roundtrip_quant(m, qname: str) -> None:
    """Quantize and dequantize (gguf-py) every weight the GGUF writer quantizes, in place."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qname]
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() >= 2 and n != "model.embed_tokens.weight" and not n.endswith("mlp.gate.weight") \
                    and not n.endswith("shared_expert_gate.weight"):
                a = p.detach().numpy().astype(np.float32)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)))


def write_chat_moe_gguf(path, tokenizer_gguf, *, hidden: int = 128, ffe: int = 1024, n_exp: int = 8,
                        n_layers: int = 2, seed: int = 0, hot: int | None = None) -> None:
    """A random-weight qwen2moe GGUF (Q8_0, shared expert) carrying a real tokenizer and chat template
    (copied from ``tokenizer_gguf``), so mesh nodes can serve it through the chat API. ``hot``: every
    layer's router prefers that expert (skewed gate usage)."""
    import gguf

    rng = np.random.default_rng(seed)
    nh, hd = hidden // 32, 32
    nkv = max(1, nh // 2)
    q = gguf.GGMLQuantizationType.Q8_0
    w = gguf.GGUFWriter(str(path), "qwen2moe")
    w.add_block_count(n_layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffe)
    w.add_expert_feed_forward_length(ffe)
    w.add_expert_shared_feed_forward_length(ffe // 4)
    w.add_expert_count(n_exp)
    w.add_expert_used_count(2)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(7)
    vocab = copy_tokenizer(w, tokenizer_gguf)

    def mat(*shape, scale=None):
        return (rng.standard_normal(shape, dtype=np.float32) * (scale or 1.0 / np.sqrt(shape[-1]))).astype(np.float32)

    def add(name, a, quant=True):
        w.add_tensor(name, gguf.quants.quantize(a, q) if quant else a, raw_dtype=q if quant else None)

    u = rng.standard_normal(hidden).astype(np.float32)
    u /= np.linalg.norm(u)
    emb = mat(vocab, hidden, scale=1.0)
    if hot is not None:
        emb += 1.5 * np.sqrt(hidden) * u  # a direction every token shares
    add("token_embd.weight", emb)
    add("output_norm.weight", np.ones(hidden, np.float32), False)
    add("output.weight", mat(vocab, hidden))
    for i in range(n_layers):
        p = f"blk.{i}."
        for n in ("attn_norm", "ffn_norm"):
            add(p + n + ".weight", 1 + 0.1 * mat(hidden, scale=1.0), False)
        add(p + "attn_q.weight", mat(nh * hd, hidden))
        add(p + "attn_k.weight", mat(nkv * hd, hidden))
        add(p + "attn_v.weight", mat(nkv * hd, hidden))
        for n, r in (("attn_q.bias", nh * hd), ("attn_k.bias", nkv * hd), ("attn_v.bias", nkv * hd)):
            add(p + n, 0.1 * mat(r, scale=1.0), False)
        add(p + "attn_output.weight", mat(hidden, nh * hd))
        router = mat(n_exp, hidden, scale=0.3)
        if hot is not None:
            router[hot] = 6.0 * u
        add(p + "ffn_gate_inp.weight", router, False)
        add(p + "ffn_gate_exps.weight", mat(n_exp, ffe, hidden))
        add(p + "ffn_up_exps.weight", mat(n_exp, ffe, hidden))
        add(p + "ffn_down_exps.weight", mat(n_exp, hidden, ffe))
        add(p + "ffn_gate_shexp.weight", mat(ffe // 4, hidden))
        add(p + "ffn_up_shexp.weight", mat(ffe // 4, hidden))
        add(p + "ffn_down_shexp.weight", mat(hidden, ffe // 4))
        add(p + "ffn_gate_inp_shexp.weight", mat(hidden), False)
    finish_gguf(w)
