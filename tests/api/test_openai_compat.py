"""The OpenAI-compatible API of a live `mesh402 serve` process, driven by the official client."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import openai
import pytest

from tests.support.api_node import ApiNode

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def client(node: ApiNode, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.base}/v1", api_key=key or node.api_key, max_retries=0, timeout=120)


def test_models_lists_bundled_model_with_state(api_node: ApiNode) -> None:
    models = client(api_node).models.list()
    ids = {m.id: m for m in models.data}
    assert MODEL in ids
    assert ids[MODEL].model_extra["state"] == "ready"


def test_chat_answers_capital_of_france(api_node: ApiNode) -> None:
    r = client(api_node).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    text = r.choices[0].message.content
    print("answer:", text)
    assert "Paris" in text
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_stream_matches_non_stream_and_reports_usage(api_node: ApiNode) -> None:
    c = client(api_node)
    full = c.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16)
    stream = c.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=16, stream=True,
                                       stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(parts) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_raw_sse_ends_with_done(api_node: ApiNode) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{api_node.base}/v1/chat/completions", json=body, headers=api_node.headers,
                      timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_text_completion_stream_and_not(api_node: ApiNode) -> None:
    c = client(api_node)
    r = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens <= 8
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert streamed == r.choices[0].text


def test_stop_string_and_max_tokens(api_node: ApiNode) -> None:
    c = client(api_node)
    r = c.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=["7"])
    assert "7" not in r.choices[0].text and r.choices[0].finish_reason == "stop"
    r = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_seeded_sampling_repeats(api_node: ApiNode) -> None:
    c = client(api_node)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a short story."}], temperature=1.0,
              max_tokens=12, seed=1234)
    a = c.chat.completions.create(**kw).choices[0].message.content
    b = c.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_concurrent_requests_each_get_their_own_answer(api_node: ApiNode) -> None:
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    c = client(api_node)

    def run(p: str) -> str:
        return c.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0).choices[0].text

    sequential = [run(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        parallel = list(pool.map(run, prompts))
    assert parallel == sequential


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[1,2]", 400, "JSON object"),
        (json.dumps({"model": "no-such-model", "messages": QUESTION}).encode(), 404, "no-such-model"),
        (json.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": -5}).encode(), 400, "max_tokens"),
        (json.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": 10**9}).encode(), 400, "context window"),
        (json.dumps({"model": MODEL, "messages": []}).encode(), 400, "messages"),
        (json.dumps({"model": MODEL, "messages": QUESTION, "temperature": "hot"}).encode(), 400, "temperature"),
        (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
        (json.dumps({"model": MODEL, "messages": QUESTION, "n": 0}).encode(), 400, "n"),
    ],
)
def test_bad_requests_get_openai_errors_and_node_keeps_serving(api_node: ApiNode, body: bytes, status: int,
                                                               needle: str) -> None:
    r = httpx.post(f"{api_node.base}/v1/chat/completions", content=body, timeout=60,
                   headers={**api_node.headers, "content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]
    ok = client(api_node).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_prompt_beyond_context_is_400(api_node: ApiNode) -> None:
    huge = "hello " * 9000  # > 8192-token context
    with pytest.raises(openai.BadRequestError) as e:
        client(api_node).completions.create(model=MODEL, prompt=huge, max_tokens=4)
    assert "context" in str(e.value)


def test_wrong_or_missing_api_key_is_401(api_node: ApiNode) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(api_node, key="wrong").models.list()
    r = httpx.get(f"{api_node.base}/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{api_node.base}/health", timeout=10).status_code == 200  # health needs no key
    assert client(api_node).models.list().data


def test_token_id_prompt_validation(api_node: ApiNode) -> None:
    r = httpx.post(f"{api_node.base}/v1/completions", json={"model": MODEL, "prompt": [1, 2, 10**9]},
                   headers=api_node.headers, timeout=30)
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
