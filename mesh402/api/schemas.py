"""Request bodies of the OpenAI-compatible API, validated at the boundary.

Which fields exist, and what each one does here (implemented, a documented no-op, or refused by name), is
decided in `api/fields.py` before a body reaches these models; the models then type and bound every field
they accept (`extra="forbid"` is the backstop: a field no table names is an error, never ignored)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_CHOICES = 16  # n (and best_of): every choice holds its own KV session for the whole answer
MAX_TOOLS = 128
MAX_LOGIT_BIAS = 1024  # entries: OpenAI allows 300; a bounded table either way


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool = False  # OpenAI's default is on; here on request (bandwidth over padding)


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions (and what routing reads from any request)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=1, le=MAX_CHOICES)
    logit_bias: dict[str, float] | None = None
    # routing and bookkeeping (api/fields.py says what each does)
    user: str | None = Field(default=None, max_length=512)
    session_id: str | None = Field(default=None, max_length=512)
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    safety_identifier: str | None = Field(default=None, max_length=512)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    store: bool | None = None
    service_tier: str | None = Field(default=None, max_length=32)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries")
        for k, b in (v or {}).items():
            if not k.isdigit() or not -100 <= b <= 100:
                raise ValueError(f"logit_bias maps token ids to numbers in [-100, 100], got {k!r}: {b!r}")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def choices(self) -> int:
        """How many sequences are generated (completions' best_of may ask for more than it returns)."""
        return self.n or 1

    @property
    def sticky_key(self) -> str:
        """What keeps one user's requests on one replica (its KV prefixes stay warm there)."""
        return self.prompt_cache_key or self.user or self.safety_identifier or self.session_id or ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, max_length=256)
    function_call: dict[str, Any] | None = None  # legacy: an assistant's call of `functions`
    refusal: str | None = None  # an earlier assistant refusal, kept as its text
    reasoning_content: str | None = None  # an earlier answer's reasoning, for templates that render it

    def text(self) -> str:
        """Flatten content parts; only text parts are supported by text models."""
        if self.content is None:
            return self.refusal or ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            kind = part.get("type")
            if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif kind == "refusal" and isinstance(part.get("refusal"), str):
                out.append(part["refusal"])
            else:
                raise ValueError(f"unsupported content part type {kind!r}: this model reads text only")
        return "".join(out)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)  # legacy tools
    function_call: str | dict[str, Any] | None = None  # legacy tool_choice
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    modalities: list[Literal["text", "audio"]] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported (send one request per prompt)")
        return v

    @property
    def choices(self) -> int:
        return max(self.best_of or 1, self.n or 1)


class EmbeddingRequest(SamplingFields):
    """POST /v1/embeddings. Inherits the routing fields; api/fields.py refuses the sampling ones."""

    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(default=None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return 1  # nothing is generated; what a hold or an upstream cap sizes for
