import hashlib
from pathlib import Path

import gguf
import numpy as np
import pytest

from mesh402.models.gguf_meta import GGUFFormatError, file_fingerprint, read_gguf_meta, tensor_nbytes
from tests.support.engine import smollm2_gguf


@pytest.fixture(scope="module")
def path():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def meta(path):
    return read_gguf_meta(path)


def test_hparams(meta, path):
    assert meta.architecture == "llama"
    assert (meta.n_layers, meta.hidden, meta.ffn) == (30, 576, 1536)
    assert (meta.n_heads, meta.n_kv_heads, meta.head_dim) == (9, 3, 64)
    assert meta.n_ctx == 8192 and meta.vocab_size == 49152
    assert meta.rope_theta == 100000.0
    assert abs(meta.rms_eps - 1e-5) < 1e-9
    assert meta.expert_count == 0 and meta.expert_used_count == 0
    assert meta.file_size == path.stat().st_size
    assert meta.quant == "Q4_1"
    assert meta.quant_counts == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert meta.tied_embeddings
    assert meta.get("tokenizer.ggml.eos_token_id") == 2
    assert len(read_gguf_meta(path, vocabulary=True).get("tokenizer.ggml.tokens")) == 49152


def test_shared_parse_leaves_out_the_vocabulary_and_follows_the_file(path, tmp_path):
    """Callers other than the tokenizer share one parse per file version, without the tokenizer's arrays."""
    a, b = read_gguf_meta(path), read_gguf_meta(path)
    assert a.tensors is b.tensors  # one parse
    assert a.fields is not b.fields  # each caller its own dict
    assert "tokenizer.ggml.tokens" not in a.fields and a.vocab_size == 49152
    assert a.get("tokenizer.ggml.eos_token_id") == 2 and a.get("tokenizer.chat_template")
    full = read_gguf_meta(path, vocabulary=True)
    assert full.tensors is not a.tensors and len(full.get("tokenizer.ggml.merges")) == 48900
    # a file rewritten in place is parsed again
    copy = tmp_path / "m.gguf"
    copy.write_bytes(Path(path).read_bytes())
    first = read_gguf_meta(copy)
    copy.write_bytes(b"GGUF" + b"\x09" * 64)
    with pytest.raises(GGUFFormatError):
        read_gguf_meta(copy)
    assert first.n_layers == 30


def test_tensor_table_matches_gguf_reader(meta, path):
    r = gguf.GGUFReader(path)
    assert len(r.tensors) == len(meta.tensors)
    for a, b in zip(meta.tensors, r.tensors):
        assert a.name == b.name
        assert a.type_name == b.tensor_type.name
        assert a.offset == b.data_offset
        assert a.n_bytes == b.n_bytes
        assert a.shape == tuple(int(x) for x in reversed(b.shape))
    emb = meta.tensor("token_embd.weight")
    assert emb.shape == (49152, 576) and emb.type_name == "Q8_0"


def test_stage_bytes(meta):
    total = sum(t.n_bytes for t in meta.tensors)
    emb = meta.tensor("token_embd.weight").n_bytes
    assert meta.stage_bytes(0, 30) == total
    # tied embedding counted on both end stages
    assert meta.stage_bytes(0, 15) + meta.stage_bytes(15, 30) == total + emb
    mid = meta.stage_bytes(10, 20)
    per_layer = sum(t.n_bytes for t in meta.tensors if t.layer == 10)
    assert mid == 10 * per_layer
    assert meta.stage_bytes(0, 1) == emb + per_layer
    last = meta.stage_bytes(29, 30)
    assert last == per_layer + emb + meta.tensor("output_norm.weight").n_bytes
    with pytest.raises(ValueError):
        meta.stage_bytes(5, 5)
    with pytest.raises(ValueError):
        meta.stage_bytes(0, 31)


def test_tensor_nbytes():
    assert tensor_nbytes(gguf.GGMLQuantizationType.Q4_1, (4, 64)) == 4 * 2 * 20
    assert tensor_nbytes(gguf.GGMLQuantizationType.F32, (3, 5)) == 60


def test_file_fingerprint(tmp_path):
    p = tmp_path / "x.bin"
    data = np.random.default_rng(0).bytes(9 << 20)  # spans two chunks
    p.write_bytes(data)
    assert file_fingerprint(p) == hashlib.sha256(data).hexdigest()


def test_not_gguf(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ValueError):
        read_gguf_meta(p)
