"""How the edge takes payment for an answer: one policy object per node instead of `if gate` branches.

- `FreePolicy`: nothing to pay; answers go out as they are.
- `X402Policy`: x402 v2 through the node's PaymentGate, per request (`--price`) or metered from prepaid
  credit (`--price-per-1k`): verified before any work, settled after it (api/x402/).

Every answer, served here or routed to another node, goes through the same five steps: `admit` before any
work (None when nothing is charged), `sse` or `respond` to shape it, `release` when the work failed, and
`routed` for an answer another node produces.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mesh402.api.bodies import sse as sse_bytes
from mesh402.api.errors import APIError
from mesh402.api.schemas import SamplingFields
from mesh402.api.x402.gate import Charge, PaymentGate
from mesh402.api.x402.proxy import paid_proxy
from mesh402.api.x402.stream import paid_sse
from mesh402.economics.charging import HostOffer
from mesh402.serving.generation import Delta, Finished

# (delta, finish, first) -> the OpenAI chunk(s) to send (a Responses stream may send several events for one
# delta), None when there is nothing to send. (None, None, False) is the frame of the usage and x402
# records (`record`); (None, reason, False) ends the answer (choices still open end with `reason`).
Chunk = Callable[[Delta | None, str | None, bool], "dict[str, Any] | list[dict[str, Any]] | None"]


def frames(out: dict[str, Any] | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """What a Chunk call gave, as a list of events to send."""
    return [] if out is None else out if isinstance(out, list) else [out]


def record(chunk: Chunk) -> dict[str, Any]:
    """The frame a usage or x402 record goes out in."""
    out = frames(chunk(None, None, False))
    return dict(out[0]) if out else {}
Forward = Callable[[bytes], Awaitable[tuple[int, dict[str, str], AsyncIterator[bytes]]]]  # body -> host's answer


def usage(fin: Finished) -> dict[str, Any]:
    return {"prompt_tokens": fin.prompt_tokens, "completion_tokens": fin.completion_tokens,
            "total_tokens": fin.prompt_tokens + fin.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": fin.cached_tokens}}


class PaymentPolicy(Protocol):
    mode: str  # "free" | "per_request" | "metered"

    @property
    def charges(self) -> bool: ...

    def offer(self) -> HostOffer | None:
        """What this node sells, for its announcement (None: free)."""
        ...

    async def admit(self, request: Request, model_id: str, prompt_tokens: int, max_tokens: int, stream: bool,
                    extra: int = 0) -> Charge | None:
        """Before any work: a charge to settle after it, None when nothing is charged; raises APIError 402."""
        ...

    async def release(self, charge: Charge | None, reason: str) -> None:
        """The work failed or never started: nothing is settled."""
        ...

    async def respond(self, charge: Charge | None, fin: Finished, body: dict[str, Any],
                      headers: dict[str, str]) -> Response:
        """A whole (non-streamed) answer, settled first where it is paid."""
        ...

    def sse(self, charge: Charge | None, events: AsyncIterator[Delta | Finished], chunk: Chunk, include_usage: bool,
            prompt_tokens: int) -> AsyncIterator[bytes]:
        """A streamed answer as SSE bytes (paid: metered per token, settled after the last one)."""
        ...

    async def routed(self, request: Request, body: bytes, model_id: str, req: SamplingFields, default_max_tokens: int,
                     forward: Forward, extra: int = 0, prompt_tokens: int | None = None) -> Response:
        """An answer another node produces for `body` (`forward(body)`), charged here where this node sells.
        `prompt_tokens`: the prompt's size where this node can count it (sizes the credit hold)."""
        ...


class FreePolicy:
    mode = "free"
    charges = False

    def offer(self) -> HostOffer | None:
        return None

    async def admit(self, request: Request, model_id: str, prompt_tokens: int, max_tokens: int, stream: bool,
                    extra: int = 0) -> Charge | None:
        return None

    async def release(self, charge: Charge | None, reason: str) -> None:
        return None

    async def respond(self, charge: Charge | None, fin: Finished, body: dict[str, Any],
                      headers: dict[str, str]) -> Response:
        return JSONResponse(body, headers=headers)

    async def sse(self, charge: Charge | None, events: AsyncIterator[Delta | Finished], chunk: Chunk,
                  include_usage: bool, prompt_tokens: int) -> AsyncIterator[bytes]:
        import logging

        try:
            for c in frames(chunk(None, None, True)):
                yield sse_bytes(c)
            async for ev in events:
                for c in frames(chunk(ev, None, False) if isinstance(ev, Delta) else chunk(None, ev.reason, False)):
                    yield sse_bytes(c)
                if isinstance(ev, Finished) and include_usage:
                    last = record(chunk)
                    last["choices"] = []
                    last["usage"] = usage(ev)
                    yield sse_bytes(last)
        except Exception as e:  # the status line is gone; report in-band and end cleanly
            logging.getLogger(__name__).exception("generation failed mid-stream")
            yield sse_bytes(APIError(500, f"generation failed: {e}", type="server_error").body())
        yield b"data: [DONE]\n\n"

    async def routed(self, request: Request, body: bytes, model_id: str, req: SamplingFields, default_max_tokens: int,
                     forward: Forward, extra: int = 0, prompt_tokens: int | None = None) -> Response:
        import logging

        status, headers, chunks = await forward(body)
        is_sse = headers.get("content-type", "").startswith("text/event-stream")

        async def answer() -> AsyncIterator[bytes]:
            try:
                async for c in chunks:
                    yield c
            except Exception as e:  # the host died mid-answer: end the stream cleanly
                logging.getLogger(__name__).warning("routed answer broke mid-stream: %s", e)
                if is_sse:
                    yield sse_bytes(APIError(502, f"the host of {model_id} stopped answering mid-stream",
                                             type="server_error", code="host_lost").body())
                    yield b"data: [DONE]\n\n"

        return StreamingResponse(answer(), status_code=status, headers=headers)


class X402Policy:
    """x402 at the edge (api/x402/): the gate verifies before work and settles after it."""

    def __init__(self, gate: PaymentGate) -> None:
        self.gate = gate
        self.mode = "metered" if gate.metered else "per_request"

    charges = True

    def offer(self) -> HostOffer | None:
        return self.gate.offer()

    async def admit(self, request: Request, model_id: str, prompt_tokens: int, max_tokens: int, stream: bool,
                    extra: int = 0) -> Charge | None:
        return await self.gate.authorize(request, model_id, prompt_tokens, max_tokens, stream, extra=extra)

    async def release(self, charge: Charge | None, reason: str) -> None:
        if charge is not None:
            await self.gate.release(charge, reason)

    async def respond(self, charge: Charge | None, fin: Finished, body: dict[str, Any],
                      headers: dict[str, str]) -> Response:
        assert charge is not None
        return await self.gate.respond(charge, fin, body, headers)  # settles, adds PAYMENT-RESPONSE

    def sse(self, charge: Charge | None, events: AsyncIterator[Delta | Finished], chunk: Chunk, include_usage: bool,
            prompt_tokens: int) -> AsyncIterator[bytes]:

        assert charge is not None
        return paid_sse(self.gate, charge, events, chunk, sse_bytes, usage, include_usage, prompt_tokens)

    async def routed(self, request: Request, body: bytes, model_id: str, req: SamplingFields, default_max_tokens: int,
                     forward: Forward, extra: int = 0, prompt_tokens: int | None = None) -> Response:

        return await paid_proxy(self.gate, request, model_id, req, default_max_tokens, forward, extra=extra, body=body,
                                prompt_tokens=prompt_tokens)
