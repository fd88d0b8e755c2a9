"""Speculative decoding is lossless: with prompt-lookup drafts verified in one batched step, every request's
tokens equal plain decoding's, greedy and seeded sampling, exact and fast, alone and beside other requests
(drafts of several sessions in one step) — and drafts are really accepted (the test is not vacuous)."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from mesh402.engine import Engine
from mesh402.engine.sampling import SamplingParams
from mesh402.serving.generation import Finished, GenerationRequest, LocalModel, generate
from mesh402.serving.speculative import DraftPolicy, best_draft_len, ngram_draft
from tests.support.engine import smollm2_gguf

PROMPTS = ["Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
           "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
           "Hello"]


def test_ngram_draft():
    assert ngram_draft([1, 2, 3, 9, 1, 2, 3], 3) == [9, 1, 2]
    assert ngram_draft([5, 6, 7, 5, 6, 8, 5, 6], 2) == [8, 5]  # the latest earlier occurrence
    assert ngram_draft([1, 2, 3], 4) == []
    assert ngram_draft([4, 4], 3) == [4]
    assert ngram_draft([1], 3) == [] and ngram_draft([1, 1, 1], 0) == []


def test_best_draft_len_drafts_only_what_pays():
    assert best_draft_len(0.0, 0.3, 4) == 0  # nothing accepted: plain decoding
    assert best_draft_len(1.0, 0.3, 4) == 4  # everything accepted: as many as allowed
    assert best_draft_len(0.5, 0.0, 4) == 4  # free rows: any acceptance pays
    assert best_draft_len(0.42, 0.3, 4) == 1  # benchmarks/batching.py's acceptance on 2 CPU cores
    assert best_draft_len(0.2, 0.3, 4) == 0
    assert best_draft_len(0.9, 0.1, 8) == 8 and best_draft_len(0.9, 1.0, 8) == 0
    assert best_draft_len(0.9, 0.3, 0) == 0


def test_draft_policy_follows_the_acceptance_it_sees():
    p = DraftPolicy(k_max=4, row_cost=0.3)
    assert p.k() > 0  # the prior tries drafting
    for _ in range(6):
        p.observe(p.k() or 1, 0)  # every draft refused
    assert p.k() == 0 and p.acceptance < 0.2
    for _ in range(12):
        p.observe(1, 1)  # shadow drafts that would have been accepted
    assert p.k() >= 3
    before = (p.hits, p.misses)
    p.observe(0, 0)
    p.observe(2, 3)  # impossible counts change nothing
    assert (p.hits, p.misses) == before


def test_draft_policy_proposes_what_pays_and_learns_from_shadows():
    history = [1, 2, 3, 9, 1, 2, 3]
    free = DraftPolicy(k_max=3, row_cost=0.0)
    assert free.propose(history, room=8) == [9, 1, 2] and free.shadow is None
    assert free.propose(history, room=1) == [9]  # no more than fit
    costly = DraftPolicy(k_max=3, row_cost=10.0)
    assert costly.propose(history, room=8) == [] and costly.shadow == 9
    before = costly.hits
    costly.settle(0, 0, 9)  # the shadow draft would have been accepted
    assert costly.hits > before * costly.decay and costly.shadow is None
    costly.propose(history, room=8)
    misses = costly.misses
    costly.settle(0, 0, 4)  # ... and now it would not
    assert costly.misses > misses * costly.decay


def test_draft_policy_prices_rows_by_the_step_times_it_sees():
    p = DraftPolicy(k_max=4, row_cost=0.3)
    p.timed(3, 0.030)  # no 1-row time yet: a multi-row time says nothing
    assert p.row_cost == 0.3 and p.one_row_s is None
    p.timed(1, 0.010)
    assert p.one_row_s == pytest.approx(0.010)
    for _ in range(40):  # a split: 10 ms a step, of which the network is most; 5 rows cost 12 ms
        p.timed(1, 0.010)
        p.timed(5, 0.012)
    assert p.row_cost == pytest.approx(0.05, abs=0.005)  # (12/10 - 1) / 4 extra rows
    cheap = p.k()
    for _ in range(40):  # the same steps on a busy stage: 5 rows cost 50 ms
        p.timed(1, 0.010)
        p.timed(5, 0.050)
    assert p.row_cost == pytest.approx(1.0, abs=0.01)
    assert p.k() < cheap
    for _ in range(60):
        p.timed(5, 1.0)  # a stalled step is capped (4 one-row steps a row), a faster-than-1-row step floored at 0
    assert p.row_cost == pytest.approx(4.0, abs=0.01)
    for _ in range(60):
        p.timed(5, 0.001)
    assert p.row_cost == pytest.approx(0.0, abs=0.01)
    before = (p.row_cost, p.one_row_s)
    p.timed(0, 0.01)
    p.timed(1, 0.0)
    p.timed(2, float("nan"))  # nonsense changes nothing
    assert (p.row_cost, p.one_row_s) == before


async def _run(lm: LocalModel, ids: list[int], params: SamplingParams, n: int) -> tuple[list[int], int]:
    out, st = await _run_stepper(lm, ids, params, n)
    return out, st.accepted


async def _run_stepper(lm: LocalModel, ids: list[int], params: SamplingParams, n: int):
    st = await lm.open(len(ids) + n + 1, params)
    out: list[int] = []
    async for ev in generate(GenerationRequest(ids, n, params), st, lm.tokenizer, lm.eos_ids):
        if not isinstance(ev, Finished) and ev.token_id is not None:
            out.append(ev.token_id)
    return out, st


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("max_batch", [1, 8])
def test_speculative_equals_plain(mode, max_batch):
    n = 10 if mode == "exact" else 24
    eng = Engine.load(smollm2_gguf(), mode=mode)
    ids = [eng.tokenizer.encode(p) for p in PROMPTS]
    params = [SamplingParams(temperature=0, seed=0) if i % 2 == 0 else SamplingParams(temperature=0.7, seed=i)
              for i in range(len(PROMPTS))]
    ex = ThreadPoolExecutor(max_workers=1)

    async def main():
        plain = LocalModel(eng, ex, prefix_cache=None, max_batch=1)
        ref = [(await _run(plain, i, p, n))[0] for i, p in zip(ids, params)]
        spec = LocalModel(eng, ex, prefix_cache=None, max_batch=max_batch, speculative_k=4)
        got = await asyncio.gather(*(_run(spec, i, p, n) for i, p in zip(ids, params)))
        return ref, got

    ref, got = asyncio.run(main())
    assert [g[0] for g in got] == ref
    assert sum(g[1] for g in got) > 0, "no draft was ever accepted"


def test_drafts_that_do_not_pay_are_not_verified():
    """A verify row costing ten 1-row steps never pays: no draft is verified, the shadow drafts still teach the
    policy, and the output is plain decoding's. Free rows: every n-gram draft is verified."""
    eng = Engine.load(smollm2_gguf(), mode="fast")
    ids = eng.tokenizer.encode(PROMPTS[0])
    params = SamplingParams(temperature=0, seed=0)
    ex = ThreadPoolExecutor(max_workers=1)

    async def main():
        plain, _ = await _run_stepper(LocalModel(eng, ex, prefix_cache=None, max_batch=1), ids, params, 16)
        costly = await _run_stepper(LocalModel(eng, ex, prefix_cache=None, speculative_k=4, draft_row_cost=10),
                                    ids, params, 16)
        free = await _run_stepper(LocalModel(eng, ex, prefix_cache=None, speculative_k=4, draft_row_cost=0),
                                  ids, params, 16)
        return plain, costly, free

    plain, (out_c, st_c), (out_f, st_f) = asyncio.run(main())
    assert out_c == plain and out_f == plain
    assert st_c.drafted == 0 and st_c.drafts.hits + st_c.drafts.misses != 3.0  # shadows were observed
    assert st_f.drafted > 0 and st_f.accepted > 0


def test_speculative_under_a_grammar_equals_plain(smol_grammars):
    """Drafts under a JSON schema: every position is drawn under the grammar's mask as plain decoding draws it,
    the step ends at the draw that ends the grammar, and the answer (a list of objects repeating their keys, so
    n-gram drafts are often right) equals plain decoding's, drafts accepted."""
    from mesh402.serving.generation import Constraints

    schema = {"type": "array", "minItems": 4, "maxItems": 4, "items": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "country": {"type": "string", "maxLength": 12}},
        "required": ["city", "country"], "additionalProperties": False}}
    eng = Engine.load(smollm2_gguf(), mode="fast")
    ids = eng.tokenizer.encode("<|im_start|>user\nName four cities and their countries as JSON.<|im_end|>\n"
                               "<|im_start|>assistant\n")
    ex = ThreadPoolExecutor(max_workers=1)

    async def one(k: int, params: SamplingParams) -> tuple[list[int], int]:
        lm = LocalModel(eng, ex, prefix_cache=None, max_batch=4, speculative_k=k)
        c = Constraints(smol_grammars.json_schema(schema), None)
        st = await lm.open(len(ids) + 121, params, c)
        out: list[int] = []
        async for ev in generate(GenerationRequest(ids, 120, params, constraints=c), st, lm.tokenizer, lm.eos_ids):
            if not isinstance(ev, Finished) and ev.token_id is not None:
                out.append(ev.token_id)
        return out, st.accepted

    async def main():
        res = []
        for params in (SamplingParams(temperature=0, seed=0), SamplingParams(temperature=0.8, seed=7)):
            plain, _ = await one(0, params)
            spec, accepted = await one(4, params)
            res.append((plain, spec, accepted))
        return res

    for plain, spec, accepted in asyncio.run(main()):
        assert spec == plain
        assert accepted > 0
    assert eng.tokenizer.decode(plain).lstrip().startswith("[")
