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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic

from fastapi import Request
from fastapi.responses import Response

from mesh402.api.bodies import Body, read_json
from mesh402.api.context import EdgeContext
from mesh402.api.errors import APIError, unavailable
from mesh402.api.fields import Table
from mesh402.api.schemas import SamplingFields
from mesh402.api.selection import Selection, Target, pick_model, route_header
from mesh402.api.tunnel import forward as tunnel_forward
from mesh402.economics.charging import OFFER_LABEL, HostOffer
from mesh402.economics.upstream import Reply, Send, UpstreamPaymentError
from mesh402.mesh.framing import StreamType
from mesh402.serving.registry import ModelEntry

if TYPE_CHECKING:
    from mesh402.serving.distributed import Route

log = logging.getLogger(__name__)


# Headers that pay the entry node: a paid entry consumed them, so they never travel on to the host.
PAYMENT_HEADERS = ("payment-signature", "x-payment", "x-mesh402-credit", "x-mesh402-voucher", "idempotency-key")
Pay = Callable[[str, Send], Awaitable[Reply]]  # (host, send) -> the host's reply, paid if it charges


@dataclass
class Opened:
    """A tunnel that answered: the node that serves, and its answer (status, headers, body stream)."""

    target: Route
    status: int
    headers: dict[str, str]
    chunks: AsyncIterator[bytes]


async def open_tunnel(ctx: EdgeContext, sel: Selection, request: Request, route: Route, body: bytes, *,
                      local_ok: bool = True, pay: Pay | None = None) -> Opened | None:
    """Tunnel to the chosen replica, else to the next ones when a connection fails before the answer
    starts; None when a local replica should serve. With `pay`, the entry's own payment headers replace
    the client's (a paid entry buys from the host)."""
    dist = ctx.distributed
    assert dist is not None
    router = ctx.router
    rid = uuid.uuid4().hex
    headers = dict(request.headers)
    if pay is not None:
        headers = {k: v for k, v in headers.items() if k.lower() not in PAYMENT_HEADERS}
    tries: list[tuple[str, Target]] = [(route.host, route)] + [(h, r) for h, r, _ in sel.replicas if h != route.host]
    # replicas that just failed (for any retry policy: the mesh's shared health tracker) go last
    health = dist.mesh.health
    tries.sort(key=lambda t: not isinstance(t[1], ModelEntry) and not health.may_try(bytes.fromhex(t[0])))
    last: Exception | None = None
    for i, (host, target) in enumerate(tries):
        if isinstance(target, ModelEntry):
            if not local_ok:
                continue
            sel.pick = "retry"
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
            health.failed(bytes.fromhex(host))
            last = e
            continue
        health.succeeded(bytes.fromhex(host))
        if i:
            sel.pick = "retry"
        return Opened(target, status, out, chunks)
    tried = sum(1 for _, t in tries if not isinstance(t, ModelEntry))
    if isinstance(last, UpstreamPaymentError):
        raise APIError(502, f"the host of {route.model_id} wants a payment this node will not make: {last}",
                       type="server_error", code="host_payment_refused")
    raise unavailable(f"no node serving {route.model_id} answered (tried {tried}, last error "
                      f"{type(last).__name__}); retry shortly",
                      ctx.retry_after, code="host_unreachable")


def upstream_pay(ctx: EdgeContext, route: Route, body: bytes, req: SamplingFields) -> tuple[int, Pay | None]:
    """What an entry that charges adds to its price for a routed request, and how it pays the host: the
    host's announced offer at most. Refuses (before the client pays anything) when the host charges and
    this node has no wallet, or takes another asset. A free entry pays nothing: its client pays the host."""
    if not ctx.payments.charges:
        return 0, None
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
    max_tokens = req.requested_max_tokens() or ctx.config.limits.default_max_tokens
    cap, most = offer.cap(len(body), max_tokens), offer.most(len(body), max_tokens)
    return cap, lambda host, send: buyer.send(host, send, cap, voucher_cap=most)


def host_offer(ctx: EdgeContext, host: str) -> HostOffer | None:
    """The price `host` announces (untrusted: validated), if it sells inference."""
    dist = ctx.distributed
    if dist is None or dist.mesh.gossip is None:
        return None
    ann = dist.mesh.gossip.get(bytes.fromhex(host))
    return HostOffer.from_label(ann.labels.get(OFFER_LABEL)) if ann is not None else None


async def proxy(ctx: EdgeContext, sel: Selection, request: Request, route: Route,
                req: SamplingFields) -> Response | None:
    """Carry the request over the mesh to the model's host; the answer streams back as it comes, charged
    here if this node sells. None when a local replica should serve it after all."""
    body = await request.body()
    if sel.route is not None:  # the host must serve the model chosen here
        data = json.loads(body)
        data["model"] = route.model_id
        body = json.dumps(data).encode()
    extra, pay = upstream_pay(ctx, route, body, req)
    served: list[Opened] = []

    async def forward(fwd: bytes) -> tuple[int, dict[str, str], AsyncIterator[bytes]]:
        opened = await open_tunnel(ctx, sel, request, route, fwd, local_ok=False, pay=pay)
        assert opened is not None  # local_ok=False never falls back here
        served.append(opened)
        return opened.status, opened.headers, opened.chunks

    if not ctx.payments.charges:  # a free entry may still fall back to its own replica before forwarding
        opened = await open_tunnel(ctx, sel, request, route, body)
        if opened is None:
            return None
        served.append(opened)

        async def forward_opened(_: bytes) -> tuple[int, dict[str, str], AsyncIterator[bytes]]:
            return opened.status, opened.headers, opened.chunks
        resp = await ctx.payments.routed(request, body, route.model_id, req, ctx.config.limits.default_max_tokens,
                                         forward_opened, extra)
    else:
        resp = await ctx.payments.routed(request, body, route.model_id, req, ctx.config.limits.default_max_tokens,
                                         forward, extra)
    target = served[-1].target if served else route
    if sel.prefix:
        ctx.router.picker.served(sel.prefix, target.host, time.monotonic())
    via = "mesh; backend; verified=false" if not isinstance(target, ModelEntry) and target.backend else "mesh"
    resp.headers.update(route_header(sel, target.model_id, target.host, via))
    return resp


async def target(ctx: EdgeContext, request: Request, req: SamplingFields) -> tuple[ModelEntry, Selection] | Response:
    """The local model entry that serves this request (with how it was chosen), or the response of the
    node that did."""
    sel = Selection()
    entry = pick_model(ctx, sel, req.model, request, req)
    if not isinstance(entry, ModelEntry):
        resp = await proxy(ctx, sel, request, entry, req)
        if resp is not None:
            return resp
        entry = sel.local_replica()
    return entry, sel


@dataclass
class Arrived(Generic[Body]):
    """A request to serve here: its body, the chat-shaped request it was routed as, the model entry and how
    it was chosen."""

    body: Body
    routed: SamplingFields
    entry: ModelEntry
    sel: Selection


async def arrive(ctx: EdgeContext, request: Request, model: type[Body], table: Table, endpoint: str,
                 routed_as: Callable[[Body], SamplingFields] | None = None) -> Arrived[Body] | Response:
    """Authenticate, read the body (api/fields.py: no field ignored) and route it: what to serve here, or the
    answer of the node that served it. `routed_as`: the request as routing reads it (a Responses request
    is routed as the chat request it becomes)."""
    ctx.check_auth(request)
    body = await read_json(request, model, ctx.config.limits.max_request_bytes, table, endpoint)
    routed = routed_as(body) if routed_as is not None else body
    assert isinstance(routed, SamplingFields)
    chosen = await target(ctx, request, routed)
    if isinstance(chosen, Response):
        return chosen
    return Arrived(body, routed, *chosen)
