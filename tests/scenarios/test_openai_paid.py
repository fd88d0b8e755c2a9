"""The OpenAI surface agents use, bought from a paid node (real chain, facilitator, node process): the official
`openai` client pays each 402 through the x402 SDK's sync client and gets constrained tool calls (plain and
streamed), json_schema answers, logprobs with n choices and a Responses answer, each paid on chain."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from harness.dev_chain import DevChain, paid_mesh_env
from harness.mesh_nodes import MeshNode, wait_until
from harness.x402_payments import X402SyncTransport
from tests.support.chain import require_contract_toolchain
from tests.support.openai_checks import (
    check_json_schema_answer,
    check_logprobs_and_choices,
    check_required_tool_call,
    check_responses_answer,
    check_streamed_tool_call,
)

PRICE = 10_000  # 0.01 USDC per request

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def paid_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevChain, MeshNode]]:
    require_contract_toolchain()
    with paid_mesh_env(tmp_path_factory.mktemp("openai-paid"), buyers=1, nodes=1) as (chain, fac_url, nodes):
        node = nodes.start("host", no_model=False, extra=[
            "--price", "0.01", "--pay-to", "node-0", "--deployment", str(chain.dir), "--facilitator", fac_url])
        node.proc.wait_http(f"http://127.0.0.1:{node.api_port}/ready", timeout=180)
        yield chain, node


def test_agent_surface_bought_with_x402(paid_node: tuple[DevChain, MeshNode]) -> None:
    chain, node = paid_node
    buyer, seller = chain.dep.address("buyer-0"), chain.dep.address("node-0")
    b0, s0 = chain.balance(buyer), chain.balance(seller)
    base = f"http://127.0.0.1:{node.api_port}/v1"
    with pytest.raises(openai.APIStatusError) as e:  # unpaid: the 402 names the price
        openai.OpenAI(base_url=base, api_key="x", max_retries=0).chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.status_code == 402
    transport = X402SyncTransport(chain.key("buyer-0"), chain.dep)
    c = openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=300,
                      http_client=httpx.Client(transport=transport, timeout=300))
    check_required_tool_call(c)
    check_streamed_tool_call(c)
    check_json_schema_answer(c)
    check_logprobs_and_choices(c)
    check_responses_answer(c)
    assert transport.paid >= 9
    paid = PRICE * transport.paid
    wait_until(lambda: chain.balance(seller) == s0 + paid, timeout=60, what="every purchase settled on chain")
    assert chain.balance(buyer) == b0 - paid
