"""What every request field does on this node: implemented, a documented no-op, or refused by name.

The tables cover every field of the installed `openai` package's request types (chat and text completions:
`CompletionCreateParams`; Responses; embeddings) plus the few extensions this API adds (vLLM-style sampling
knobs, `session_id`). `check` runs on the raw JSON body before it is parsed: a refused field (sent with a
value) or a field no table names is a 400 that names it, so no parameter is ever silently ignored.
`tests/api/test_fields.py` walks the `openai` types and fails when a field is missing here.

A no-op is only bookkeeping that cannot change an answer (OpenAI's own: `metadata`, `store`, `service_tier`)
or a cache hint (our prefix cache is in memory and automatic). Refused: audio, predicted outputs, web search,
moderation (no moderation model runs here), and on Responses what needs server-side state.
"""

from __future__ import annotations

from typing import Any, Literal

from mesh402.api.errors import bad_request

How = Literal["implemented", "no-op", "refused"]
Table = dict[str, tuple[How, str]]

# Fields every OpenAI-style request may carry and what they do here.
_ROUTING: Table = {
    "model": ("implemented", "the model (or `auto`): served here or routed to its host"),
    "user": ("implemented", "sticky replica key (keeps one user's KV prefixes warm on one node); otherwise bookkeeping"),
    "safety_identifier": ("implemented", "sticky replica key like `user`; otherwise bookkeeping"),
    "prompt_cache_key": ("implemented", "sticky replica key: requests with one key go to one replica's prefix cache"),
    "session_id": ("implemented", "extension: sticky replica key"),
    "metadata": ("no-op", "bookkeeping: accepted (at most 16 string pairs) and not stored"),
    "store": ("no-op", "bookkeeping: nothing is stored; every answer is stateless"),
    "service_tier": ("no-op", "bookkeeping: one tier; answers say `default`"),
}
_SAMPLING: Table = {
    "temperature": ("implemented", "sampling temperature (0: greedy)"),
    "top_p": ("implemented", "nucleus sampling"),
    "frequency_penalty": ("implemented", "OpenAI frequency penalty"),
    "presence_penalty": ("implemented", "OpenAI presence penalty"),
    "seed": ("implemented", "(seed, position)-keyed draws: the same seed gives the same answer; choice i of n gets its own seed"),
    "stop": ("implemented", "up to 4 stop strings"),
    "max_tokens": ("implemented", "cap on generated tokens (finish_reason `length` when reached)"),
    "n": ("implemented", "independent choices, each with its own seed (at most 16)"),
    "logit_bias": ("implemented", "token id -> bias in [-100, 100], added to the logits before sampling"),
    "stream": ("implemented", "server-sent events"),
    "stream_options": ("implemented", "`include_usage`; `include_obfuscation` pads each chunk with a random `obfuscation` field"),
    "top_k": ("implemented", "extension: top-k sampling"),
    "min_p": ("implemented", "extension: min-p sampling"),
    "repetition_penalty": ("implemented", "extension: HF/llama.cpp repetition penalty"),
}

CHAT: Table = {
    **_ROUTING, **_SAMPLING,
    "messages": ("implemented", "system/developer/user/assistant (with tool_calls)/tool/function messages, text parts"),
    "max_completion_tokens": ("implemented", "cap on generated tokens (same as max_tokens)"),
    "tools": ("implemented", "function tools, rendered by the model's chat template or a documented generic prompt"),
    "tool_choice": ("implemented", "auto / none / required / a named function; required and named are constrained to the schema"),
    "parallel_tool_calls": ("implemented", "false: at most one call per answer"),
    "functions": ("implemented", "legacy tools: answered with `function_call`"),
    "function_call": ("implemented", "legacy tool_choice: none / auto / {name}"),
    "response_format": ("implemented", "text / json_object / json_schema (strict), by constrained decoding"),
    "logprobs": ("implemented", "per-token logprobs of the model's raw distribution"),
    "top_logprobs": ("implemented", "0-20 alternatives per token"),
    "modalities": ("implemented", "[\"text\"]; audio output is refused"),
    "reasoning_effort": ("implemented", "passed to the chat template (`reasoning_effort`; `enable_thinking` false for none/minimal)"),
    "verbosity": ("implemented", "low / high add a one-line instruction to the system message; medium is the default"),
    "prompt_cache_retention": ("no-op", "cache hint: the prefix cache is in memory, kept while it has room"),
    "prompt_cache_options": ("no-op", "cache hint: caching is implicit (automatic prefix reuse)"),
    "audio": ("refused", "audio output is not supported: this node serves text models"),
    "prediction": ("refused", "predicted outputs are not supported"),
    "web_search_options": ("refused", "web search is not supported: nothing here reaches the web"),
    "moderation": ("refused", "moderation is not supported: no moderation model runs in this mesh"),
}

COMPLETIONS: Table = {
    **_ROUTING, **_SAMPLING,
    "prompt": ("implemented", "a string, a one-string list, or token ids"),
    "echo": ("implemented", "the prompt before the completion (with logprobs: its tokens' logprobs too)"),
    "suffix": ("implemented", "fill-in-the-middle, for models whose vocabulary has FIM tokens (else 400)"),
    "logprobs": ("implemented", "0-5: per-token logprobs and that many alternatives"),
    "best_of": ("implemented", "generate best_of, return the n with the highest mean logprob (not with stream)"),
}

RESPONSES: Table = {
    **_ROUTING,
    "input": ("implemented", "text, or message / function_call / function_call_output items"),
    "instructions": ("implemented", "a system message before the input"),
    "tools": ("implemented", "function tools"),
    "tool_choice": ("implemented", "auto / none / required / a named function"),
    "parallel_tool_calls": ("implemented", "false: at most one call per answer"),
    "text": ("implemented", "`format`: text / json_object / json_schema (strict) by constrained decoding; `verbosity`"),
    "max_output_tokens": ("implemented", "cap on generated tokens (status incomplete when reached)"),
    "temperature": ("implemented", "sampling temperature"),
    "top_p": ("implemented", "nucleus sampling"),
    "top_logprobs": ("implemented", "0-20 alternatives per output token (logprobs on output_text)"),
    "stream": ("implemented", "Responses streaming events"),
    "stream_options": ("implemented", "`include_obfuscation`; `include_usage` is accepted (usage is always in response.completed)"),
    "reasoning": ("implemented", "`effort` passed to the chat template like chat's reasoning_effort"),
    "truncation": ("implemented", "disabled (default): an input over the context is a 400; auto is refused"),
    "include": ("implemented", "`message.output_text.logprobs` asks for logprobs; other entries are refused"),
    "max_tool_calls": ("implemented", "caps the function calls one answer may make"),
    "prompt_cache_retention": ("no-op", "cache hint: the prefix cache is in memory"),
    "prompt_cache_options": ("no-op", "cache hint: caching is implicit"),
    "previous_response_id": ("refused", "stateless: nothing is stored; send the whole conversation as input"),
    "conversation": ("refused", "stateless: conversations are not stored"),
    "background": ("refused", "stateless: background responses need stored state"),
    "background_options": ("refused", "stateless: background responses need stored state"),
    "context_management": ("refused", "stateless: context compaction is not supported"),
    "prompt": ("refused", "stored prompt templates are not supported"),
    "image": ("refused", "image generation is not supported: this node serves text models"),
    "moderation": ("refused", "moderation is not supported: no moderation model runs in this mesh"),
    "access_programs": ("refused", "not supported"),
}

EMBEDDINGS: Table = {
    "model": _ROUTING["model"],
    "user": _ROUTING["user"],
    "input": ("implemented", "a string, strings, token ids or lists of token ids (batch)"),
    "encoding_format": ("implemented", "float or base64 (little-endian float32)"),
    "dimensions": ("implemented", "keep the first `dimensions` components and re-normalise (Matryoshka)"),
}


def check(data: dict[str, Any], table: Table, endpoint: str) -> None:
    """400 naming the field when `data` carries a refused field (with a value) or one `table` does not know."""
    for name, value in data.items():
        how = table.get(name)
        if how is None:
            raise bad_request(f"unknown parameter for {endpoint}: {name!r}", param=name, code="unknown_parameter")
        if how[0] == "refused" and value is not None and value is not False:
            raise bad_request(f"{name}: {how[1]}", param=name, code="unsupported_parameter")
