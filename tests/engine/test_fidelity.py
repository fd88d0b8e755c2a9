"""SmolLM2 (Q4_1 GGUF): greedy output and logits of exact mode vs transformers on the same GGUF."""
import os
import time

import pytest
import torch

from tests.support.engine import smollm2_gguf

torch.set_num_threads(1)

N_NEW = 32


@pytest.fixture(scope="module")
def path():
    return smollm2_gguf()


def _prompt_ids(engine):
    text = engine.chat_template.render([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True)
    return engine.tokenizer.encode(text, add_special=False)


def test_greedy_matches_transformers(path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from mesh402.engine import Engine

    eng = Engine.load(path, mode="exact")
    ids = _prompt_ids(eng)
    s = eng.new_session(len(ids) + N_NEW)
    ours = [s.prefill(ids)]
    out = []
    t0 = time.perf_counter()
    for _ in range(N_NEW):
        tok = int(ours[-1].argmax())
        out.append(tok)
        if len(out) < N_NEW:
            ours.append(s.decode(tok))
    dt = time.perf_counter() - t0
    s.close()
    print(f"\nexact decode: {(N_NEW - 1) / dt:.1f} tok/s; text={eng.tokenizer.decode(out)!r}")

    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    m.eval()
    x = torch.tensor([ids])
    with torch.inference_mode():
        ref = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N_NEW, do_sample=False,
                         pad_token_id=eng.eos_token_ids[0] if eng.eos_token_ids else None)
        ref_new = ref[0, len(ids):].tolist()
        full = torch.tensor([ids + out[:-1]])
        ref_logits = m(full, attention_mask=torch.ones_like(full)).logits[0, len(ids) - 1:]
    ours_t = torch.stack(ours)
    diff = (ours_t - ref_logits).abs().max().item()
    print(f"max |logit diff| vs transformers over {len(ours)} positions: {diff:.3e}")
    # generate() stops at EOS; past it, HF's greedy choice is the argmax of its teacher-forced logits.
    assert out[:len(ref_new)] == ref_new
    assert ref_logits.argmax(-1).tolist() == out
    assert diff < 1e-3
