"""`POST /v1/embeddings` for embedding models (engine/embeddings.py: the model's files say how to pool).

Inputs are a string, strings, token ids or lists of token ids; each is embedded alone (a vector never
depends on its batch), L2-normalised, optionally cut to `dimensions` and re-normalised (Matryoshka), and
sent as floats or base64 (little-endian float32). A chat model asked for embeddings is a 400. Served
here, or routed to the model's host like any request; charged for the input tokens where the node sells."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from mesh402.api import fields
from mesh402.api.context import EdgeContext
from mesh402.api.errors import bad_request
from mesh402.api.forwarding import arrive
from mesh402.api.schemas import EmbeddingRequest
from mesh402.api.selection import local_route
from mesh402.serving.generation import Finished
from mesh402.serving.registry import ModelEntry

MAX_INPUTS = 256  # inputs per request (OpenAI allows 2048; each one here is its own forward pass)


def install(app: FastAPI, ctx: EdgeContext) -> None:
    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        got = await arrive(ctx, request, EmbeddingRequest, fields.EMBEDDINGS, "embeddings", named_model)
        if isinstance(got, Response):
            return got
        return await embed(ctx, request, got.body, got.entry, local_route(ctx, got.sel, got.entry))


def named_model(req: EmbeddingRequest) -> EmbeddingRequest:
    """Embeddings name their model: `auto` picks among chat models."""
    if req.model in (None, "", "auto"):
        raise bad_request("embeddings need a model: name an embedding model (see GET /v1/models)", param="model")
    return req


def token_inputs(req: EmbeddingRequest, entry: ModelEntry) -> list[list[int]]:
    """Every input as token ids (text with the model's special tokens, as embedding models expect), checked."""
    local = entry.local
    assert local is not None
    raw = req.input
    items: list[Any] = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    if not items:
        raise bad_request("input is empty", param="input")
    if len(items) > MAX_INPUTS:
        raise bad_request(f"at most {MAX_INPUTS} inputs per request", param="input")
    tok, vocab, n_ctx = local.engine.tokenizer, local.engine.info.vocab_size, local.n_ctx
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = tok.encode(item, add_special=True)
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            ids = list(item)
            if any(not 0 <= t < vocab for t in ids):
                raise bad_request(f"input[{i}]: token ids must be in [0, {vocab})", param="input")
        else:
            raise bad_request(f"input[{i}] must be a string or a list of token ids", param="input")
        if not ids:
            raise bad_request(f"input[{i}] is empty", param="input")
        if len(ids) > n_ctx:
            raise bad_request(f"input[{i}] has {len(ids)} tokens; the context window is {n_ctx}",
                              param="input", code="context_length_exceeded")
        out.append(ids)
    return out


async def embed(ctx: EdgeContext, request: Request, req: EmbeddingRequest, entry: ModelEntry,
                headers: dict[str, str]) -> Response:
    from mesh402.engine.embeddings import (  # lazy: loads gguf, numpy, torch only when needed
        embed_batch,
        pooling_of,
        to_base64,
    )
    from mesh402.engine.errors import EngineError  # lazy: loads gguf, numpy, torch only when needed

    local = entry.local
    assert local is not None
    engine = local.engine
    if pooling_of(engine) is None:
        raise bad_request(f"{entry.model_id} is a chat model, not an embedding model (its files declare no "
                          "pooling); name an embedding model", param="model", code="not_an_embedding_model")
    if not engine.is_full_model:
        raise bad_request(f"{entry.model_id} is split across nodes; embeddings need the whole model on one node",
                          param="model", code="model_split")
    inputs = token_inputs(req, entry)
    hidden = int(engine.info.hidden)
    if req.dimensions is not None and req.dimensions > hidden:
        raise bad_request(f"dimensions must be at most {hidden} for this model", param="dimensions")
    n_tokens = sum(len(x) for x in inputs)
    charge = await ctx.payments.admit(request, entry.model_id, n_tokens, 1, False)
    if charge is not None and charge.replay is not None:
        return charge.replay
    loop = asyncio.get_running_loop()
    vectors = []
    try:
        for ids in inputs:  # one engine-thread call per input: other requests interleave
            try:
                vectors.extend(await loop.run_in_executor(local.executor, embed_batch, engine, [ids]))
            except (EngineError, ValueError) as e:
                raise bad_request(f"cannot embed this input: {e}", param="input") from None
    except BaseException:
        await ctx.payments.release(charge, "embedding failed")
        raise
    data = []
    for i, v in enumerate(vectors):
        if req.dimensions is not None:  # Matryoshka: the first components, re-normalised
            v = v[: req.dimensions]
            v = v / max(float(v.double().norm()), 1e-12)
        value: Any = to_base64(v) if req.encoding_format == "base64" else [float(x) for x in v.tolist()]
        data.append({"object": "embedding", "index": i, "embedding": value})
    body = {"object": "list", "data": data, "model": entry.model_id,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
    return await ctx.payments.respond(charge, Finished("stop", n_tokens, 0), body, headers)
