"""A hostile last stage in a real node process (tests.support.tamper_node, cheat `grammar_escape`): it draws
every token unconstrained whatever the grant's grammar says. The host's own matcher refuses its first
token (bad_output), the step fails over to an honest standby, and the client still gets JSON that fits
the schema.

The cheat must be the last stage for a request, never the host (the host is the node with the most capacity,
then the higher id: with equal budgets it was the cheat about half the time, and the test then skipped in
every full run); before each request the test re-arms the split if the host moved the stage off the cheat."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from harness.mesh_nodes import MeshNode, MeshNodes, wait_until
from harness.reference import ready_plan
from harness.tamper import ESCAPED
from mesh402.labels import VERIFIED_LABEL
from tests.support.openai_checks import CITY_SCHEMA, MODEL
from tests.support.split_mesh import SPLIT_ARGS

pytestmark = pytest.mark.timeout(900)

HOST_ARGS = [*SPLIT_ARGS[:-1], "0.09"]
assert SPLIT_ARGS[-2] == "--max-vram"


class HostileSplit:
    """Host `a`, the cheating last stage `evil`, and an honest standby `honest` vouched for by the host."""

    def __init__(self, nodes: MeshNodes) -> None:
        self.nodes = nodes
        # The host is the node with the most capacity (then the higher id): `a` gets a little more, so the
        # election can never make the cheat the host, where its draws (a last stage's) would never run.
        # Still under the model's size: a split either way.
        self.a = nodes.start("a", no_model=False, extra=HOST_ARGS)
        self.token = self.a.token()
        self.evil = nodes.start("evil", join=self.token, no_model=False, extra=SPLIT_ARGS, wait=False,
                                env={"MESH402_TAMPER": "grammar_escape"},
                                launcher=[sys.executable, "-m", "tests.support.tamper_node"])
        self.evil.proc.wait_http(f"{self.evil.console}/api/status", timeout=120)
        self.honest: MeshNode | None = None
        self.standbys = 0

    def cheat_planned(self) -> bool:
        p = ready_plan(self.a)
        return p is not None and p["host"] == self.a.node_id and p["stages"][-1][0] == self.evil.node_id

    def arm(self) -> None:
        """The cheat on the last stage and an honest standby the host believes in. On a loaded machine the host
        may have moved the stage to the standby already (its plan is re-made when a stage looks gone): then
        the standby is killed, the host plans around it (the cheat is the only node left), and a new one joins."""
        if self.honest is not None and not self.cheat_planned():
            self.nodes.kill9(self.honest)
            self.honest = None
        wait_until(self.cheat_planned, timeout=240, what="a ready split whose last stage is the hostile node")
        if self.honest is None:
            # the honest standby joins once the hostile node holds the last stage
            self.standbys += 1
            honest = self.nodes.start(f"honest{self.standbys}", join=self.token, no_model=False, extra=SPLIT_ARGS,
                                      wait=False)
            honest.proc.wait_http(f"{honest.console}/api/status", timeout=120)
            # a standby only once everyone knows it and its serving side runs (seconds on a loaded machine)
            self.nodes.wait_full_mesh([self.a, self.evil, honest], timeout=60)
            wait_until(honest.distributed_up, 120, what="the standby's serving side")

            def vouched() -> bool:  # a counts a holder only once it proved it holds the tensors (in the background)
                labels = honest.peers()[self.a.node_id]["announcement"]["labels"]
                return any(k.startswith(VERIFIED_LABEL) and honest.node_id in v for k, v in labels.items())

            wait_until(vouched, 120, what="the host's vouch for the standby's copy of the model")
            self.honest = honest


@pytest.fixture(scope="module")
def hostile_split(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileSplit]:
    nodes = MeshNodes(tmp_path_factory.mktemp("hostile-grammar"))
    try:
        split = HostileSplit(nodes)
        split.arm()
        yield split
    finally:
        nodes.stop_all()


def test_grammar_escape_is_failed_over_and_the_answer_fits(hostile_split: HostileSplit) -> None:
    split = hostile_split
    a, evil = split.a, split.evil
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{a.api_port}/v1", api_key="x", max_retries=0, timeout=300)
    plans = []
    for attempt in range(3):
        split.arm()  # the cheat drawing for this request (re-armed if the host moved off it meanwhile)
        plans.append([st[0][:8] for st in ready_plan(a)["stages"]])
        r = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Tell me about Paris ({attempt})."}],
            temperature=0, max_tokens=120,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "strict": True,
                                                                    "schema": CITY_SCHEMA}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), CITY_SCHEMA)
        if ESCAPED in evil.proc.log():
            break
    else:
        raise AssertionError(f"the cheat never drew for a request although planned last each time: {plans}; "
                             f"standbys started {split.standbys}")
    # the cheat escaped the grammar: the host refused its token (bad_output), replaced the cheating last stage
    # under the running session and replayed the steps (its log says so), and the answer above fits the schema
    wait_until(lambda: f"stage(s) {evil.node_id[:12]} down" in a.proc.log() and "replayed" in a.proc.log(),
               timeout=30, what="the host's log of the failover off the cheating stage")
