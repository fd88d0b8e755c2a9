"""API edge behaviour that needs no model: loading/failed states, auth, body limits (in-process)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from mesh402.api.openai import create_app
from mesh402.settings import NodeConfig
from mesh402.models.catalog import ModelSource
from mesh402.serving.registry import ModelRegistry


def make(tmp_path: Path, state: str = "loading", api_key: str | None = None) -> TestClient:
    reg = ModelRegistry()
    entry = reg.add(ModelSource("m1", tmp_path / "m1.gguf", "gguf"))
    entry.state = state  # type: ignore[assignment]
    if state == "failed":
        entry.error = "ValueError: bad file"
    cfg = NodeConfig(home=tmp_path, api_key=api_key)
    cfg.limits.max_request_bytes = 1000
    return TestClient(create_app(cfg, reg))


def test_loading_model_is_listed_and_gets_503_with_retry_after(tmp_path: Path) -> None:
    c = make(tmp_path)
    assert c.get("/v1/models").json()["data"][0]["state"] == "loading"
    r = c.post("/v1/chat/completions", json={"model": "m1", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert "loading" in r.json()["error"]["message"]
    ready = c.get("/ready")
    assert ready.status_code == 503 and ready.json() == {"ready": False, "models": {"m1": "loading"}}
    assert c.get("/health").status_code == 200


def test_failed_model_reports_its_error(tmp_path: Path) -> None:
    c = make(tmp_path, "failed")
    r = c.post("/v1/completions", json={"model": "m1", "prompt": "x"})
    assert r.status_code == 503 and "bad file" in r.json()["error"]["message"]
    assert c.get("/v1/models").json()["data"][0]["error"] == "ValueError: bad file"


def test_api_key_compared_for_every_v1_route(tmp_path: Path) -> None:
    c = make(tmp_path, api_key="s3cret")
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Basic s3cret"}).status_code == 401
    assert c.post("/v1/chat/completions", json={}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_oversized_body_is_413(tmp_path: Path) -> None:
    c = make(tmp_path, "ready")
    r = c.post("/v1/completions", content=b'{"prompt": "' + b"x" * 2000 + b'"}')
    assert r.status_code == 413 and r.json()["error"]["message"].startswith("request body over")


def test_unknown_route_and_method_use_openai_error_shape(tmp_path: Path) -> None:
    c = make(tmp_path)
    r = c.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert c.get("/v1/chat/completions").status_code == 405
