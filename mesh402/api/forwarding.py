"""Forwarding a request to the node that serves its model, over the mesh's HTTP tunnel: the chosen
replica first, the next ones when a connection fails before the answer starts, free or paid (the
entry node charges for what it routes). A host that sells inference is paid like for any client: a free
entry lets its client pay the host (the payment headers cross the tunnel), a paid entry adds the host's
announced price to its own and pays the host from its wallet (economics/upstream.py). `target` decides
between serving here and forwarding."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from mesh402.api.context import EdgeContext
from mesh402.api.errors import APIError, unavailable
from mesh402.api.schemas import SamplingFields
from mesh402.api.selection import local_fallback, pick_model, route_header
from mesh402.api.tunnel import forward as tunnel_forward
from mesh402.api.bodies import sse
from mesh402.economics.charging import OFFER_LABEL, HostOffer
from mesh402.economics.upstream import Reply, Send, UpstreamPaymentError
from mesh402.mesh.framing import StreamType
from mesh402.serving.registry import ModelEntry

log = logging.getLogger(__name__)


# Headers that pay the entry node: a paid entry consumed them, so they never travel on to the host.
PAYMENT_HEADERS = ("payment-signature", "x-payment", "x-mesh402-credit", "idempotency-key")
Pay = Callable[[str, Send], Awaitable[Reply]]  # (host, send) -> the host's reply, paid if it charges


async def open_tunnel(ctx: EdgeContext, request: Request, route: Any, body: bytes, *, local_ok: bool = True,
                      pay: Pay | None = None) -> Any:
    """Tunnel to the chosen replica, else to the next ones when a connection fails before the answer
    starts. Returns (route, status, headers, chunks), or None when a local replica should serve. With
    `pay`, the entry's own payment headers replace the client's (a paid entry buys from the host)."""
    dist = ctx.state.distributed
    router = ctx.router
    rid = uuid.uuid4().hex
    headers = dict(request.headers)
    if pay is not None:
        headers = {k: v for k, v in headers.items() if k.lower() not in PAYMENT_HEADERS}
    tries = [(route.host, route)] + [(h, r) for h, r, _ in getattr(request.state, "replicas", [])
                                     if h != route.host]
    last: Exception | None = None
    for i, (host, target) in enumerate(tries):
        if isinstance(target, ModelEntry):
            if not local_ok:
                continue
            request.state.pick = "retry"
            return None  # the caller serves it here

        def send(extra: dict[str, str], host: str = host) -> Awaitable[Reply]:
            return tunnel_forward(lambda: dist.mesh.open_stream(bytes.fromhex(host), StreamType.HTTP_TUNNEL),
                                  request.method, request.url.path, {**headers, **extra}, body, rid)
        try:
            router.inflight[(target.model_id, host)] += 1
            try:
                status, out, chunks = await (pay(host, send) if pay is not None else send({}))
            finally:
                router.inflight[(target.model_id, host)] -= 1
        except UpstreamPaymentError as e:  # the host is alive but wants what this node will not pay
            log.warning("not paying %s: %s", host[:12], e)
            last = e
            continue
        except Exception as e:
            log.warning("tunnel to %s failed: %s", host[:12], e)
            router.picker.table.forget_replica(host)
            last = e
            continue
        if i:
            request.state.pick = "retry"
        return target, status, out, chunks
    tried = sum(1 for _, t in tries if not isinstance(t, ModelEntry))
    if isinstance(last, UpstreamPaymentError):
        raise APIError(502, f"the host of {route.model_id} wants a payment this node will not make: {last}",
                       type="server_error", code="host_payment_refused")
    raise unavailable(f"no node serving {route.model_id} answered (tried {tried}, last error "
                      f"{type(last).__name__}); retry shortly",
                      ctx.retry_after, code="host_unreachable")


def upstream_pay(ctx: EdgeContext, route: Any, body: bytes, req: Any) -> tuple[int, Pay | None]:
    """What a paid entry adds to its price for a routed request, and how it pays the host: the host's
    announced offer at most. Refuses (before the client pays anything) when the host charges and this
    node has no wallet, or takes another asset."""
    offer = host_offer(ctx, route.host)
    buyer = ctx.buyer
    if offer is None or not offer.charges:
        # a host that announces no price is not paid; if it asks anyway, the buyer refuses (cap 0)
        return 0, (lambda host, send: buyer.send(host, send, 0)) if buyer is not None else None
    if buyer is None:
        raise unavailable(f"the host of {route.model_id} sells it and this node has no wallet to buy it "
                          "(start it with --payout-key-file)", ctx.retry_after, code="host_charges")
    if (offer.network, offer.asset.lower()) != (buyer.network, buyer.asset):
        raise unavailable(f"the host of {route.model_id} takes {offer.asset} on {offer.network}, which this node "
                          "does not pay with", ctx.retry_after, code="host_asset_mismatch")
    cap = offer.cap(len(body), req.requested_max_tokens() or ctx.config.limits.default_max_tokens)
    return cap, lambda host, send: buyer.send(host, send, cap)


def host_offer(ctx: EdgeContext, host: str) -> HostOffer | None:
    """The price `host` announces (untrusted: validated), if it sells inference."""
    dist = ctx.distributed
    if dist is None or dist.mesh.gossip is None:
        return None
    ann = dist.mesh.gossip.get(bytes.fromhex(host))
    return HostOffer.from_label(ann.labels.get(OFFER_LABEL)) if ann is not None else None


async def proxy(ctx: EdgeContext, request: Request, route: Any, req: Any = None) -> Response | None:
    """Carry the request over the mesh to the model's host; the answer streams back as it comes.
    None when a local replica should serve it after all."""
    if ctx.gate is not None and req is not None:  # the entry node charges for what it routes
        from mesh402.api.x402.proxy import paid_proxy

        served = [route]
        extra, pay = upstream_pay(ctx, route, await request.body(), req)

        async def send(body: bytes) -> Any:
            target, status, headers, chunks = await open_tunnel(ctx, request, route, body, local_ok=False, pay=pay)
            served[0] = target
            return status, headers, chunks

        resp = await paid_proxy(ctx.gate, request, route.model_id, req, ctx.config.limits.default_max_tokens, send,
                                extra=extra)
        resp.headers.update(route_header(request, served[0].model_id, served[0].host, "mesh"))
        return resp
    body = await request.body()
    if getattr(request.state, "route", None) is not None:  # the host must serve the model chosen here
        data = json.loads(body)
        data["model"] = route.model_id
        body = json.dumps(data).encode()
    opened = await open_tunnel(ctx, request, route, body)
    if opened is None:
        return None
    route, status, headers, chunks = opened
    if getattr(request.state, "prefix", None):
        ctx.router.picker.served(request.state.prefix, route.host, time.monotonic())
    headers.update(route_header(request, route.model_id, route.host, "mesh"))
    is_sse = headers.get("content-type", "").startswith("text/event-stream")

    async def body_iter() -> AsyncIterator[bytes]:
        try:
            async for c in chunks:
                yield c
        except Exception as e:  # the host died mid-answer: end the stream cleanly
            log.warning("tunnel from %s broke mid-stream: %s", route.host[:12], e)
            if is_sse:
                yield sse(APIError(502, f"the host of {route.model_id} stopped answering mid-stream",
                                   type="server_error", code="host_lost").body())
                yield b"data: [DONE]\n\n"

    return StreamingResponse(body_iter(), status_code=status, headers=headers)


async def target(ctx: EdgeContext, request: Request, req: SamplingFields) -> ModelEntry | Response:
    """The local model entry that serves this request, or the response of the node that did."""
    entry = pick_model(ctx, req.model, request, req)
    if not isinstance(entry, ModelEntry):
        resp = await proxy(ctx, request, entry, req)
        if resp is not None:
            return resp
        entry = local_fallback(request)
    return entry
