"""Tiny random-weight GGUFs for engine tests and benchmarks: the header keys every tiny model shares, Q/K row
order, tensors in a quantization type, and writing the file out."""

from __future__ import annotations

from pathlib import Path

# transformers' names of a llama-family block's norms and attention tensors -> llama.cpp's (after "blk.N.");
# each architecture adds its MLP or expert tensors
HF_ATTENTION_NAMES = {"input_layernorm.weight": "attn_norm.weight",
                      "post_attention_layernorm.weight": "ffn_norm.weight",
                      "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                      "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                      "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
                      "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
                      "self_attn.k_norm.weight": "attn_k_norm.weight"}


def add_attention_and_stub_vocab(w, *, n_heads: int, n_kv_heads: int, head_dim: int, rope_base: float,
                                 rms_eps: float, vocab: int) -> None:
    """GGUF keys every tiny test model shares: attention shape, RoPE base, norm eps, and a minimal
    gpt2-style vocabulary so transformers' GGUF loader accepts the file."""
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(rope_base)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_vocab_size(vocab)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)


def permute_qk(w, n_head: int):
    """llama.cpp's convert_hf_to_gguf row order for llama-family Q/K weights."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_weight(w, name: str, a, qtype, quantize: bool) -> None:
    """One tensor of a tiny GGUF: in `qtype` when `quantize` (F16 as float16), else as it is."""
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    if quantize and qtype == T.F16:
        w.add_tensor(name, a.astype(np.float16))
    elif quantize and qtype != T.F32:
        w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    else:
        w.add_tensor(name, a)


def finish_gguf(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tokenizer_gguf(path: Path, tokens: list[str], types: list[int], **kv: object) -> Path:
    """A one-layer GGUF that carries a tokenizer (`tokens`, their types, and `add_<key>` metadata in `kv`):
    enough for the tokenizer tests, no real weights."""
    import gguf  # as in the writers above: only tests that write files load gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), "llama")
    for fn, value in [("block_count", 1), ("context_length", 64), ("embedding_length", 8),
                      ("feed_forward_length", 16), ("head_count", 2), ("head_count_kv", 2),
                      ("layer_norm_rms_eps", 1e-5), ("rope_dimension_count", 4)]:
        getattr(w, f"add_{fn}")(value)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for fn, value in kv.items():
        getattr(w, f"add_{fn}")(value)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    finish_gguf(w)
    return path
