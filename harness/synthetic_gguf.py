"""A synthetic ~1B llama-shaped GGUF for bandwidth-bound decode benchmarks (random weights).

Decode on a 135M model is dominated by per-operation overhead; users run 1-70B models, where a decode step is
bound by the bytes of weights read from memory. This writes a model of that regime: Llama-3.2-1B's block shape
(hidden 2048, 16 layers, FFN 8192, 32 heads, 8 KV heads) with the bundled SmolLM2 tokenizer (so both engines
load it and tokenize the same), every matrix in one quantization type. Quantized blocks are written directly
with random contents (gguf-py has no Q4_K quantizer, and a benchmark of speed needs no trained values): block
scales are small so activations stay finite through all layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

QK_K = 256


@dataclass(frozen=True)
class Shape:
    hidden: int = 2048
    layers: int = 16
    ffn: int = 8192
    heads: int = 32
    kv_heads: int = 8
    context: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LLAMA_1B = Shape()


def copy_tokenizer(w: Any, src_gguf: Path) -> int:
    """Copy a GGUF's tokenizer (and chat template) into a writer; the vocabulary size."""
    import gguf

    rd = gguf.GGUFReader(str(src_gguf))
    tok = {k: f.contents() for k, f in rd.fields.items() if k.startswith("tokenizer.")}
    w.add_tokenizer_model(tok["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in tok:
        w.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    w.add_token_list(tok["tokenizer.ggml.tokens"])
    w.add_token_types(tok["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.merges" in tok:
        w.add_token_merges(tok["tokenizer.ggml.merges"])
    for k, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("padding", w.add_pad_token_id),
                  ("unknown", w.add_unk_token_id)):
        if f"tokenizer.ggml.{k}_token_id" in tok:
            fn(int(tok[f"tokenizer.ggml.{k}_token_id"]))
    if "tokenizer.chat_template" in tok:
        w.add_chat_template(tok["tokenizer.chat_template"])
    return len(tok["tokenizer.ggml.tokens"])


def random_blocks(rows: int, cols: int, qtype: Any, rng: Any) -> Any:
    """Raw quantized blocks of a [rows, cols] matrix with random contents (uint8, one row of blocks per row)."""
    import numpy as np
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype == T.Q4_K:
        assert cols % QK_K == 0
        n = rows * cols // QK_K
        raw = rng.integers(0, 256, size=(n, 144), dtype=np.uint8)
        # d and dmin (fp16): small, so |w| stays ~0.05 and 16 layers of residuals stay finite
        raw[:, 0:2] = np.frombuffer(np.full(n, 2e-4, np.float16).tobytes(), np.uint8).reshape(n, 2)
        raw[:, 2:4] = np.frombuffer(np.full(n, 1e-4, np.float16).tobytes(), np.uint8).reshape(n, 2)
        return raw.reshape(rows, cols // QK_K * 144)
    if qtype == T.Q8_0:
        assert cols % 32 == 0
        n = rows * cols // 32
        raw = rng.integers(0, 256, size=(n, 34), dtype=np.uint8)
        raw[:, 0:2] = np.frombuffer(np.full(n, 4e-4, np.float16).tobytes(), np.uint8).reshape(n, 2)
        return raw.reshape(rows, cols // 32 * 34)
    raise ValueError(f"unsupported synthetic quantization {qtype}")


def write_synthetic_llama(path: Path, tokenizer_gguf: Path, qtype_name: str = "Q4_K", shape: Shape = LLAMA_1B,
                          seed: int = 0) -> Path:
    """Write the synthetic model to `path` (skipped when a file of this exact recipe is already there)."""
    import gguf
    import numpy as np

    path = Path(path)
    stamp = path.with_suffix(".recipe")
    recipe = f"{qtype_name} {shape} seed={seed} tok={Path(tokenizer_gguf).stat().st_size}"
    if path.exists() and stamp.exists() and stamp.read_text() == recipe:
        return path
    T = gguf.GGMLQuantizationType
    qtype = T[qtype_name]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"synthetic-llama-1b-{qtype_name.lower()}")
    w.add_block_count(shape.layers)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type({"Q4_K": 15, "Q8_0": 7}[qtype_name])  # llama.cpp's MOSTLY_Q4_K_M / MOSTLY_Q8_0 ids
    vocab = copy_tokenizer(w, tokenizer_gguf)
    w.add_vocab_size(vocab)
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim

    def mat(name: str, rows: int, cols: int) -> None:
        w.add_tensor(name, random_blocks(rows, cols, qtype, rng), raw_dtype=qtype)

    w.add_tensor("token_embd.weight", random_blocks(vocab, h, qtype, rng), raw_dtype=qtype)
    for i in range(shape.layers):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(b + "ffn_norm.weight", np.ones(h, np.float32))
        mat(b + "attn_q.weight", h, h)
        mat(b + "attn_k.weight", kv, h)
        mat(b + "attn_v.weight", kv, h)
        mat(b + "attn_output.weight", h, h)
        mat(b + "ffn_gate.weight", shape.ffn, h)
        mat(b + "ffn_up.weight", shape.ffn, h)
        mat(b + "ffn_down.weight", h, shape.ffn)
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    mat("output.weight", vocab, h)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    stamp.write_text(recipe)
    return path


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of weights a decode step reads: every tensor once, except the embedding table (one row)."""
    import gguf

    rd = gguf.GGUFReader(str(path))
    total = 0
    for t in rd.tensors:
        if t.name == "token_embd.weight":
            total += int(t.n_bytes) // (int(t.n_elements) // int(t.shape[0]))  # one row of the [vocab, hidden] table
        else:
            total += int(t.n_bytes)
    return total
