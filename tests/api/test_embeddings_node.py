"""`POST /v1/embeddings` on a live `mesh402 serve` process serving a tiny embedding model this test writes,
through the official client: batch inputs, float and base64, `dimensions`, checked against transformers."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch

from harness.mesh_nodes import MeshNodes, wait_until
from harness.procs import MESH402, NodeProcess, free_port
from tests.support.api_node import API_KEY
from tests.support.dense_models import SEQ, _hf_model, _write_gguf

gguf = pytest.importorskip("gguf")
LAST = 3  # llama.cpp pooling_type: last token


def _reference(m: Any, seq: list[int]) -> np.ndarray:
    x = torch.tensor([seq])
    with torch.inference_mode():
        h = m.model(x, attention_mask=torch.ones_like(x)).last_hidden_state[0].double()
    v = h[-1]
    return (v / v.norm()).float().numpy()


@pytest.fixture(scope="module")
def embed_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A tiny qwen3 embedding GGUF (last-token pooling) and the transformers model it was written from."""
    torch.manual_seed(0)
    m = _hf_model("qwen3")
    path = tmp_path_factory.mktemp("embed-model") / "tiny-qwen3-embed.gguf"
    _write_gguf(m, "qwen3", path, gguf.GGMLQuantizationType.F32, uint32_kv={"qwen3.pooling_type": LAST})
    return path, m


@pytest.fixture(scope="module")
def embed_node(tmp_path_factory: pytest.TempPathFactory,
               embed_model: tuple[Path, Any]) -> Iterator[tuple[openai.OpenAI, str, Any]]:
    path, m = embed_model
    home = tmp_path_factory.mktemp("embed-node")
    port = free_port()
    proc = NodeProcess([*MESH402, "serve", "--port", str(port), "--home", str(home), "--model", str(path),
                        "--mode", "exact"], home, env={"MESH402_API_KEY": API_KEY})
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/ready", timeout=180)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        model_id = c.models.list().data[0].id
        yield c, model_id, m
    finally:
        proc.stop()


def test_batch_of_token_inputs_matches_transformers(embed_node: tuple[openai.OpenAI, str, Any]) -> None:
    c, model_id, m = embed_node
    inputs = [SEQ, SEQ[:7], SEQ[:1]]
    r = c.embeddings.create(model=model_id, input=inputs, encoding_format="float")
    assert [d.index for d in r.data] == [0, 1, 2] and r.model == model_id
    assert r.usage.prompt_tokens == sum(len(x) for x in inputs)
    for d, seq in zip(r.data, inputs):
        ours = np.array(d.embedding, dtype=np.float32)
        assert ours.shape == (64,) and abs(float(np.linalg.norm(ours)) - 1) < 1e-5
        assert np.abs(ours - _reference(m, seq)).max() < 1e-4


def test_base64_and_dimensions(embed_node: tuple[openai.OpenAI, str, Any]) -> None:
    c, model_id, _ = embed_node
    floats = c.embeddings.create(model=model_id, input=[SEQ[:9]], encoding_format="float").data[0].embedding
    raw = c.with_raw_response.embeddings.create(model=model_id, input=[SEQ[:9]], encoding_format="base64")
    b64 = raw.http_response.json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    assert np.array_equal(decoded, np.array(floats, dtype=np.float32))
    cut = np.array(c.embeddings.create(model=model_id, input=[SEQ[:9]], dimensions=16).data[0].embedding)
    full = np.array(floats[:16])
    assert cut.shape == (16,) and np.allclose(cut, full / np.linalg.norm(full), atol=1e-5)


def test_bad_inputs_are_400(embed_node: tuple[openai.OpenAI, str, Any]) -> None:
    c, model_id, _ = embed_node
    for bad, needle in [([[10**6]], "token ids"), ([], "empty"), ([SEQ * 10], "context")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.embeddings.create(model=model_id, input=bad)
        assert needle in str(e.value), (needle, str(e.value))
    assert c.embeddings.create(model=model_id, input=[SEQ[:3]]).data  # the node keeps serving


def test_unknown_model_is_404(embed_node: tuple[openai.OpenAI, str, Any]) -> None:
    c, _, _ = embed_node
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model="no-such-embedder", input=[SEQ[:3]])


def test_routed_to_the_host_over_the_mesh(embed_node: tuple[openai.OpenAI, str, Any], embed_model: tuple[Path, Any],
                                          tmp_path: Path) -> None:
    """An API-only member serves the embedding model its host holds: the request crosses the tunnel and
    the vectors are the host's."""
    direct, model_id, _ = embed_node
    nodes = MeshNodes(tmp_path / "mesh")
    try:
        host = nodes.start("host", no_model=False, extra=["--model", str(embed_model[0]), "--mode", "exact"])
        host.proc.wait_http(f"http://127.0.0.1:{host.api_port}/ready", timeout=180)
        member = nodes.start("member", join=host.token(), kind="client")
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{member.api_port}/v1", api_key="x", max_retries=0, timeout=120)
        wait_until(lambda: any(m.id == model_id for m in c.models.list().data), timeout=60,
                   what="the member sees the host's embedding model")
        assert c.models.retrieve(model_id).id == model_id
        routed = c.embeddings.create(model=model_id, input=[SEQ[:9], SEQ[:4]])
        local = direct.embeddings.create(model=model_id, input=[SEQ[:9], SEQ[:4]])
        assert [d.embedding for d in routed.data] == [d.embedding for d in local.data]
    finally:
        nodes.stop_all()
