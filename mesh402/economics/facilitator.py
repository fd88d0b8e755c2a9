"""`mesh402 facilitator`: an x402 facilitator over HTTP (POST /verify, POST /settle, GET /supported).

The checks and the settlement transaction are the x402 SDK's own (`x402FacilitatorSync` with the `exact`
EVM scheme and a web3 signer); this module only puts them behind the standard HTTP API for local or
self-hosted use. Blocking chain calls run in a worker thread; settlements are serialised so the signer's
transaction nonces never race.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)


def build_facilitator(private_key: str, rpc_url: str, networks: list[str]) -> Any:
    from x402 import x402FacilitatorSync
    from x402.mechanisms.evm import FacilitatorWeb3Signer
    from x402.mechanisms.evm.exact import register_exact_evm_facilitator

    signer = FacilitatorWeb3Signer(private_key=private_key, rpc_url=rpc_url, confirmation_timeout_seconds=60)
    fac = x402FacilitatorSync()
    register_exact_evm_facilitator(fac, signer, networks=networks)
    return fac


def create_facilitator_app(facilitator: Any, networks: list[str] | None = None) -> FastAPI:
    from x402.schemas import parse_payment_payload, parse_payment_requirements

    app = FastAPI(title="mesh402 facilitator", docs_url=None, redoc_url=None)
    settle_lock = threading.Lock()

    def parse(body: dict[str, Any]) -> tuple[Any, Any]:
        payload = parse_payment_payload(body["paymentPayload"])
        version = int(body.get("x402Version") or payload.x402_version)
        return payload, parse_payment_requirements(version, body["paymentRequirements"])

    async def read(request: Request) -> dict[str, Any]:
        body = await request.json()
        if not isinstance(body, dict) or "paymentPayload" not in body or "paymentRequirements" not in body:
            raise ValueError("body must be {x402Version, paymentPayload, paymentRequirements}")
        return body

    def dump(model: Any) -> dict[str, Any]:
        return model.model_dump(by_alias=True, exclude_none=True)

    @app.get("/supported")
    async def supported() -> dict[str, Any]:
        out = dump(facilitator.get_supported())
        if networks:  # the SDK also lists v1 names of public chains this facilitator has no RPC for
            out["kinds"] = [k for k in out.get("kinds", []) if k.get("network") in networks]
        return out

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/verify")
    async def verify(request: Request) -> JSONResponse:
        try:
            payload, req = parse(await read(request))
        except Exception as e:
            return JSONResponse({"isValid": False, "invalidReason": "invalid_payload", "invalidMessage": str(e)})
        try:
            res = await asyncio.to_thread(facilitator.verify, payload, req)
        except Exception as e:
            log.exception("verify failed")
            return JSONResponse({"isValid": False, "invalidReason": _reason(e, "unexpected_verify_error"),
                                 "invalidMessage": str(e)})
        return JSONResponse(dump(res))

    @app.post("/settle")
    async def settle(request: Request) -> JSONResponse:
        try:
            payload, req = parse(await read(request))
        except Exception as e:
            return JSONResponse({"success": False, "errorReason": "invalid_payload", "errorMessage": str(e),
                                 "transaction": "", "network": ""})

        def run() -> Any:
            with settle_lock:
                return facilitator.settle(payload, req)
        try:
            res = await asyncio.to_thread(run)
        except Exception as e:
            log.exception("settle failed")
            return JSONResponse({"success": False, "errorReason": _reason(e, "unexpected_settle_error"),
                                 "errorMessage": str(e), "transaction": "", "network": req.network})
        return JSONResponse(dump(res))

    return app


def _reason(e: Exception, default: str) -> str:
    return getattr(e, "invalid_reason", None) or getattr(e, "error_reason", None) or (
        "unsupported_scheme" if type(e).__name__ == "SchemeNotFoundError" else default)
