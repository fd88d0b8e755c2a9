"""Batched decode changes no answer: a session's logits in a batched step are bit-identical to its 1-row decode
alone, whatever other sessions share the step (different prompts, lengths, join and leave times), in exact and
fast mode, whole model and split into stages in one process, and for tiny models with q/k norms and biases.
"accel" is fast mode on the accelerator path (engine.accel): a GPU where MESH402_TEST_DEVICE names one (the
device script), else its CPU twin."""
from __future__ import annotations

import gguf
import pytest
import torch

from mesh402.engine import Engine
from tests.support.dense_models import _hf_model, _write_gguf
from tests.support.engine import load_engine, smollm2_gguf

PROMPTS = [[1, 2, 3, 4, 5], list(range(10, 50)), [7, 8], list(range(100, 133)), [42] * 20, list(range(300, 364))]
STEPS = 3


def _solo(eng: Engine, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Greedy decode alone, one row per step: the logits of each decode step."""
    with eng.new_session(160) as s:
        tok = int(s.prefill(prompt).argmax())
        out = []
        for _ in range(steps):
            lg = s.decode(tok)
            out.append(lg.clone())
            tok = int(lg.argmax())
    return out


def _batched(eng: Engine, prompts: list[list[int]], steps: int, join: list[int]) -> list[list[torch.Tensor]]:
    """Every session decodes `steps` tokens; session i joins the running batch at step join[i] (so batch
    widths and each row's slot change from step to step)."""
    sessions = [eng.new_session(160) for _ in prompts]
    toks: list[int | None] = [None] * len(prompts)
    out: list[list[torch.Tensor]] = [[] for _ in prompts]
    step = 0
    while any(len(o) < steps for o in out):
        for i, p in enumerate(prompts):
            if join[i] == step:
                toks[i] = int(sessions[i].prefill(p).argmax())
        live = [i for i in range(len(prompts)) if toks[i] is not None and len(out[i]) < steps]
        lg = eng.decode_batch([sessions[i] for i in live], [toks[i] for i in live])
        for r, i in enumerate(live):
            out[i].append(lg[r].clone())
            toks[i] = int(lg[r].argmax())
        step += 1
    for s in sessions:
        s.close()
    return out


def _check(eng: Engine, prompts: list[list[int]], steps: int = STEPS) -> None:
    ref = [_solo(eng, p, steps) for p in prompts]
    join = [0, 0, 1, 0, 2, 1][:len(prompts)]
    got = _batched(eng, prompts, steps, join)
    for i in range(len(prompts)):
        for k in range(steps):
            assert torch.equal(got[i][k], ref[i][k]), f"session {i} step {k}: batched logits differ from solo"


@pytest.mark.parametrize("mode", ["exact", "fast", "accel"])
@pytest.mark.parametrize("splits", [None, [0, 13, 30]])
def test_batched_decode_equals_solo(mode, splits, monkeypatch):
    eng = load_engine(smollm2_gguf(), mode, monkeypatch, splits=splits, load_tokenizer=False)
    if mode == "accel":  # the CPU twin dequantizes every weight each step (~0.5 s): fewer, shorter sessions
        _check(eng, [PROMPTS[0], PROMPTS[2], PROMPTS[3]], steps=2)
        return
    _check(eng, PROMPTS if mode == "fast" else PROMPTS[:4])


def test_fast_kernels_probed_row_independent():
    """The probe that lets fast mode run its packed kernels once for all rows holds here (if a CPU's kernels
    were not row-independent, the rows would be multiplied one by one and the test above still holds)."""
    eng = Engine.load(smollm2_gguf(), mode="fast", load_tokenizer=False)
    assert eng.rows_batched(8)
    assert not Engine.load(smollm2_gguf(), mode="exact", load_tokenizer=False).rows_batched(8)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])  # q/k/v biases; per-head q/k norms
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_batched_decode_tiny_archs(tmp_path, arch, mode):
    p = tmp_path / f"{arch}.gguf"
    _write_gguf(_hf_model(arch), arch, p, gguf.GGMLQuantizationType.Q8_0)
    eng = Engine.load(p, mode=mode, load_tokenizer=False)
    _check(eng, [[1, 2, 3], list(range(5, 45)), [9] * 7])


def test_decode_batch_rejects_bad_input():
    eng = Engine.load(smollm2_gguf(), mode="fast", load_tokenizer=False)
    with eng.new_session(16) as a, eng.new_session(16) as b:
        a.prefill([1, 2])
        b.prefill([3])
        with pytest.raises(ValueError):
            eng.decode_batch([a, b, a], [1, 2, 3])  # a session's rows must be adjacent
        with pytest.raises(ValueError):
            eng.decode_batch([a, b], [1, 10 ** 9])
        with pytest.raises(ValueError):
            eng.decode_batch([a, b], [1])


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_adjacent_rows_of_one_session_equal_successive_decodes(mode):
    """Speculative verification: a session's k rows in one step (beside another session's row) give the logits
    of k successive 1-row decodes; after a rollback (truncate) decoding continues as if never drafted."""
    eng = Engine.load(smollm2_gguf(), mode=mode, load_tokenizer=False)
    prompt, drafts = list(range(20, 45)), [11, 12, 13, 14]
    with eng.new_session(64) as s:
        s.prefill(prompt)
        ref = [s.decode(t).clone() for t in drafts]
    with eng.new_session(64) as s:  # plain decoding of drafts[:2], then 99
        s.prefill(prompt)
        s.decode(drafts[0])
        s.decode(drafts[1])
        after = s.decode(99).clone()
    with eng.new_session(64) as s, eng.new_session(64) as other:
        s.prefill(prompt)
        other.prefill([5, 6, 7])
        lg = eng.decode_batch([other, s, s, s, s], [8, *drafts])
        for k in range(4):
            assert torch.equal(lg[1 + k], ref[k])
        s.truncate(len(prompt) + 2)  # drafts 3 and 4 rejected
        assert torch.equal(s.decode(99), after)
        with pytest.raises(ValueError):
            eng.decode_batch([s, other, s], [1, 2, 3])



@pytest.mark.parametrize("mode", ["exact", "fast", "accel"])
def test_stage_forward_batch_equals_each_row_alone_and_isolates_a_bad_row(mode, monkeypatch):
    """A pipeline stage's batched forward (layers [10, 20) of 30: hidden rows in, hidden rows out) gives every
    session the bits its 1-row forward gives alone; a malformed row (wrong width, as a hostile upstream could
    send) in the same batch fails only its own session."""
    first = load_engine(smollm2_gguf(), mode, monkeypatch, layers=(0, 10), load_tokenizer=False)
    mid = load_engine(smollm2_gguf(), mode, monkeypatch, layers=(10, 20), load_tokenizer=False)
    rows = [_rows_of(first, p + [99]) for p in ([1, 2, 3, 4, 5], [7, 8], [42] * 6)]  # a prompt, then a decode row
    ref = []
    for r in rows:  # each session alone: one row at a time
        with mid.new_session(128) as s:
            for i, x in enumerate(r):
                out = s.forward(x, i, 1)
            ref.append(out.clone())
    sessions = []
    for r in rows:
        s = mid.new_session(128)
        for i, x in enumerate(r[:-1]):
            s.forward(x, i, 1)
        sessions.append(s)
    bad = mid.new_session(128)
    outs = mid.forward_batch([sessions[0], bad, sessions[1], sessions[2]],
                             [rows[0][-1], torch.zeros(1, 7), rows[1][-1], rows[2][-1]])
    assert isinstance(outs[1], Exception)
    for k, o in zip((0, 1, 2), (outs[0], outs[2], outs[3])):
        assert torch.equal(o, ref[k]), f"session {k}: batched stage rows differ from its forward alone"
    assert [len(s) for s in sessions] == [len(r) for r in rows]
    for s in [*sessions, bad]:
        s.close()


def _rows_of(first: Engine, prompt: list[int]) -> list[torch.Tensor]:
    """The first stage's hidden row for each token (1-row forwards, as decode steps would send them)."""
    with first.new_session(128) as s:
        return [s.forward(torch.tensor([t]), i, 1).clone() for i, t in enumerate(prompt)]


@pytest.mark.parametrize("mode", ["exact", "fast", "accel"])
def test_a_stage_runs_a_sessions_draft_rows_as_successive_forwards(mode, monkeypatch):
    """Speculative verification on a split: every stage (first: token ids, middle: hidden rows, last: logits)
    runs a session's next n rows in one call with the bits n successive 1-row forwards give; bad rows are
    refused before any KV is written."""
    path = smollm2_gguf()
    engines = [load_engine(path, mode, monkeypatch, layers=r, load_tokenizer=False)
               for r in ((0, 10), (10, 20), (20, 30))]
    prompt, drafts = [1, 9690, 198, 2683], [359, 253, 5356, 5646]
    for eng in engines:
        ref_s, got_s = eng.new_session(64), eng.new_session(64)
        if eng.stages[0].first:
            xs = [torch.tensor([t]) for t in prompt + drafts]
        else:
            xs = [torch.randn(1, eng.config.hidden, generator=torch.Generator().manual_seed(i)) for i in range(8)]
        ref = [ref_s.forward(x, i, 1).clone() for i, x in enumerate(xs)]
        for i, x in enumerate(xs[:4]):
            got_s.forward(x, i, 1)
        got = eng.forward_session_rows(got_s, torch.cat(xs[4:]))
        want = torch.stack(ref[4:]) if eng.stages[-1].last else torch.cat(ref[4:])
        assert torch.equal(got, want) and len(got_s) == 8
        got_s.truncate(5)  # the first draft refused: the session goes on from there
        again = eng.forward_session_rows(got_s, torch.cat(xs[5:6]))
        assert torch.equal(again, want[1:2])
        bad = torch.tensor([0, eng.config.vocab_size]) if eng.stages[0].first else torch.zeros(2, 7)
        with pytest.raises(ValueError):
            eng.forward_session_rows(got_s, bad)
        assert len(got_s) == 6
        ref_s.close()
        got_s.close()
