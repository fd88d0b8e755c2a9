"""A second client: LiteLLM (what many agent frameworks call through) against a live node, as an
OpenAI-compatible provider: a required tool call (plain and streamed), a json_schema answer, logprobs
and n=2."""

from __future__ import annotations

import json
import os
from typing import Any

import jsonschema
import pytest

from tests.support.api_node import ApiNode
from tests.support.openai_checks import ASK_WEATHER, CITY_SCHEMA, MODEL, WEATHER_SCHEMA, WEATHER_TOOL

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the price list: tests run offline
litellm = pytest.importorskip("litellm")


def kw(node: ApiNode) -> dict[str, Any]:
    return {"model": f"openai/{MODEL}", "api_base": f"{node.base}/v1", "api_key": node.api_key, "timeout": 180,
            "num_retries": 0, "temperature": 0}


def test_required_tool_call_plain_and_streamed(api_node: ApiNode) -> None:
    r = litellm.completion(**kw(api_node), messages=ASK_WEATHER, tools=[WEATHER_TOOL], tool_choice="required",
                           max_tokens=80)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    call = ch.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)
    args, finish = "", None
    for chunk in litellm.completion(**kw(api_node), messages=ASK_WEATHER, tools=[WEATHER_TOOL],
                                    tool_choice="required", max_tokens=80, stream=True):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                args += d.function.arguments or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and args == call.function.arguments


def test_json_schema_logprobs_and_two_choices(api_node: ApiNode) -> None:
    r = litellm.completion(**kw(api_node), messages=[{"role": "user", "content": "Tell me about Paris."}],
                           max_tokens=120, response_format={"type": "json_schema", "json_schema": {
                               "name": "city", "strict": True, "schema": CITY_SCHEMA}})
    jsonschema.validate(json.loads(r.choices[0].message.content), CITY_SCHEMA)
    r = litellm.completion(**kw(api_node), messages=[{"role": "user", "content": "Name a colour."}], max_tokens=4,
                           logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs["content"] if isinstance(r.choices[0].logprobs, dict) \
        else r.choices[0].logprobs.content
    assert content and all(len(_get(e, "top_logprobs")) == 2 for e in content)
    two = litellm.completion(**{**kw(api_node), "temperature": 1.0}, messages=[{"role": "user", "content": "Hi"}],
                             n=2, seed=3, max_tokens=8)
    assert len(two.choices) == 2


def _get(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)
