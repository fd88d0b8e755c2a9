"""What agents use of the OpenAI surface, on a live `mesh402 serve` process with the bundled model, through the
official client: constrained tool calls (plain and streamed), json_schema output, logprobs, n choices,
models.retrieve, the Responses API, and embeddings refused for a chat model."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from tests.support.api_node import ApiNode
from tests.support.openai_checks import (
    MODEL,
    WEATHER_SCHEMA,
    WEATHER_TOOL,
    check_json_schema_answer,
    check_logprobs_and_choices,
    check_required_tool_call,
    check_responses_answer,
    check_streamed_tool_call,
)


def client(node: ApiNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.base}/v1", api_key=node.api_key, max_retries=0, timeout=180)


def test_required_tool_call_has_schema_valid_arguments(api_node: ApiNode) -> None:
    check_required_tool_call(client(api_node))


def test_streamed_tool_call_deltas(api_node: ApiNode) -> None:
    check_streamed_tool_call(client(api_node))


def test_tool_result_round_trip_and_tool_choice_none(api_node: ApiNode) -> None:
    c = client(api_node)
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature_c": 21, "sky": "sunny"})},
    ]
    r = c.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL], tool_choice="none",
                                  temperature=0, max_tokens=24)
    ch = r.choices[0]
    assert ch.message.tool_calls is None and ch.message.content and ch.finish_reason in ("stop", "length")
    assert ch.message.refusal is None


def test_json_schema_answer_parses_and_validates(api_node: ApiNode) -> None:
    check_json_schema_answer(client(api_node))


def test_json_object_answer_parses(api_node: ApiNode) -> None:
    r = client(api_node).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=120)
    ch = r.choices[0]
    if ch.finish_reason == "stop":
        assert isinstance(json.loads(ch.message.content), dict)


def test_max_tokens_cutting_json_short_is_length(api_node: ApiNode) -> None:
    r = client(api_node).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris."}], temperature=0, max_tokens=5,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "strict": True,
                                                                 "schema": WEATHER_SCHEMA}})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_logprobs_n_seed_logit_bias_fingerprint(api_node: ApiNode) -> None:
    check_logprobs_and_choices(client(api_node))


def test_logit_bias_bans_a_token(api_node: ApiNode, smol_tokenizer: Any) -> None:
    c = client(api_node)
    kw: dict[str, Any] = dict(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                              temperature=0, max_tokens=6, logprobs=True)
    plain = c.chat.completions.create(**kw)
    first = plain.choices[0].logprobs.content[0]
    ids = [i for i in range(smol_tokenizer.vocab_size) if smol_tokenizer.token_bytes(i) == bytes(first.bytes)]
    assert ids, first
    banned = c.chat.completions.create(**kw, logit_bias={str(i): -100 for i in ids})
    assert bytes(banned.choices[0].logprobs.content[0].bytes) != bytes(first.bytes)


def test_completions_logprobs_stream_and_not(api_node: ApiNode) -> None:
    c = client(api_node)
    r = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0,
                             logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 3 for t in lp.top_logprobs)
    streamed: list[str] = []
    for chunk in c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                      temperature=0, logprobs=3, stream=True):
        for ch in chunk.choices:
            if ch.logprobs is not None:
                streamed.extend(ch.logprobs.tokens)
    assert streamed == lp.tokens


def test_models_retrieve(api_node: ApiNode) -> None:
    c = client(api_node)
    m = c.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")


def test_responses_answer_and_stream(api_node: ApiNode) -> None:
    check_responses_answer(client(api_node))


def test_responses_function_call_and_json(api_node: ApiNode) -> None:
    c = client(api_node)
    tool = {"type": "function", "name": "get_weather", "description": WEATHER_TOOL["function"]["description"],
            "parameters": WEATHER_SCHEMA, "strict": True}
    r = c.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[tool], tool_choice="required",
                           temperature=0, max_output_tokens=80)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER_SCHEMA)
    follow = c.responses.create(
        model=MODEL, temperature=0, max_output_tokens=80, instructions="Answer in JSON.",
        input=[{"role": "user", "content": "What is the weather in Paris?"},
               {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather",
                "arguments": calls[0].arguments},
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temperature_c": 21}'}],
        text={"format": {"type": "json_schema", "name": "weather", "schema": WEATHER_SCHEMA, "strict": True}})
    if follow.status == "completed":
        jsonschema.validate(json.loads(follow.output_text), WEATHER_SCHEMA)
    assert follow.usage.output_tokens > 0


def test_refused_and_unknown_fields_name_themselves(api_node: ApiNode) -> None:
    c = client(api_node)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                  audio={"voice": "alloy", "format": "wav"}, max_tokens=2)
    assert "audio" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                  extra_body={"frobnicate": 1})
    assert "frobnicate" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model=MODEL, input="hi", previous_response_id="resp_123")
    assert "previous_response_id" in str(e.value)


def test_embeddings_of_a_chat_model_is_a_clear_400(api_node: ApiNode) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client(api_node).embeddings.create(model=MODEL, input="hello")
    assert "not an embedding model" in str(e.value)
