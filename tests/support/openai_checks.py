"""What an agent expects of the OpenAI surface, as checks one official client runs against any node: served
alone, through a split, or paid (the scenario tests run the same checks everywhere the mesh goes)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai

MODEL = "smollm2-135m-instruct"
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_TOOL: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.", "parameters": WEATHER_SCHEMA}}
CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
                   "population_millions": {"type": "number"}},
    "required": ["name", "country", "population_millions"],
    "additionalProperties": False,
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_required_tool_call(c: openai.OpenAI, model: str = MODEL, **extra: Any) -> None:
    """tool_choice required: a call whose arguments parse and fit the schema, finish_reason tool_calls."""
    r = c.chat.completions.create(model=model, messages=ASK_WEATHER, tools=[WEATHER_TOOL], tool_choice="required",
                                  temperature=0, max_tokens=80, **extra)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    calls = ch.message.tool_calls
    assert calls and calls[0].function.name == "get_weather" and calls[0].id
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER_SCHEMA)
    assert r.usage.completion_tokens > 0 and r.system_fingerprint


def check_streamed_tool_call(c: openai.OpenAI, model: str = MODEL, **extra: Any) -> None:
    """A named tool_choice, streamed: tool_calls deltas that add up to schema-valid arguments, as the
    non-streamed answer has them."""
    kw: dict[str, Any] = dict(model=model, messages=ASK_WEATHER, tools=[WEATHER_TOOL], temperature=0, max_tokens=80,
                              tool_choice={"type": "function", "function": {"name": "get_weather"}}, **extra)
    whole = c.chat.completions.create(**kw).choices[0].message.tool_calls
    name, args, finish, ids = "", "", None, set()
    for chunk in c.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                assert d.index == 0
                if d.id:
                    ids.add(d.id)
                name += d.function.name or "" if d.function else ""
                args += d.function.arguments or "" if d.function else ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and name == "get_weather" and len(ids) == 1
    jsonschema.validate(json.loads(args), WEATHER_SCHEMA)
    assert whole is not None and whole[0].function.arguments == args


def check_json_schema_answer(c: openai.OpenAI, model: str = MODEL, **extra: Any) -> None:
    """response_format json_schema (strict): the answer parses and validates."""
    r = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me about Paris."}], temperature=0, max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "strict": True,
                                                                "schema": CITY_SCHEMA}}, **extra)
    ch = r.choices[0]
    assert ch.finish_reason == "stop", ch
    jsonschema.validate(json.loads(ch.message.content), CITY_SCHEMA)


def check_logprobs_and_choices(c: openai.OpenAI, model: str = MODEL, **extra: Any) -> None:
    """logprobs with top_logprobs (whole and streamed agree), n=2 independent seeded choices."""
    kw: dict[str, Any] = dict(model=model, messages=[{"role": "user", "content": "Name a colour."}], temperature=0,
                              max_tokens=6, logprobs=True, top_logprobs=3, **extra)
    r = c.chat.completions.create(**kw)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens
    for e in lp:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob >= e.logprob - 1e-4  # greedy: the drawn token is the most likely
    assert "".join(e.token for e in lp) == r.choices[0].message.content
    streamed: list[Any] = []
    for chunk in c.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            if ch.logprobs is not None and ch.logprobs.content:
                streamed.extend(ch.logprobs.content)
    assert [e.token for e in streamed] == [e.token for e in lp]
    assert [round(e.logprob, 4) for e in streamed] == [round(e.logprob, 4) for e in lp]
    two = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me a story."}], n=2,
                                    temperature=1.0, seed=7, max_tokens=12, **extra)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert two.choices[0].message.content != two.choices[1].message.content  # each choice its own seed
    again = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me a story."}], n=2,
                                      temperature=1.0, seed=7, max_tokens=12, **extra)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in two.choices]
    assert two.usage.completion_tokens > 0


def check_responses_answer(c: openai.OpenAI, model: str = MODEL, **extra: Any) -> None:
    """A Responses answer (instructions + input) with usage, and its stream with the Responses event types."""
    r = c.responses.create(model=model, instructions="Answer in one word.", input="What is the capital of France?",
                           temperature=0, max_output_tokens=16, **extra)
    assert r.object == "response" and r.status in ("completed", "incomplete")
    assert r.output_text and r.usage.output_tokens > 0 and r.usage.input_tokens > 0
    types: list[str] = []
    text = ""
    done = None
    for ev in c.responses.create(model=model, instructions="Answer in one word.", stream=True, temperature=0,
                                 input="What is the capital of France?", max_output_tokens=16, **extra):
        types.append(ev.type)
        if ev.type == "response.output_text.delta":
            text += ev.delta
        if ev.type in ("response.completed", "response.incomplete"):
            done = ev.response
    types = [t for t in types if t != "response.x402"]  # a paid node's settlement record ends a paid stream
    assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in types and "response.output_item.done" in types
    assert text == r.output_text and done is not None and done.output_text == text
