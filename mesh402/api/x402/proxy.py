"""Payment for requests the entry node routes to another node's model over the mesh.

The entry node charges, whichever node generates: it verifies the payment before forwarding, and settles
(or draws credit down) only after the host's answer is complete and successful. The host sees the
request as coming from an admitted peer and does not charge again.

The entry node has no tokenizer for a remote model, so usage comes from the host's own answer:
the `usage` object of a JSON response, or, for a stream, the usage chunk (the forwarded request asks for
it; it is passed on only if the client asked for it too). The host's count is not trusted beyond what the
entry saw itself (`bounded_usage`): prompt tokens at most the bytes of the request it forwarded (plus the
chat template's markers), completion tokens at most max_tokens and at most the bytes of the answer (JSON) or
the chunks it relayed (stream); a malformed usage object counts as what the entry saw. Streams are passed through unbuffered and
counted as they go, so prepaid credit can cut a stream off just as on a local model.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from mesh402.api.bodies import sse
from mesh402.api.errors import APIError
from mesh402.api.schemas import SamplingFields

if TYPE_CHECKING:
    from mesh402.api.x402.gate import PaymentGate

log = logging.getLogger(__name__)

Forward = Callable[[bytes], Awaitable[tuple[int, dict[str, str], AsyncIterator[bytes]]]]


TEMPLATE_TOKENS = 256  # prompt tokens a chat template may add beyond one per byte of the request


def bounded_usage(u: Any, prompt_cap: int, completion_cap: int) -> Any:
    """The host's `usage`, each count clamped to what the entry can vouch for (a host claiming 10^9 tokens
    bills the buyer for at most the caps); a missing or malformed object counts as the caps' floor: the
    prompt cap and `completion_cap` (what the entry relayed). None when nothing at all is known."""
    def count(key: str, cap: int) -> int:
        v = u.get(key) if isinstance(u, dict) else None
        return min(v, cap) if type(v) is int and v >= 0 else cap
    if not isinstance(u, dict) and completion_cap <= 0:
        return None
    return SimpleNamespace(prompt_tokens=count("prompt_tokens", prompt_cap),
                           completion_tokens=count("completion_tokens", completion_cap), ttft_s=0.0, total_s=0.0)


async def paid_proxy(gate: "PaymentGate", request: Request, model_id: str, req: SamplingFields, default_max_tokens: int,
                     forward: Forward, extra: int = 0, *, body: bytes | None = None,
                     prompt_tokens: int | None = None) -> Response:
    """`extra`: what the host charges the entry for this request, passed on in the entry's price; `body`: what
    the host gets (default: the client's request as it came); `prompt_tokens`: the prompt's size where the
    entry can count it (a `--backend` model: api/token_count.py), else a guess from the body's size."""
    if body is None:
        body = await request.body()
    stream = bool(req.stream)
    max_tokens = req.requested_max_tokens() or default_max_tokens
    # sizing only (window, credit hold); billing uses the host's usage
    est_prompt = prompt_tokens if prompt_tokens is not None else max(1, len(body) // 4)
    charge = await gate.authorize(request, model_id, est_prompt, max_tokens, stream, extra=extra)
    if charge.replay is not None:
        return charge.replay
    client_wants_usage = False
    fwd_body = body
    if stream:
        data = json.loads(body)
        client_wants_usage = bool((data.get("stream_options") or {}).get("include_usage"))
        data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
        fwd_body = json.dumps(data).encode()
    try:
        status, headers, chunks = await forward(fwd_body)
    except BaseException:
        await gate.release(charge, "the model's host did not answer")
        raise
    if status >= 400 or not headers.get("content-type", "").startswith("text/event-stream"):
        raw = b"".join([c async for c in chunks])
        if status == 402:  # the host wants a payment this entry did not price in: never the client's to make
            await gate.release(charge, "the model's host asked for a payment")
            raise APIError(502, f"the host of {model_id} asked for a payment this node did not price in",
                           type="server_error", code="host_payment_refused")
        if status >= 400:
            await gate.release(charge, f"the model's host answered {status}")
            return Response(raw, status_code=status, headers=headers)
        try:
            out = json.loads(raw)
        except ValueError:
            await gate.release(charge, "the model's host sent an unreadable answer")
            raise APIError(502, "the model's host sent an unreadable answer", type="server_error") from None
        keep = {k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-length")}
        usage = out.get("usage") if isinstance(out, dict) else None
        # a token is at least one byte of the answer it produced: the answer's size bounds the count
        used = bounded_usage(usage, len(body) + TEMPLATE_TOKENS, min(max_tokens, len(raw)))
        return await gate.respond(charge, used, out, {**keep, **charge.headers})
    return StreamingResponse(_meteredsse(gate, charge, chunks, client_wants_usage, len(body) + TEMPLATE_TOKENS,
                                         max_tokens), status_code=status, headers={**headers, **charge.headers})


def _has_text(obj: dict[str, Any]) -> bool:
    ch = (obj.get("choices") or [None])[0]
    if not isinstance(ch, dict):
        return False
    return bool((ch.get("delta") or {}).get("content") or ch.get("text"))


async def _meteredsse(gate: Any, charge: Any, chunks: AsyncIterator[bytes], pass_usage: bool, prompt_cap: int,
                      max_tokens: int) -> AsyncIterator[bytes]:
    sent: list[bytes] = []
    buf = b""
    usage: dict[str, Any] | None = None
    error: str | None = None
    cut = False
    relayed = 0  # chunks with choices passed on: each carries at least one of the host's tokens (or a role)
    last: dict[str, Any] = {}
    try:
        try:
            async for c in chunks:
                buf += c
                while b"\n\n" in buf and not cut:
                    event, buf = buf.split(b"\n\n", 1)
                    line = event.decode(errors="replace").strip()
                    if not line.startswith("data: ") or line[6:] == "[DONE]":
                        continue  # [DONE] is re-sent after the x402 record
                    try:
                        obj = json.loads(line[6:])
                    except ValueError:
                        obj = {}
                    if isinstance(obj.get("error"), dict) and "choices" not in obj:
                        error = str(obj["error"].get("message") or "the host failed")
                    if "x402" in obj and not obj.get("choices"):
                        continue  # the host's record of what the entry paid it: not the client's business
                    if obj.get("usage") and not obj.get("choices"):
                        usage = obj["usage"]
                        if not pass_usage:
                            continue
                    if obj.get("choices"):
                        last = obj
                        relayed += 1
                    more = charge.take_token() if _has_text(obj) else True
                    sent.append(event + b"\n\n")
                    yield sent[-1]
                    cut = not more
                if cut:
                    break
        except Exception as e:  # the tunnel broke: the host's failure, so nothing is settled
            log.warning("routed stream broke: %s", e)
            error = f"the model's host stopped answering: {type(e).__name__}"
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        if error is None:
            gate.stage_stream(charge, b"".join(sent))
        used = None if cut else bounded_usage(usage, prompt_cap, min(max_tokens, relayed))
        record = await asyncio.shield(gate.finish_stream(charge, used, error))
        tail: list[bytes] = []
        if error is not None:
            tail.append(sse(APIError(502, error, type="server_error", code="host_lost").body()))
        elif cut:
            if last:  # the host's own finish chunk never came: end the choice as a length stop
                ch: dict[str, Any] = dict(last["choices"][0])
                ch["finish_reason"] = "length"
                if "delta" in ch:
                    ch["delta"] = {}
                else:
                    ch["text"] = ""
                tail.append(sse({**last, "choices": [ch]}))
            tail.append(sse(APIError(402, f"prepaid credit ran out after {charge.completion_seen} tokens; "
                                      "top up to continue", type="payment_required",
                                      code="insufficient_credit").body()))
        if record is not None:
            tail.append(sse({"object": "chat.completion.chunk", "choices": [], "x402": record}))
        tail.append(b"data: [DONE]\n\n")
        if error is None:
            gate.store_stream(charge, b"".join(sent + tail))
        for b in tail:
            yield b
    finally:
        if not charge.finished:
            gate.abandon_stream(charge)
