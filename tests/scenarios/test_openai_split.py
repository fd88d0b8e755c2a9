"""The OpenAI surface agents use, through a 2-node pipeline split of the bundled model (real node processes,
real QUIC): the last stage draws every token under the grammar the entry compiled (the grant carries its
spec), returns the logprobs its output hash commits to, and the entry follows the stream with its own
matcher. Asked of the entry and of the other node (routed over the tunnel)."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from harness.mesh_nodes import MeshNode, MeshNodes, wait_until
from harness.reference import ready_plan
from tests.support.openai_checks import (
    check_json_schema_answer,
    check_logprobs_and_choices,
    check_required_tool_call,
    check_responses_answer,
    check_streamed_tool_call,
)
from tests.support.split_mesh import SPLIT_ARGS

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def split2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[MeshNode]]:
    nodes = MeshNodes(tmp_path_factory.mktemp("openai-split"))
    try:
        a = nodes.start("a", no_model=False, extra=SPLIT_ARGS)
        b = nodes.start("b", join=a.token(), no_model=False, extra=SPLIT_ARGS, wait=False)
        b.proc.wait_http(f"{b.console}/api/status", timeout=120)
        t = wait_until(lambda: all(ready_plan(n) is not None for n in (a, b)), timeout=240,
                       what="a ready 2-stage split seen by both nodes")
        print(f"split ready after {t:.1f}s")
        plan = ready_plan(a)
        assert plan is not None and len(plan["stages"]) == 2, plan
        yield [a, b]
    finally:
        nodes.stop_all()


def client(node: MeshNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{node.api_port}/v1", api_key="x", max_retries=0, timeout=300)


def test_constrained_tool_calls_through_the_split(split2: list[MeshNode]) -> None:
    c = client(split2[0])
    check_required_tool_call(c)
    check_streamed_tool_call(c)


def test_json_schema_logprobs_and_choices_through_the_split(split2: list[MeshNode]) -> None:
    c = client(split2[0])
    check_json_schema_answer(c)
    check_logprobs_and_choices(c)


def test_responses_and_models_retrieve_from_the_other_node(split2: list[MeshNode]) -> None:
    c = client(split2[1])
    assert c.models.retrieve("smollm2-135m-instruct").id == "smollm2-135m-instruct"
    check_responses_answer(c)
    check_json_schema_answer(c)
