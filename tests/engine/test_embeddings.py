"""Embeddings: tiny GGUF embedding models (pooling from metadata) against transformers' base model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mesh402.engine import Engine
from mesh402.engine.embeddings import (NotAnEmbeddingModel, Pooling, embed, embed_batch, from_base64,
                                       is_embedding_model, pooling_of, to_base64)
from mesh402.models.catalog import bundled_model_path
from tests.support.dense_models import SEQ, _hf_model, _write_gguf

gguf = pytest.importorskip("gguf")
torch.set_num_threads(1)

POOLING_TYPE = {"mean": 1, "cls": 2, "last": 3}


def _reference(m, seq: list[int], pooling: str) -> torch.Tensor:
    x = torch.tensor([seq])
    with torch.inference_mode():
        h = m.model(x, attention_mask=torch.ones_like(x)).last_hidden_state[0].double()
    v = {"last": h[-1], "cls": h[0], "mean": h.mean(0)}[pooling]
    return (v / v.norm()).float()


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    m = _hf_model("qwen3")
    paths = {}
    for pooling, code in POOLING_TYPE.items():
        p = tmp_path_factory.mktemp(pooling) / f"tiny-qwen3-embed-{pooling}.gguf"
        _write_gguf(m, "qwen3", p, gguf.GGMLQuantizationType.F32, uint32_kv={"qwen3.pooling_type": code})
        paths[pooling] = p
    return m, paths


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_matches_transformers(qwen3, pooling: str) -> None:
    m, paths = qwen3
    eng = Engine.load(paths[pooling], load_tokenizer=False)
    assert pooling_of(eng) is Pooling(pooling) and is_embedding_model(eng)
    for seq in (SEQ, SEQ[:5], SEQ[:32], SEQ[:1]):  # across and on chunk boundaries (chunk 32), one token
        ours = embed(eng, seq)
        ref = _reference(m, seq, pooling)
        assert ours.shape == (64,) and float(ours.norm()) == pytest.approx(1.0, abs=1e-6)
        assert (ours - ref).abs().max().item() < 1e-5, pooling
    assert eng.n_sessions == 0  # throwaway sessions are closed


def test_fast_mode_close_and_batch_independent(qwen3) -> None:
    m, paths = qwen3
    exact = Engine.load(paths["last"], load_tokenizer=False)
    fast = Engine.load(paths["last"], mode="fast", load_tokenizer=False)
    a, b = embed(exact, SEQ), embed(fast, SEQ)
    assert float(a @ b) > 0.99
    batch = embed_batch(exact, [SEQ[:7], SEQ, SEQ[:3]])
    assert torch.equal(batch[1], a) and torch.equal(batch[0], embed(exact, SEQ[:7]))
    raw = embed(exact, SEQ, normalize=False)
    assert float(raw.norm()) != pytest.approx(1.0) and torch.allclose(raw / raw.norm(), a, atol=1e-6)


def test_split_stages_equal_solo(qwen3) -> None:
    _, paths = qwen3
    solo = Engine.load(paths["last"], load_tokenizer=False)
    split = Engine.load(paths["last"], load_tokenizer=False, splits=[0, 1, 3])
    assert torch.equal(embed(split, SEQ), embed(solo, SEQ))


def test_chat_model_is_refused() -> None:
    eng = Engine.load(bundled_model_path(), mode="fast")
    assert pooling_of(eng) is None and not is_embedding_model(eng)
    with pytest.raises(NotAnEmbeddingModel):
        embed(eng, [1, 2, 3])


def test_bad_inputs(qwen3) -> None:
    eng = Engine.load(qwen3[1]["last"], load_tokenizer=False)
    with pytest.raises(ValueError):
        embed(eng, [])
    with pytest.raises(ValueError):
        embed(eng, [10**6])


def test_base64_round_trip() -> None:
    v = torch.tensor([0.25, -1.5, 3.0e-8], dtype=torch.float32)
    assert np.array_equal(from_base64(to_base64(v)), v.numpy())
    assert to_base64(torch.tensor([1.0])) == "AACAPw=="  # 1.0f little-endian, as OpenAI encodes it


def test_hf_folder_with_sentence_transformers_pooling(qwen3, tmp_path) -> None:
    m, _ = qwen3
    m.save_pretrained(tmp_path)
    assert pooling_of(Engine.load(tmp_path, load_tokenizer=False)) is None  # plain checkpoint: a chat model
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 64, '
                                                        '"pooling_mode_mean_tokens": true}')
    eng = Engine.load(tmp_path, load_tokenizer=False)
    assert pooling_of(eng) is Pooling.MEAN
    assert (embed(eng, SEQ) - _reference(m, SEQ, "mean")).abs().max().item() < 1e-5
