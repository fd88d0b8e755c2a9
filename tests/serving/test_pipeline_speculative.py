"""Speculative decoding through a split: the token and its prompt-lookup drafts ride one step through every
stage as adjacent rows (each computed as its 1-row decode), the last stage draws each position as plain
decoding would and accepts drafts while its draws equal them, and every stage keeps only the rows up to the
first refusal. So a session's tokens equal plain decoding's (greedy and sampled, exact and fast), every
stage's signed receipt of it equals the one plain decoding gets (the kept rows are recorded as the very 1-row
steps plain decoding records), a stage killed mid-answer is replayed from those steps, and a last stage that
claims a draft it did not draw is failed over."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mesh402.engine.sampling import SamplingParams
from mesh402.serving.generation import GenerationRequest, generate
from mesh402.serving.pipeline import PipelineModel
from mesh402.serving.stage_worker import StageWorker
from tests.support.pipeline import build

N = 24
TEXTS = [  # text the model repeats (so n-gram drafts are often right), and text it does not
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
    "Once upon a time", "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
]
PROMPTS: list[list[int]] = []
SAMPLINGS = [SamplingParams(temperature=0, seed=1), SamplingParams(temperature=0.8, seed=5),
             SamplingParams(temperature=0.7, top_p=0.9, seed=3)]


def _untimed(stepper: Any) -> None:
    """Keep the device's default draft row cost throughout: timed steps would follow wall-clock step times, and
    on a loaded machine (1-row steps run on the stages' loop thread here, draft steps on the engine thread) they
    can price drafts out before one is accepted; these tests are about the tokens, which no draft length
    changes (one such run: accepted 0)."""
    if stepper.drafts is not None:
        stepper.drafts.timed = lambda rows, seconds: None


async def _gen(model: PipelineModel, i: int, kill=None) -> tuple[list[int], Any]:
    req = GenerationRequest(PROMPTS[i], N, SAMPLINGS[i])
    stepper = await model.open(len(PROMPTS[i]) + N, SAMPLINGS[i], request_id=f"session-{i}")
    _untimed(stepper)
    out: list[int] = []
    async for ev in generate(req, stepper, model.tokenizer, []):
        if getattr(ev, "token_id", None) is not None:
            out.append(ev.token_id)
            if kill is not None and len(out) == 9:
                kill()
    return out, stepper


async def _run(executor: Any, splits: list[int], mode: str, draft_tokens: int, *, kill: str | None = None,
               standbys: tuple[str, ...] = (), together: bool = False
               ) -> tuple[list[list[int]], dict[str, list[tuple]], list[Any]]:
    model, mesh, _ = await build(executor, splits, list(standbys), mode=mode)
    if not PROMPTS:
        PROMPTS.extend(model.tokenizer.encode(t) for t in TEXTS)
    model.prefix = None
    model.speculative_k = draft_tokens
    receipts: dict[str, list[tuple]] = {}

    def sink(rs: list[Any], evidence: Any = None) -> None:
        receipts[rs[0].request_id] = [(r.stage, r.layer_start, r.layer_end, r.tokens, r.input_hash, r.output_hash)
                                      for r in rs]
    model.receipt_sink = sink
    tokens, steppers = [], []
    if together:  # all sessions at once: draft steps beside other sessions' batched rows on every stage
        done = await asyncio.gather(*(_gen(model, i) for i in range(len(PROMPTS))))
        tokens, steppers = [d[0] for d in done], [d[1] for d in done]
    for i in range(0 if together else len(PROMPTS)):
        out, st = await _gen(model, i, (lambda: mesh.kill(kill)) if kill and i == 0 else None)
        tokens.append(out)
        steppers.append(st)
    for _ in range(200):
        if len(receipts) == len(PROMPTS):
            break
        await asyncio.sleep(0.02)
    return tokens, receipts, steppers


@pytest.mark.parametrize("mode,splits", [("exact", [0, 10, 20, 30]), ("fast", [0, 15, 30])],
                         ids=["exact-3-stage", "fast-2-stage"])
def test_drafts_through_a_split_equal_plain_decoding_and_its_receipts(executor, mode, splits) -> None:
    async def main() -> None:
        plain, plain_receipts, _ = await _run(executor, splits, mode, 0)
        got, got_receipts, steppers = await _run(executor, splits, mode, 4)
        assert got == plain, "speculative decoding through the split changed a session's tokens"
        assert sum(s.accepted for s in steppers) > 0, "no draft was ever accepted: the test proves nothing"
        assert len(plain_receipts) == len(PROMPTS)
        assert got_receipts == plain_receipts, "a stage's receipt differs from plain decoding's"
    asyncio.run(main())


def test_concurrent_sessions_drafting_on_a_split_equal_plain_decoding(executor) -> None:
    async def main() -> None:
        plain, plain_receipts, _ = await _run(executor, [0, 15, 30], "fast", 0)
        got, got_receipts, steppers = await _run(executor, [0, 15, 30], "fast", 4, together=True)
        assert got == plain and got_receipts == plain_receipts
        assert sum(s.accepted for s in steppers) > 0
    asyncio.run(main())


def test_a_stage_killed_mid_draft_answer_is_replayed(executor) -> None:
    async def main() -> None:
        plain, _, _ = await _run(executor, [0, 10, 20, 30], "fast", 0)
        got, _, steppers = await _run(executor, [0, 10, 20, 30], "fast", 4, kill="w1", standbys=("standby",))
        assert got == plain
        assert steppers[0].accepted > 0 and steppers[0].model.stats.failovers == 1
    asyncio.run(main())


def test_a_last_stage_claiming_a_draft_it_did_not_draw_is_failed_over(executor, monkeypatch) -> None:
    """The lying stage answers every draft step with two tokens, the first not the draft it claims to have
    accepted (or more tokens than rows); the host refuses the answer (bad_output), replaces the stage and
    gets plain decoding's tokens from the honest one. (A consistent lie, drafts "accepted" that were not
    drawn, is a wrong token like any other a last stage could return: the spot checks of its logits
    fingerprints find it, on the same 1-row records as plain decoding's.)"""
    real = StageWorker._draft_step
    liar: list[Any] = []

    async def lying(self, up, down, engine, session, draw, rid, next_node, tally, sf, x, history, fp_ids):
        if down is not None or self is not liar[0]:
            return await real(self, up, down, engine, session, draw, rid, next_node, tally, sf, x, history, fp_ids)
        from mesh402.serving.stage_link import K, stage_frame

        reply = stage_frame(K.STAGE_KIND_RESULT, request_id=rid, plan_epoch=sf.plan_epoch, position=sf.position)
        rows = [int(t) for t in sf.tokens]
        lie = [rows[1] + 1, rows[0]] if self.stats.steps % 2 else rows + [rows[0]]  # a refused draft "kept"; too many
        self.stats.steps += 1
        reply.stage.tokens.extend(lie)
        await up.send(reply)

    async def main() -> None:
        plain, _, _ = await _run(executor, [0, 15, 30], "fast", 0)
        model, mesh, _ = await build(executor, [0, 15, 30], ["standby"], mode="fast")
        model.prefix = None  # PROMPTS: tokenized by the plain run above
        model.speculative_k = 4
        liar.append(mesh.workers["w0"])
        monkeypatch.setattr(StageWorker, "_draft_step", lying)
        out, st = await _gen(model, 0)
        assert out == plain[0]
        assert model.stats.failovers >= 1 and model.chain.hops[-1].node == mesh.node("standby")
    asyncio.run(main())


async def _constrained(executor: Any, k: int, text: str, constraints: Any, params: SamplingParams, n: int,
                       stop_at_eos: bool) -> tuple[list[tuple[int, list[Any]]], int]:
    """One session on a fresh fast 2-stage split with `k` drafts at most: (token, logprobs) per Delta, and the
    drafts accepted."""
    model, _, _ = await build(executor, [0, 15, 30], mode="fast")
    model.prefix = None
    model.speculative_k = k
    ids = model.tokenizer.encode(text)
    c = constraints(model) if callable(constraints) else constraints
    st = await model.open(len(ids) + n + 1, params, constraints=c)
    _untimed(st)
    out = [(ev.token_id, list(ev.logprobs)) async for ev in generate(GenerationRequest(ids, n, params, constraints=c),
                                                                      st, model.tokenizer,
                                                                      model.eos_ids if stop_at_eos else [])
           if getattr(ev, "token_id", None) is not None]
    st.release()
    return out, st.accepted


def test_drafts_under_a_grammar_through_a_split_equal_plain_decoding(executor) -> None:
    """A JSON-schema session on a split: the last stage's grammar follows the fed tokens row by row, each
    position is drawn under its mask, the step ends at the draw that ends the grammar; the host's matcher takes
    every drawn token in order. Tokens equal plain decoding's, drafts accepted."""
    from mesh402.serving.generation import Constraints

    schema = {"type": "array", "minItems": 4, "maxItems": 4, "items": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "country": {"type": "string", "maxLength": 12}},
        "required": ["city", "country"], "additionalProperties": False}}
    text = "<|im_start|>user\nName four cities and their countries as JSON.<|im_end|>\n<|im_start|>assistant\n"

    def json_schema(model: PipelineModel) -> Constraints:
        return Constraints(model.engine0.grammar_compiler().json_schema(schema), None)

    async def main() -> None:
        params = SamplingParams(temperature=0, seed=0)
        plain, _ = await _constrained(executor, 0, text, json_schema, params, 120, True)
        got, accepted = await _constrained(executor, 4, text, json_schema, params, 120, True)
        assert got == plain and accepted > 0
    asyncio.run(main())


def test_drafts_with_logprobs_through_a_split_equal_plain_decoding(executor) -> None:
    """Logprobs asked: the last stage returns each kept row's logprobs with the tokens; the host checks each is
    of its token and hands them out in order. Tokens and logprobs equal plain decoding's (sampled)."""
    from mesh402.serving.generation import Constraints

    async def main() -> None:
        params = SamplingParams(temperature=0.7, seed=3)
        plain, _ = await _constrained(executor, 0, TEXTS[0], Constraints(None, 2), params, 24, False)
        got, accepted = await _constrained(executor, 4, TEXTS[0], Constraints(None, 2), params, 24, False)
        assert got == plain and all(lp for _, lp in plain)
        assert accepted > 0
    asyncio.run(main())
