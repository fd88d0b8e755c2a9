"""The node's own token count for a backend answer without `usage` (mesh402.api.token_count): the bundled
SmolLM2 tokenizer and chat template when the node has no model of its own, the prompt as the template renders
it (tools included), the completion as returned; at most `max_text_bytes` of an answer are tokenized."""

from __future__ import annotations

import time

from collections.abc import Iterator

import pytest

from mesh402.api.chat import render_chat
from mesh402.api.schemas import ChatCompletionRequest
from mesh402.api.token_count import TokenCounter, answer_text
from mesh402.models.catalog import BUNDLED_MODEL_ID
from mesh402.serving.registry import ModelRegistry

ASK = {"model": "some-backend-model", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
TOOL = {"type": "function", "function": {"name": "lookup", "description": "Look a city up",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def counter() -> Iterator[TokenCounter]:
    """One counter for the module: loading the bundled tokenizer takes seconds."""
    c = TokenCounter()
    t0 = time.perf_counter()
    assert c.tokenizer(ModelRegistry()) is not None  # a node without a model: the bundled tokenizer
    print(f"loading the bundled tokenizer: {(time.perf_counter() - t0) * 1000:.0f} ms")
    yield c


def test_a_count_is_the_bundled_tokenizers_with_the_chat_template(counter: TokenCounter) -> None:
    name, tok, tmpl = counter.tokenizer(ModelRegistry()) or ("", None, None)
    assert name == BUNDLED_MODEL_ID and tmpl is not None
    req = ChatCompletionRequest.model_validate(ASK)
    c = counter.count_sync(ModelRegistry(), req, ["The capital of France is Paris.", "Paris."], 100)
    assert c.tokenizer == BUNDLED_MODEL_ID
    assert c.prompt_tokens == len(tok.encode_chat(render_chat(req, tmpl).segments))
    assert c.prompt_tokens > len(tok.encode(ASK["messages"][0]["content"], add_special=False)) + 4  # turn markers
    assert c.completion_tokens == sum(len(tok.encode(t, add_special=False)) for t in ("The capital of France is Paris.",
                                                                                      "Paris."))
    assert c.usage() == {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                         "total_tokens": c.prompt_tokens + c.completion_tokens, "estimated": True,
                         "tokenizer": BUNDLED_MODEL_ID}
    with_tools = ChatCompletionRequest.model_validate({**ASK, "tools": [TOOL]})
    assert counter.prompt_sync(ModelRegistry(), with_tools) > c.prompt_tokens  # the tools are in the prompt


def test_at_most_max_text_bytes_of_an_answer_are_tokenized(counter: TokenCounter) -> None:
    _, tok, _ = counter.tokenizer(ModelRegistry()) or ("", None, None)
    req = ChatCompletionRequest.model_validate(ASK)
    small = "The capital of France is Paris."
    t0 = time.perf_counter()
    counter.count_sync(ModelRegistry(), req, [small], 100)
    print(f"counting a short answer (prompt + completion): {(time.perf_counter() - t0) * 1000:.2f} ms")
    huge = "the quick brown fox jumps over the lazy dog " * 50_000  # 2.2 MB of answer
    t0 = time.perf_counter()
    c = counter.count_sync(ModelRegistry(), req, [huge, huge], 64)  # 64 tokens allowed: 4 KiB of text counted
    print(f"counting a 2 x 2.2 MB answer of a 64-token request: {(time.perf_counter() - t0) * 1000:.2f} ms")
    assert c.completion_tokens == len(tok.encode(huge[:64 * 64], add_special=False))
    t0 = time.perf_counter()
    full = counter.count_sync(ModelRegistry(), req, [huge], 1 << 20)  # the 1 MiB cap
    print(f"counting a 2.2 MB answer up to the 1 MiB cap ({full.completion_tokens} tokens): "
          f"{(time.perf_counter() - t0) * 1000:.0f} ms")
    assert full.completion_tokens == len(tok.encode(huge[: 1 << 20], add_special=False))


def test_the_text_of_an_answer_includes_reasoning_and_tool_calls() -> None:
    part = {"content": "Let me look.", "reasoning_content": "The user asks", "refusal": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"city":"Paris"}'}},
                           "not a call"]}
    assert answer_text(part) == 'Let me look.The user askslookup{"city":"Paris"}'
    assert answer_text({}) == ""
