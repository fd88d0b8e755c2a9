"""Shared helpers for engine tests: the bundled model, and the header of tiny random-weight GGUFs."""
from __future__ import annotations

from pathlib import Path

from mesh402.models.catalog import bundled_model_path


def smollm2_gguf() -> Path:
    """The bundled SmolLM2 GGUF; a missing package fails with the command that installs it."""
    return bundled_model_path()


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
