"""Grammar/Matcher (llguidance) on the bundled vocabulary: masks, EOS only at the end, rollback, replay from spec."""

from __future__ import annotations

import json

import pytest
import torch

from mesh402.engine.grammar import GrammarCompiler, GrammarError
from mesh402.engine.sampling import Sampler, SamplingParams
from mesh402.engine.tokenizer import Tokenizer

torch.set_num_threads(1)

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok(smol_tokenizer: Tokenizer) -> Tokenizer:
    return smol_tokenizer


@pytest.fixture(scope="module")
def gc(smol_grammars: GrammarCompiler) -> GrammarCompiler:
    return smol_grammars


def ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special=False)


def test_schema_accepts_valid_and_refuses_invalid(gc: GrammarCompiler, tok: Tokenizer) -> None:
    g = gc.json_schema(SCHEMA)
    m = g.matcher(ids(tok, '{"city": "Paris", "unit": "c", "days": 3}'))
    assert m.can_end and m.finished
    bad = ids(tok, '{"city": "Paris", "unit": "k"')
    m2 = g.matcher()
    accepted = [m2.accept(t) for t in bad]
    first = accepted.index(False)
    assert "k" in tok.decode(bad[: first + 1])[-2:] and all(accepted[:first])
    assert m2.tokens == [t for t, ok in zip(bad, accepted) if ok]  # a refused token leaves the state unchanged
    with pytest.raises(GrammarError, match="not allowed"):
        g.matcher(bad)


def test_eos_only_when_complete(gc: GrammarCompiler, tok: Tokenizer) -> None:
    g = gc.json_object()
    m = g.matcher()
    eos = tok.eos_ids
    for t in ids(tok, '{"a": [1, 2]'):
        mask = m.allowed()
        assert not any(bool(mask[e]) for e in eos) and not m.can_end
        assert m.accept(t)
    assert m.accept(ids(tok, "}")[0])
    mask = m.allowed()
    assert m.can_end and all(bool(mask[e]) for e in eos)
    assert int(mask.sum()) == len(eos)  # a closed object: nothing but EOS
    assert m.accept(eos[0]) and m.finished and not m.is_allowed(eos[0])
    m.rollback(1)
    assert not m.finished or m.can_end
    assert torch.equal(m.allowed(), mask)


def test_mask_matches_is_allowed_and_bitmask(gc: GrammarCompiler, tok: Tokenizer) -> None:
    m = gc.json_schema(SCHEMA).matcher(ids(tok, '{"city": "Rome", "unit": '))
    mask = m.allowed()
    assert mask.dtype == torch.bool and mask.shape == (tok.vocab_size,)
    allowed = torch.nonzero(mask).reshape(-1).tolist()
    assert 0 < len(allowed) < 100  # only spellings of "c" / "f"
    for t in allowed[:20]:
        assert m.is_allowed(t)
    assert not m.is_allowed(ids(tok, "x")[0])
    words = m.bitmask()
    assert all((int(words[t // 32]) >> (t % 32)) & 1 for t in allowed)


def test_rollback_and_reconstruction_are_exact(gc: GrammarCompiler, tok: Tokenizer) -> None:
    g = gc.json_schema(SCHEMA)
    seq = ids(tok, '{"city": "Oslo", "unit": "f", "days": 7}')
    m = g.matcher()
    masks = []
    for t in seq:
        masks.append(m.allowed())
        assert m.accept(t)
    m.rollback(5)
    assert m.tokens == seq[:-5]
    assert torch.equal(m.allowed(), masks[-5])
    for k in range(len(seq)):  # rebuilt from (spec, tokens so far): the same mask at every position
        assert torch.equal(g.matcher(seq[:k]).allowed(), masks[k])
    with pytest.raises(ValueError):
        m.rollback(len(m.tokens) + 1)


def test_spec_round_trip_and_identity(gc: GrammarCompiler, tok: Tokenizer) -> None:
    g = gc.json_schema(SCHEMA)
    spec = json.loads(g.spec)
    assert spec["library"] == "llguidance" and spec["version"] and spec["kind"] == "json_schema"
    again = GrammarCompiler(tok).from_spec(g.spec)
    assert again.digest == g.digest and again.text == g.text
    assert gc.json_schema(json.loads(json.dumps(SCHEMA))) is g  # same spec: the compiled grammar is reused
    assert gc.json_schema({**SCHEMA, "required": ["city"]}).digest != g.digest
    tampered = json.dumps({**spec, "version": "0.0.1"})
    with pytest.raises(GrammarError, match="0.0.1"):
        gc.from_spec(tampered)
    with pytest.raises(GrammarError, match="vocabulary"):
        gc.from_spec(json.dumps({**spec, "vocab": "0" * 16}))
    with pytest.raises(GrammarError, match="malformed"):
        gc.from_spec("{}")


def test_strict_refuses_unsupported_keywords_lenient_ignores(gc: GrammarCompiler) -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    with pytest.raises(GrammarError):
        gc.json_schema(schema, strict=True)
    assert gc.json_schema(schema, strict=False).kind == "json_schema"
    with pytest.raises(GrammarError):
        gc.json_schema({"type": "no-such-type"})


def test_whitespace_is_bounded(gc: GrammarCompiler, tok: Tokenizer) -> None:
    m = gc.json_object().matcher(ids(tok, "{"))
    spaces = ids(tok, " " * 4)
    n = 0
    while n < 40 and all(m.is_allowed(t) for t in spaces):
        assert all(m.accept(t) for t in spaces)
        n += 1
    assert n <= 2  # at most 8 whitespace characters between tokens: no newline loops until max_tokens


def test_regex_and_lark(gc: GrammarCompiler, tok: Tokenizer) -> None:
    g = gc.regex(r"(yes|no)")
    assert g.matcher(ids(tok, "yes")).can_end
    assert not g.matcher().is_allowed(ids(tok, "maybe")[0])
    lark = gc.lark('start: "x" NUM\nNUM: /[0-9]+/')
    assert lark.matcher(ids(tok, "x12")).can_end
    with pytest.raises(GrammarError):
        gc.lark("start: undefined_rule")


def test_constrained_sampling_always_valid_and_deterministic(gc: GrammarCompiler, tok: Tokenizer) -> None:
    """Random logits, sampled under the mask: every run parses and fits; the same seed gives the same text."""
    small = {**SCHEMA, "properties": {**SCHEMA["properties"], "city": {"type": "string", "maxLength": 12}}}
    g = gc.json_schema(small)
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(64, tok.vocab_size, generator=gen) * 4

    def run(seed: int) -> list[int]:
        sampler, m, out = Sampler(SamplingParams(seed=seed, temperature=1.0)), g.matcher(), []
        for pos in range(200):
            t = sampler.sample(table[pos % 64], out, pos, allowed=m.allowed())
            if t in tok.eos_ids:
                assert m.can_end
                return out
            assert m.accept(t)
            out.append(t)
        raise AssertionError("no EOS in 200 tokens")

    for seed in range(3):
        out = run(seed)
        doc = json.loads(tok.decode(out))
        assert set(doc) == {"city", "unit", "days"} and doc["unit"] in ("c", "f") and 1 <= doc["days"] <= 7
        assert run(seed) == out


def test_response_format_mapping(gc: GrammarCompiler, tok: Tokenizer) -> None:
    assert gc.response_format(None) is None and gc.response_format({"type": "text"}) is None
    assert gc.response_format({"type": "json_object"}).kind == "json_object"
    chat = gc.response_format({"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}})
    responses = gc.response_format({"type": "json_schema", "name": "w", "schema": SCHEMA, "strict": True})
    assert chat is responses is gc.json_schema(SCHEMA)
    loose = {"type": "array", "uniqueItems": True}
    with pytest.raises(GrammarError):
        gc.response_format({"type": "json_schema", "json_schema": {"name": "u", "schema": loose, "strict": True}})
    assert gc.response_format({"type": "json_schema", "json_schema": {"name": "u", "schema": loose}}) is not None
    with pytest.raises(GrammarError, match="unsupported"):
        gc.response_format({"type": "yaml"})


def test_verification_redraws_under_the_rebuilt_mask(gc: GrammarCompiler, tok: Tokenizer) -> None:
    """A validator rebuilds the mask from (spec, generated tokens) and re-draws: honest tokens pass,
    the unconstrained favourite that the grammar forbids is a fault."""
    from mesh402.engine.replay import token_problem

    g = gc.json_schema(SCHEMA)
    prefix = ids(tok, '{"city": "Rome", "unit": ')
    logits = torch.randn(tok.vocab_size, generator=torch.Generator().manual_seed(1))
    free = int(logits.argmax())
    allowed = gc.from_spec(g.spec).matcher(prefix).allowed()
    assert not allowed[free]
    sampling = {"temperature": 0.8, "seed": 5, "logit_bias": [[free, 3.0]]}
    history = [7] * 10 + prefix  # prompt + generated
    drawn = Sampler(SamplingParams(**sampling)).sample(logits, history, len(history), allowed=g.matcher(prefix).allowed())
    assert token_problem(logits, drawn, sampling, history, allowed) == ""
    assert "mask" in token_problem(logits, free, sampling, history, allowed)
    assert token_problem(logits, free, {"temperature": 0}, history) == ""  # unconstrained: the argmax is fine
