"""MoE engine (mixtral / qwen2moe / qwen3moe / olmoe): tiny random-weight models, our logits vs transformers.

References are transformers' own models: the model itself for safetensors folders; for GGUFs,
transformers' GGUF loader where it supports the architecture (qwen2moe, qwen3moe; its loader ignores
``expert_feed_forward_length``, so the expert sizes are passed as config overrides), otherwise the HF
model with its weights quantized and dequantized by gguf-py (independent of our reader).
"""
import os

import pytest
import torch

torch.set_num_threads(1)
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from mesh402.engine import Engine  # noqa: E402
from mesh402.engine.weights import open_source  # noqa: E402

from tests.support.engine import our_logits  # noqa: E402
from tests.support.moe_models import ARCHS, FFE, FFS, SEQ, hf_moe, ref_logits, roundtrip_quant, write_moe_gguf  # noqa: E402

N_PROMPT = 36


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_safetensors_matches_transformers(arch, tmp_path):
    m = hf_moe(arch)
    m.save_pretrained(tmp_path)
    ours, eng = our_logits(tmp_path, SEQ, N_PROMPT)
    ref = ref_logits(m, SEQ)[N_PROMPT - 1:]
    diff = (ours - ref).abs().max().item()
    print(f"\n{arch} safetensors: max |logit diff| {diff:.2e}")
    assert diff < 1e-4
    cfg = open_source(tmp_path).config
    assert cfg.is_moe and cfg.n_experts == 8 and cfg.n_experts_used == 2
    with torch.no_grad():  # the routed experts matter: without them the logits move far beyond the tolerance
        for n, p in m.named_parameters():
            if "experts." in n:
                p.zero_()
    assert (ours - ref_logits(m, SEQ)[N_PROMPT - 1:]).abs().max().item() > 1e-2


@pytest.mark.parametrize("arch,qname", [("qwen2moe", "Q8_0"), ("qwen3moe", "F32")])
def test_moe_gguf_matches_transformers_gguf(arch, qname, tmp_path):
    m = hf_moe(arch)
    p = tmp_path / f"tiny-{arch}.gguf"
    write_moe_gguf(m, arch, p, qname)
    os.environ["HF_HUB_OFFLINE"] = "1"
    extra = dict(moe_intermediate_size=FFE)
    if arch == "qwen2moe":
        extra["shared_expert_intermediate_size"] = FFS
    ref_m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=p.name,
                                                              dtype=torch.float32, **extra).eval()
    ref = ref_logits(ref_m, SEQ)[N_PROMPT - 1:]
    ours, eng = our_logits(p, SEQ, N_PROMPT)
    diff = (ours - ref).abs().max().item()
    print(f"\n{arch} gguf {qname}: max |logit diff| vs transformers-gguf {diff:.2e}")
    assert diff < 1e-4
    if qname == "F32":
        assert (ours - ref_logits(m, SEQ)[N_PROMPT - 1:]).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch,qname", [("mixtral", "Q8_0"), ("olmoe", "Q4_0"), ("qwen2moe", "Q5_1"), ("qwen3moe", "Q8_0")])
def test_moe_gguf_quantized_matches_roundtripped_hf(arch, qname, tmp_path):
    m = hf_moe(arch)
    p = tmp_path / f"tiny-{arch}.gguf"
    write_moe_gguf(m, arch, p, qname)
    roundtrip_quant(m, qname)
    ours, eng = our_logits(p, SEQ, N_PROMPT)
    diff = (ours - ref_logits(m, SEQ)[N_PROMPT - 1:]).abs().max().item()
    print(f"\n{arch} gguf {qname}: max |logit diff| vs round-tripped HF {diff:.2e}")
    assert diff < 1e-4
    # experts stay quantized in memory
    ex = next(iter(eng.stages[0].expert_bank.experts.values()))
    assert ex.gate_up.exact[0].type_name == qname


@pytest.mark.parametrize("arch", ["qwen2moe", "olmoe"])
def test_moe_fast_mode_close(arch, tmp_path):
    m = hf_moe(arch)
    p = tmp_path / f"tiny-{arch}.gguf"
    write_moe_gguf(m, arch, p, "Q4_0")
    roundtrip_quant(m, "Q4_0")
    ours, _ = our_logits(p, SEQ, N_PROMPT, mode="fast")
    ref = ref_logits(m, SEQ)[N_PROMPT - 1:]
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_moe_gate_usage_counts(tmp_path):
    """The stage counts gate choices per (layer, expert) on real rows (not chunk padding)."""
    m = hf_moe("qwen3moe", hot=3)
    m.save_pretrained(tmp_path)
    ours, eng = our_logits(tmp_path, SEQ, N_PROMPT)
    use = eng.stages[0].expert_usage()
    n_rows = len(SEQ)  # prompt rows + decoded rows
    for layer in (0, 1):
        per = [use[(layer, e)] for e in range(8)]
        assert sum(per) == 2 * n_rows  # top-2
        assert per[3] == max(per) and per[3] >= 0.8 * n_rows


def test_moe_pipeline_split_equals_solo(tmp_path):
    """An MoE model pipelined by layers (each stage holds its layers' experts) equals solo bit for bit."""
    m = hf_moe("mixtral")
    p = tmp_path / "tiny-mixtral.gguf"
    write_moe_gguf(m, "mixtral", p, "Q8_0")
    solo, _ = our_logits(p, SEQ, N_PROMPT)
    eng = Engine.load(p, load_tokenizer=False, splits=[0, 1, 2])
    s = eng.new_session(len(SEQ) + 1)
    out = [s.prefill(SEQ[:N_PROMPT])] + [s.decode(t) for t in SEQ[N_PROMPT:]]
    assert torch.equal(torch.stack(out), solo)
    assert [st.moe_layers for st in eng.stages] == [[0], [1]]


def test_qwen2moe_dense_mlp_layers(tmp_path):
    """qwen2moe's mlp_only_layers: a dense MLP layer between MoE layers."""
    from transformers import Qwen2MoeConfig

    from tests.support.moe_models import E, H, K, NH, NKV, NL, V

    cfg = Qwen2MoeConfig(vocab_size=V, hidden_size=H, num_hidden_layers=NL, num_attention_heads=NH,
                         num_key_value_heads=NKV, max_position_embeddings=256, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, num_experts_per_tok=K, intermediate_size=48,
                         moe_intermediate_size=FFE, num_experts=E, shared_expert_intermediate_size=FFS,
                         mlp_only_layers=[0])
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif n.endswith("mlp.gate.weight"):
                p.copy_(0.3 * torch.randn_like(p))
    m.save_pretrained(tmp_path)
    ours, eng = our_logits(tmp_path, SEQ, N_PROMPT)
    diff = (ours - ref_logits(m, SEQ)[N_PROMPT - 1:]).abs().max().item()
    assert diff < 1e-4
    assert eng.stages[0].moe_layers == [1]
