"""The facilitator's HTTP surface (in-process, with a stand-in for the SDK facilitator)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from mesh402.economics.facilitator import create_facilitator_app

PAYLOAD = {"x402Version": 2, "accepted": {"scheme": "exact", "network": "eip155:31337", "asset": "0x" + "a" * 40,
                                          "amount": "1", "payTo": "0x" + "b" * 40, "maxTimeoutSeconds": 60,
                                          "extra": {"name": "T", "version": "2"}},
           "payload": {"signature": "0x00", "authorization": {}}}
BODY = {"x402Version": 2, "paymentPayload": PAYLOAD, "paymentRequirements": PAYLOAD["accepted"]}


class StandIn:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def get_supported(self) -> Any:
        from x402.schemas import SupportedKind, SupportedResponse
        return SupportedResponse(kinds=[SupportedKind(x402_version=2, scheme="exact", network="eip155:31337"),
                                        SupportedKind(x402_version=1, scheme="exact", network="base")],
                                 extensions=[], signers={"eip155:*": ["0x" + "c" * 40]})

    def verify(self, payload: Any, req: Any) -> Any:
        from x402.schemas import VerifyResponse
        self.calls.append("verify")
        return VerifyResponse(is_valid=True, payer="0x" + "d" * 40)

    def settle(self, payload: Any, req: Any) -> Any:
        self.calls.append("settle")
        raise RuntimeError("rpc down")


def test_supported_lists_only_configured_networks_and_errors_are_answered_in_protocol_shape() -> None:
    fac = StandIn()
    c = TestClient(create_facilitator_app(fac, ["eip155:31337"]))
    sup = c.get("/supported").json()
    assert [k["network"] for k in sup["kinds"]] == ["eip155:31337"] and sup["signers"]["eip155:*"]
    assert c.post("/verify", json=BODY).json() == {"isValid": True, "payer": "0x" + "d" * 40}
    bad = c.post("/verify", json={"nope": 1}).json()
    assert bad["isValid"] is False and bad["invalidReason"] == "invalid_payload"
    s = c.post("/settle", json=BODY).json()
    assert s["success"] is False and s["errorReason"] == "unexpected_settle_error" and "rpc down" in s["errorMessage"]
    assert fac.calls == ["verify", "settle"]
