"""A Hugging Face safetensors folder served by a real node (`--model DIR`): loaded whole, answers."""

from __future__ import annotations

import httpx
import pytest

from harness.mesh_nodes import MeshNodes, wait_until


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random llama with the bundled model's tokenizer, saved as safetensors + tokenizer.json."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mesh402.models.catalog import bundled_model_path

    gguf = bundled_model_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    d = tmp_path_factory.mktemp("hf") / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_safetensors_model_is_served_in_a_mesh(tmp_path, hf_folder) -> None:
    nodes = MeshNodes(tmp_path)
    try:
        n = nodes.start("st", no_model=False, extra=["--model", str(hf_folder)])
        base = f"http://127.0.0.1:{n.api_port}"
        wait_until(lambda: httpx.get(base + "/ready", timeout=5).status_code == 200, timeout=120,
                   what="the safetensors model loaded")
        r = httpx.post(base + "/v1/completions", json={"model": "tiny-llama", "prompt": "Hello",
                                                       "max_tokens": 4, "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    finally:
        nodes.stop_all()
