"""SSE for a paid request: tokens flow unbuffered, payment is settled after the last one.

Order of events on the wire (OpenAI chunk shapes throughout):
  role chunk, content chunks as generated, the finish chunk (`length` if prepaid credit ran out),
  the usage chunk (if asked for), an in-band error object if credit ran out (`insufficient_credit`)
  or generation failed, then the x402 record `{"choices": [], "x402": {...}}`, then `data: [DONE]`.
The x402 record carries the SettlementResponse (per-request price or credit top-up) and/or the credit
draw-down; it is produced after the last token, so a client learns the outcome before [DONE].
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from mesh402.api.errors import APIError
from mesh402.serving.generation import Delta, Finished

log = logging.getLogger(__name__)


def _frame(chunk: Callable[..., Any]) -> dict[str, Any]:
    """The frame a usage or x402 record goes out in (the endpoint's chunk for no delta)."""
    out = chunk(None, None, False)
    out = out[0] if isinstance(out, list) and out else out
    return dict(out) if isinstance(out, dict) else {}


async def paid_sse(gate: Any, charge: Any, events: AsyncIterator[Delta | Finished], chunk: Callable[..., Any],
                   sse: Callable[[Any], bytes], usage: Callable[[Finished], dict], include_usage: bool,
                   prompt_tokens: int) -> AsyncIterator[bytes]:
    sent: list[bytes] = []

    def emit(obj: Any) -> list[bytes]:
        """The SSE events of what a chunk call gave (nothing, one event, or several)."""
        out = [sse(o) for o in ([] if obj is None else obj if isinstance(obj, list) else [obj])]
        sent.extend(out)
        return out
    fin: Finished | None = None
    error: str | None = None
    try:
        for out in emit(chunk(None, None, True)):
            yield out
        try:
            async with contextlib.aclosing(events) as evs:  # type: ignore[type-var]
                async for ev in evs:
                    if isinstance(ev, Delta):
                        # every generated token is counted (tool-call tokens and tokens with no text yet
                        # included) before its text is sent, so a disconnect pays for it
                        more = all([charge.take_token() for _ in range(ev.tokens)])
                        for out in emit(chunk(ev, None, False)):
                            yield out
                        if not more:  # prepaid credit ran out: end cleanly
                            break
                    else:
                        fin = ev
        except Exception as e:
            log.exception("generation failed mid-stream")
            error = f"generation failed: {e}"
        if error is None:
            for out in emit(chunk(None, fin.reason if fin else "length", False)):
                yield out
            if include_usage:
                last = _frame(chunk)
                last["choices"] = []
                last["usage"] = usage(fin) if fin else {
                    "prompt_tokens": prompt_tokens, "completion_tokens": charge.completion_seen,
                    "total_tokens": prompt_tokens + charge.completion_seen}
                for out in emit(last):
                    yield out
        # shielded: a client that hangs up now must not cut a settlement off halfway
        record = await asyncio.shield(gate.finish_stream(charge, fin, error))
        tail: list[bytes] = []
        if error is not None:
            tail.append(sse(APIError(500, error, type="server_error").body()))
        elif charge.exhausted:
            tail.append(sse(APIError(402, f"prepaid credit ran out after {charge.completion_seen} tokens; "
                                     "top up to continue", type="payment_required",
                                     code="insufficient_credit").body()))
        if record is not None:
            last = _frame(chunk)
            last["choices"] = []
            last["x402"] = record
            tail.append(sse(last))
        tail.append(b"data: [DONE]\n\n")
        if error is None:
            gate.store_stream(charge, b"".join(sent + tail))
        for b in tail:
            yield b
    finally:
        if not charge.finished:  # the client went away mid-stream
            gate.abandon_stream(charge)
