"""No request field is silently ignored: every field of the installed `openai` package's request types is
implemented, a documented no-op (bookkeeping only) or refused by name (api/fields.py), and the check runs on
the raw body."""

from __future__ import annotations

import typing

import pytest
from openai.types import completion_create_params, embedding_create_params
from openai.types.chat import completion_create_params as chat_create_params
from openai.types.responses import response_create_params

from mesh402.api import fields
from mesh402.api.errors import APIError

# (the openai request type, our table for it)
TYPES = [
    (chat_create_params.CompletionCreateParamsBase, fields.CHAT),
    (completion_create_params.CompletionCreateParamsBase, fields.COMPLETIONS),
    (response_create_params.ResponseCreateParamsBase, fields.RESPONSES),
    (embedding_create_params.EmbeddingCreateParams, fields.EMBEDDINGS),
]
# the only kinds of field a chat or text completion may refuse: audio, predicted outputs, web search,
# and moderation (a newer field: no moderation model runs in the mesh)
MAY_REFUSE = {"audio", "prediction", "web_search_options", "moderation"}
NO_OPS = {"metadata", "store", "service_tier", "prompt_cache_retention", "prompt_cache_options"}


@pytest.mark.parametrize(("typ", "table"), TYPES, ids=["chat", "completions", "responses", "embeddings"])
def test_every_openai_field_has_a_documented_fate(typ: type, table: fields.Table) -> None:
    names = set(typing.get_type_hints(typ))
    assert names, typ
    missing = sorted(names - set(table))
    assert not missing, f"{typ.__module__}: fields with no entry in api/fields.py: {missing}"
    for name in names:
        how, why = table[name]
        assert how in ("implemented", "no-op", "refused") and len(why) > 10, name
        if how == "no-op":
            assert name in NO_OPS, f"{name} is a no-op but changes answers elsewhere"


@pytest.mark.parametrize("table", [fields.CHAT, fields.COMPLETIONS])
def test_completions_refuse_only_audio_predictions_web_search(table: fields.Table) -> None:
    refused = {name for name, (how, _) in table.items() if how == "refused"}
    assert refused <= MAY_REFUSE


def test_refused_and_unknown_fields_are_400_naming_them() -> None:
    with pytest.raises(APIError) as e:
        fields.check({"model": "m", "audio": {"voice": "alloy"}}, fields.CHAT, "chat completions")
    assert e.value.status == 400 and "audio" in e.value.message
    with pytest.raises(APIError) as e:
        fields.check({"model": "m", "frobnicate": 1}, fields.CHAT, "chat completions")
    assert e.value.status == 400 and "frobnicate" in e.value.message
    with pytest.raises(APIError) as e:
        fields.check({"input": "x", "previous_response_id": "resp_1"}, fields.RESPONSES, "responses")
    assert "previous_response_id" in e.value.message
    # a refused field sent empty asks for nothing, and implemented or no-op fields pass
    fields.check({"model": "m", "audio": None, "prediction": None, "store": True, "metadata": {"a": "b"},
                  "tools": [], "logprobs": True}, fields.CHAT, "chat completions")
