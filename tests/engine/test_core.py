"""Engine core on SmolLM2: stage composition, shape-stable chunked prefill, KV cache, fast mode."""
import pytest
import torch

from mesh402.engine import ContextTooLong, Engine, EngineError, EngineFull, Stage
from mesh402.models.gguf_meta import read_gguf_meta
from tests.support.engine import smollm2_gguf

torch.set_num_threads(1)

# ChatML prompt (43 tokens) for "Name three rivers in Europe and say which one is the longest."
# (ids fixed so this module needs no tokenizer).
PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
          19712, 8182, 2, 198, 1, 4093, 198, 5820, 1296, 7626, 281, 1910, 284, 1643, 527, 582, 314, 260,
          15019, 30, 2, 198, 1, 520, 9531, 198]


@pytest.fixture(scope="module")
def path():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def exact(path):
    return Engine.load(path, mode="exact", load_tokenizer=False, max_sessions=4)


def _run(eng, prompt, n_decode):
    s = eng.new_session(len(prompt) + n_decode + 1)
    out = [s.prefill(prompt)]
    for _ in range(n_decode):
        out.append(s.decode(int(out[-1].argmax())))
    s.close()
    return out


def test_stage_split_bit_identical(exact, path):
    ref = _run(exact, PROMPT, 4)
    for splits in ([0, 15, 30], [0, 7, 19, 30]):
        eng = Engine.load(path, mode="exact", load_tokenizer=False, splits=splits)
        assert len(eng.stages) == len(splits) - 1
        got = _run(eng, PROMPT, 4)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), splits


def test_whole_vs_cached_prefix_bit_identical(exact):
    s1 = exact.new_session(80)
    whole = s1.prefill(PROMPT)
    d1 = s1.decode(int(whole.argmax()))
    s1.close()
    # continued from a chunk-aligned cached prefix (32 = prefill_chunk)
    s2 = exact.new_session(80)
    s2.prefill(PROMPT[:32])
    cont = s2.prefill(PROMPT[32:])
    d2 = s2.decode(int(cont.argmax()))
    assert torch.equal(whole, cont) and torch.equal(d1, d2)
    # reuse the prefix after a truncate (retry/replay path)
    s2.truncate(32)
    assert len(s2) == 32
    again = s2.prefill(PROMPT[32:])
    assert torch.equal(whole, again)
    # a continuation starting inside a chunk works (bit-identity is only promised at chunk boundaries)
    s2.truncate(32)
    s2.prefill(PROMPT[32:36])
    assert torch.allclose(whole, s2.prefill(PROMPT[36:]), atol=1e-3)
    s2.close()


def test_truncate_then_redecode(exact):
    s = exact.new_session(64)
    lg = s.prefill(PROMPT)
    toks, logits = [], []
    for _ in range(4):
        toks.append(int(lg.argmax()))
        lg = s.decode(toks[-1])
        logits.append(lg)
    n = len(PROMPT) + 2
    s.truncate(n)
    assert len(s) == n and s.tokens == PROMPT + toks[:2]
    lg3 = s.decode(toks[2])
    assert torch.equal(lg3, logits[2])
    s.close()


def test_kv_accounting_and_bounds(exact):
    cfg = exact.config
    per_tok = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
    s = exact.new_session(200)
    assert s.kv_bytes % per_tok == 0 and s.kv_bytes <= 128 * per_tok  # not reserved up front
    s.prefill(PROMPT)
    before = s.kv_bytes
    s.prefill(list(range(100, 200)))  # grows in chunks
    assert s.kv_bytes > before and s.kv_bytes <= exact.kv_bytes_for(200)
    assert exact.kv_bytes_in_use >= s.kv_bytes
    s.close()
    assert s.kv_bytes == 0
    with pytest.raises(ContextTooLong):
        exact.new_session(cfg.n_ctx + 1)
    s = exact.new_session(10)
    with pytest.raises(ContextTooLong):
        s.prefill(list(range(11)))
    with pytest.raises(EngineError):
        s.close() or s.decode(1)
    # session-count bound
    held = [exact.new_session(16) for _ in range(exact.max_sessions)]
    with pytest.raises(EngineFull):
        exact.new_session(16)
    held.pop().close()
    held.append(exact.new_session(16))
    for h in held:
        h.close()
    assert exact.n_sessions == 0 and exact.kv_bytes_reserved == 0


def test_kv_byte_bound(path):
    eng = Engine.load(path, mode="exact", layers=(0, 2), load_tokenizer=False,
                      max_kv_bytes=Engine.load(path, layers=(0, 2), load_tokenizer=False).kv_bytes_for(100) * 2)
    a = eng.new_session(100)
    b = eng.new_session(100)
    with pytest.raises(EngineFull):
        eng.new_session(100)
    a.close()
    eng.new_session(100).close()
    b.close()


def test_stage_memory_scales(path):
    meta = read_gguf_meta(path)
    half = Stage.load(path, layers=(8, 23))  # a middle stage: 15 of 30 layers
    held = half.weight_bytes
    want = meta.stage_bytes(8, 23)
    print(f"\nmiddle stage [8,23): holds {held} B, gguf stage_bytes {want} B")
    assert abs(held - want) / want < 0.02
    per_layer_all = meta.stage_bytes(0, 30) - meta.tensor("token_embd.weight").n_bytes
    assert 0.45 < held / per_layer_all < 0.55
    first = Stage.load(path, layers=(0, 15))
    assert abs(first.weight_bytes - meta.stage_bytes(0, 15)) / meta.stage_bytes(0, 15) < 0.02
    assert first.embed is not None and first.head_exact is None


def test_partial_stage_forward_matches(exact, path):
    """Stage API: hidden states handed from stage to stage give the full model's logits."""
    ref = _run(exact, PROMPT[:20], 0)[0]
    a, b = Stage.load(path, layers=(0, 12)), Stage.load(path, layers=(12, 30))
    ka, kb = a.new_kv(40), b.new_kv(40)
    ids = torch.tensor(PROMPT[:20] + [0] * 12)
    h = a.forward(ka, ids, 0, n_real=20)
    assert h.shape == (32, exact.config.hidden) and len(ka) == 20
    lg = b.forward(kb, h, 0, n_real=20)
    assert torch.equal(lg, ref)


@pytest.fixture(scope="module")
def fast(path):
    return Engine.load(path, mode="fast", load_tokenizer=False)


def test_fast_whole_vs_cached_prefix_bit_identical(fast):
    s1 = fast.new_session(80)
    whole = s1.prefill(PROMPT)
    s1.close()
    s2 = fast.new_session(80)
    s2.prefill(PROMPT[:32])
    assert torch.equal(whole, s2.prefill(PROMPT[32:]))
    s2.close()


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_prefill_without_logits_leaves_the_same_state(mode, exact, fast):
    """A prompt prefilled in pieces (the batching scheduler's chunks) skips the LM head of all but the last:
    the pieces give no logits, and the state after them is the state a whole prefill leaves."""
    eng = exact if mode == "exact" else fast
    s1 = eng.new_session(80)
    whole = s1.prefill(PROMPT)
    d1 = s1.decode(7)
    s1.close()
    s2 = eng.new_session(80)
    assert s2.prefill(PROMPT[:32], logits=False) is None
    assert len(s2) == 32 and s2.tokens == PROMPT[:32]
    last = s2.prefill(PROMPT[32:], logits=True)
    assert torch.equal(whole, last) and torch.equal(d1, s2.decode(7))
    s2.close()


def test_fast_stage_split_bit_identical(fast, path):
    """Fast mode splits too: the first stage of a split embeds as a solo node does, even though a
    solo node's (tied) LM head is a requantized per-row int8 copy of the same table."""
    ref = _run(fast, PROMPT, 3)
    eng = Engine.load(path, mode="fast", load_tokenizer=False, splits=[0, 15, 30])
    got = _run(eng, PROMPT, 3)
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_fast_mode_agreement(exact, fast, path):
    assert fast.weight_bytes < 1.5 * read_gguf_meta(path).file_size
    n = 64
    s = exact.new_session(len(PROMPT) + n + 1)
    f = fast.new_session(len(PROMPT) + n + 1)
    le, lf = s.prefill(PROMPT), f.prefill(PROMPT)
    agree = 0
    for _ in range(n):
        te, tf = int(le.argmax()), int(lf.argmax())
        agree += te == tf
        le, lf = s.decode(te), f.decode(te)  # teacher-forced on exact's tokens
    s.close()
    f.close()
    print(f"\nfast-mode top-1 agreement (teacher-forced, {n} steps): {agree}/{n} = {agree / n:.1%}")
    assert agree / n >= 0.9
