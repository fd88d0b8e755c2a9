"""Constrained decoding through a pipeline split, in one process over in-memory links: the last stage draws
under the grammar the host compiled (rebuilt from the signed grant's spec), its logprobs are the solo
model's, a stage killed mid-answer is replaced and the grammar state replays, and a hostile last stage that
draws outside the grammar is caught by the host's own matcher and failed over (bad_output)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from mesh402.engine import Engine
from mesh402.engine.sampling import SamplingParams
from mesh402.serving.generation import (
    Constraints,
    Delta,
    Finished,
    GenerationRequest,
    LocalModel,
    generate,
)
from mesh402.serving.pipeline import PipelineModel
from mesh402.serving.stage_link import StageError
from harness.tamper import escape_grammar
from tests.support.pipeline import build

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                           "country": {"type": "string", "maxLength": 20}},
          "required": ["city", "country"], "additionalProperties": False}
N = 40
TOP = 3


@pytest.fixture(scope="module")
def prompt(solo: Engine) -> list[int]:
    text = solo.chat_template.render([{"role": "user", "content": "What is the capital of France?"}])
    return solo.tokenizer.encode(text, add_special=False)


@pytest.fixture(scope="module")
def constraints(solo: Engine) -> Constraints:
    return Constraints(solo.grammar_compiler().json_schema(SCHEMA), TOP)


async def run(model: Any, prompt: list[int], constraints: Constraints, kill_after: int | None = None,
              on_kill: Any = None) -> tuple[list[int], list[Any], str, str]:
    """(tokens, their logprobs, the text, finish reason) of a greedy constrained answer."""
    sampling = SamplingParams(temperature=0, seed=1)
    req = GenerationRequest(prompt, N, sampling, constraints=constraints)
    stepper = await model.open(len(prompt) + N, sampling, constraints=constraints)
    tokens: list[int] = []
    lps: list[Any] = []
    text, reason = "", ""
    async for ev in generate(req, stepper, model.tokenizer, model.eos_ids):
        if isinstance(ev, Delta):
            text += ev.text
            lps += ev.logprobs
            if ev.token_id is not None:
                tokens.append(ev.token_id)
                if kill_after is not None and len(tokens) == kill_after:
                    on_kill()
        elif isinstance(ev, Finished):
            reason = ev.reason
    return tokens, lps, text, reason


@pytest.fixture(scope="module")
def solo_answer(solo: Engine, executor, prompt, constraints) -> tuple[list[int], list[Any], str, str]:
    return asyncio.run(run(LocalModel(solo, executor), prompt, constraints))


def test_solo_answer_fits_the_schema(solo_answer) -> None:
    _, lps, text, reason = solo_answer
    assert reason == "stop"
    value = json.loads(text)
    assert set(value) == {"city", "country"}
    assert lps and all(lp.logprob <= 0 and len(lp.top) == TOP for lp in lps)


def test_split_draws_the_same_constrained_tokens_and_logprobs(executor, prompt, constraints, solo_answer) -> None:
    async def main() -> tuple[list[int], list[Any], str, str]:
        model, _, _ = await build(executor, [0, 15, 30])
        return await run(model, prompt, constraints)

    tokens, lps, text, reason = asyncio.run(main())
    assert (tokens, text, reason) == (solo_answer[0], solo_answer[2], solo_answer[3])
    assert [lp.token for lp in lps] == [lp.token for lp in solo_answer[1]]
    assert [round(lp.logprob, 4) for lp in lps] == [round(lp.logprob, 4) for lp in solo_answer[1]]


def test_stage_killed_mid_answer_replays_the_grammar(executor, prompt, constraints, solo_answer) -> None:
    async def main() -> tuple[tuple[list[int], list[Any], str, str], PipelineModel]:
        model, mesh, _ = await build(executor, [0, 15, 30], standbys=["standby"])
        out = await run(model, prompt, constraints, kill_after=5, on_kill=lambda: mesh.kill("w0"))
        return out, model

    (tokens, _, text, reason), model = asyncio.run(main())
    assert model.stats.failovers == 1
    assert (tokens, text, reason) == (solo_answer[0], solo_answer[2], solo_answer[3])


def test_hostile_last_stage_escaping_the_grammar_is_failed_over(executor, prompt, constraints, solo_answer) -> None:
    async def main() -> tuple[tuple[list[int], list[Any], str, str], PipelineModel]:
        model, mesh, _ = await build(executor, [0, 15, 30], standbys=["standby"])
        escape_grammar(mesh.workers["w0"])  # a hostile last stage: it draws unconstrained
        out = await run(model, prompt, constraints)
        return out, model

    (tokens, _, text, reason), model = asyncio.run(main())
    assert model.stats.failovers == 1  # the host's matcher refused the hostile stage's first token
    assert (tokens, text, reason) == (solo_answer[0], solo_answer[2], solo_answer[3])


def test_hostile_last_stage_without_replacement_is_an_error(executor, prompt, constraints) -> None:
    async def main() -> None:
        model, mesh, _ = await build(executor, [0, 15, 30])
        escape_grammar(mesh.workers["w0"])  # a hostile last stage: it draws unconstrained
        await run(model, prompt, constraints)

    with pytest.raises(StageError):
        asyncio.run(main())
