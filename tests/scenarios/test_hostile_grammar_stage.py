"""A hostile last stage in a real node process (tests.support.tamper_node, cheat `grammar_escape`): it draws
every token unconstrained whatever the grant's grammar says. The host's own matcher refuses its first
token (bad_output), the step fails over to an honest standby, and the client still gets JSON that fits
the schema."""

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


@pytest.fixture(scope="module")
def hostile_split(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MeshNode, MeshNode, MeshNode]]:
    nodes = MeshNodes(tmp_path_factory.mktemp("hostile-grammar"))
    try:
        a = nodes.start("a", no_model=False, extra=SPLIT_ARGS)
        token = a.token()
        evil = nodes.start("evil", join=token, no_model=False, extra=SPLIT_ARGS, wait=False,
                           env={"MESH402_TAMPER": "grammar_escape"},
                           launcher=[sys.executable, "-m", "tests.support.tamper_node"])
        evil.proc.wait_http(f"{evil.console}/api/status", timeout=120)
        wait_until(lambda: (p := ready_plan(a)) is not None and evil.node_id in {s[0] for s in p["stages"]},
                   timeout=240, what="a ready split whose last stage is the hostile node")
        # the honest standby joins once the hostile node holds the last stage
        honest = nodes.start("honest", join=token, no_model=False, extra=SPLIT_ARGS, wait=False)
        honest.proc.wait_http(f"{honest.console}/api/status", timeout=120)
        # a standby only once everyone knows it and its serving side runs (seconds on a loaded machine)
        nodes.wait_full_mesh([a, evil, honest], timeout=60)
        wait_until(honest.distributed_up, 120, what="the standby's serving side")

        def vouched() -> bool:  # a counts a holder only once it proved it holds the tensors (in the background)
            labels = honest.peers()[a.node_id]["announcement"]["labels"]
            return any(k.startswith(VERIFIED_LABEL) and honest.node_id in v for k, v in labels.items())

        wait_until(vouched, 120, what="the host's vouch for the standby's copy of the model")
        yield a, evil, honest
    finally:
        nodes.stop_all()


def test_grammar_escape_is_failed_over_and_the_answer_fits(hostile_split) -> None:
    a, evil, honest = hostile_split
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{a.api_port}/v1", api_key="x", max_retries=0, timeout=300)
    # the fixture put the cheat on the last stage, but on a loaded machine the host may re-plan onto the vouched
    # standby first: a request the cheat never drew for proves nothing, so ask again (each answer is checked)
    for attempt in range(3):
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
        # why the cheat drew nothing (which plan changes the host logged), for whoever reads the skip
        why = [ln for ln in a.proc.log().splitlines() if "hosting" in ln or " down" in ln or "plan epoch" in ln]
        pytest.skip("the host never planned the cheat for a request: no escape to fail over (loaded machine); "
                    f"the host's plan log: {' / '.join(why[-4:])[-600:]}")
    # the cheat escaped the grammar: the host refused its token (bad_output), replaced the cheating last stage
    # under the running session and replayed the steps (its log says so), and the answer above fits the schema
    wait_until(lambda: f"stage(s) {evil.node_id[:12]} down" in a.proc.log() and "replayed" in a.proc.log(),
               timeout=30, what="the host's log of the failover off the cheating stage")
