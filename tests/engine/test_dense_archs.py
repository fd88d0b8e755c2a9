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

from tests.support.dense_models import (HD, LLAMA3_ROPE, NKV, NL, SEQ, H, NH, V, _hf_model,  # noqa: E402,F401
                                        _llama3_rope_factors, _write_gguf)
from tests.support.engine import our_logits  # noqa: E402

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
