"""Capacity, stage bytes and KV budgets (mesh402.placement.capacity, ModelLayout)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mesh402.models.gguf_meta import read_gguf_meta
from mesh402.placement import (
    ModelLayout,
    elect_host,
    fits,
    kv_bytes_per_token,
    kv_tokens,
    make_model_key,
    max_vram_bytes,
    node_capacity,
    request_kv_budget,
    stage_bytes,
    usable_bytes,
)
from mesh402.placement.capacity import fixed_stage_bytes, shared_machine_capacities
from harness.tiny_gguf import finish_gguf
from tests.support.engine import smollm2_gguf
from tests.support.placement import KEY, MB, layout, mesh, node

# -- node capacity -------------------------------------------------------------


def test_capacity_is_min_of_max_vram_and_detected():
    assert node_capacity(None, 123) == 123
    assert node_capacity(0.08, 16 * 10**9) == 80_000_000
    assert node_capacity(0.08, 50_000_000) == 50_000_000  # detected is smaller
    assert node_capacity(2, 16 * 10**9) == 2 * 10**9
    assert node_capacity(0, 10**9) == 0


@pytest.mark.parametrize("gb, expected", [
    (0.08, 80_000_000), (0.05, 50_000_000), (0.07, 70_000_000), (0.29, 290_000_000),
    (1.1, 1_100_000_000), (0.1 + 0.2, 300_000_000), (1e-9, 1), (24.5, 24_500_000_000),
])
def test_max_vram_float_is_exact_decimal_gb(gb, expected):
    assert max_vram_bytes(gb) == expected


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_max_vram_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        node_capacity(bad, 10**9)


def test_capacity_rejects_bad_types():
    with pytest.raises(TypeError):
        max_vram_bytes(True)
    with pytest.raises(ValueError):
        node_capacity(None, -1)


def test_fits_headroom_is_exact_at_the_boundary():
    assert fits(100, 110) and not fits(101, 110)
    assert fits(0, 0) and not fits(1, 0)
    for cap in (0, 1, 10, 11, 109, 80_000_000, 10**12 + 7):
        u = usable_bytes(cap)
        assert fits(u, cap) and not fits(u + 1, cap)
        assert u * 1.1 <= cap * (1 + 1e-12)


def test_nodes_on_one_machine_share_its_memory():
    # three nodes on one 100 MB machine, each detected the whole machine: scaled to a third each
    nodes = [node(f"n{i}", 100 * MB, machine_id="box", machine_bytes=100 * MB) for i in range(3)]
    caps = shared_machine_capacities(nodes)
    assert caps == {"n0": 33_333_333, "n1": 33_333_333, "n2": 33_333_333}
    # divided with --max-vram: not overbooked, figures kept
    nodes = [node(f"n{i}", 30 * MB, machine_id="box", machine_bytes=100 * MB) for i in range(3)]
    assert set(shared_machine_capacities(nodes).values()) == {30 * MB}
    # other machines and nodes without a machine id are left alone
    snap = mesh(node("a", 80 * MB, machine_id="m1", machine_bytes=100 * MB),
                node("b", 80 * MB, machine_id="m1", machine_bytes=100 * MB),
                node("c", 80 * MB, machine_id="m2", machine_bytes=100 * MB),
                node("d", 80 * MB))
    assert [snap.capacity(n) for n in "abcd"] == [50 * MB, 50 * MB, 80 * MB, 80 * MB]
    assert snap.node("a").capacity_bytes == 80 * MB  # the snapshot keeps what was reported


def test_overbooked_machine_loses_election_to_a_real_one():
    snap = mesh(node("z1", 100 * MB, machine_id="box", machine_bytes=100 * MB),
                node("z2", 100 * MB, machine_id="box", machine_bytes=100 * MB),
                node("a", 60 * MB))
    assert elect_host(KEY, snap) == "a"


# -- stage bytes -----------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
    meta = read_gguf_meta(smollm2_gguf())
    return meta, ModelLayout.from_gguf_meta(meta, "smollm2@test")


def test_layout_from_real_gguf(smol):
    meta, lay = smol
    emb = meta.tensor("token_embd.weight").n_bytes
    assert lay.n_layers == 30 and lay.tied
    assert lay.embed_bytes == lay.head_bytes == emb
    assert lay.norm_bytes == meta.tensor("output_norm.weight").n_bytes
    assert lay.total_bytes == sum(t.n_bytes for t in meta.tensors)
    assert (lay.n_kv_heads, lay.head_dim, lay.n_ctx) == (3, 64, 8192)
    assert lay.experts is None and lay.trunk_bytes == lay.total_bytes
    assert ModelLayout.from_gguf_meta(meta).model_key == meta.name


def test_stage_bytes_match_gguf_tensor_table_for_every_range(smol):
    meta, lay = smol
    for s in range(30):
        for e in range(s + 1, 31):
            assert stage_bytes(lay, s, e) == meta.stage_bytes(s, e), (s, e)


def test_tied_embedding_counts_on_both_end_stages(smol):
    meta, lay = smol
    emb = meta.tensor("token_embd.weight").n_bytes
    total = lay.total_bytes
    assert stage_bytes(lay, 0, 15) + stage_bytes(lay, 15, 30) == total + emb
    assert stage_bytes(lay, 0, 10) + stage_bytes(lay, 10, 20) + stage_bytes(lay, 20, 30) == total + emb
    assert stage_bytes(lay, 10, 20) == 10 * lay.layer_bytes[10]  # middle stage: layers only


def test_stage_bytes_synthetic_untied_and_shared():
    lay = layout(n_layers=4, layer=10, embed=100, head=70, norm=3, tied=False, shared=5)
    assert stage_bytes(lay, 0, 4) == 40 + 100 + 70 + 3 + 5
    assert stage_bytes(lay, 0, 2) == 20 + 100 + 5
    assert stage_bytes(lay, 2, 4) == 20 + 70 + 3 + 5
    assert stage_bytes(lay, 1, 3) == 20 + 5
    tied = layout(n_layers=4, layer=10, embed=100, norm=3, tied=True)
    assert stage_bytes(tied, 0, 4) == 40 + 100 + 3  # one stage holds the tied matrix once
    assert stage_bytes(tied, 2, 4) == 20 + 100 + 3
    assert fixed_stage_bytes(tied, True, True) == 103
    with pytest.raises(ValueError):
        stage_bytes(lay, 2, 2)
    with pytest.raises(ValueError):
        stage_bytes(lay, 0, 5)


def test_layout_validation():
    with pytest.raises(ValueError):
        ModelLayout("k", 2, (1,), 1, 1)
    with pytest.raises(ValueError):
        ModelLayout("k", 1, (-1,), 1, 1)
    with pytest.raises(ValueError):
        ModelLayout("k", 1, (1,), 1, 5, tied=True)  # a tied head larger than the embedding
    assert make_model_key("smol", "ab12") == "smol@ab12"
    with pytest.raises(ValueError):
        make_model_key("a@b", "x")


# -- KV ----------------------------------------------------------------------------


def test_kv_bytes_per_token(smol):
    _, lay = smol
    assert kv_bytes_per_token(lay, dtype_bytes=2) == 2 * 30 * 3 * 64 * 2
    assert kv_bytes_per_token(lay, 0, 10, dtype_bytes=4) == 2 * 10 * 3 * 64 * 4
    with pytest.raises(ValueError):
        kv_bytes_per_token(layout(), dtype_bytes=2)  # no KV shape known


def test_request_kv_budget_is_prompt_plus_max_tokens_not_context(smol):
    _, lay = smol
    per_tok = kv_bytes_per_token(lay, dtype_bytes=2)
    budget = request_kv_budget(100, 28, kv_bytes_per_token=per_tok)
    assert budget == 128 * per_tok
    assert budget < lay.n_ctx * per_tok
    assert kv_tokens(100, 28) == 128
    assert kv_tokens(100, 28, chunk=32) == 128 + 32  # whole chunks plus one chunk of slack
    assert kv_tokens(100, 29, chunk=32) == 160 + 32
    assert kv_tokens(0, 0, chunk=32) == 64
    with pytest.raises(ValueError):
        kv_tokens(-1, 1)


# -- MoE layout from a GGUF tensor table -------------------------------------------------


def _write_moe_gguf(path, n_exp=4, hidden=8, ffn=16, vocab=32):
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_name("tiny-moe")
    w.add_block_count(2)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_context_length(64)
    w.add_expert_count(n_exp)
    w.add_expert_used_count(2)
    f32 = np.float32
    w.add_tensor("token_embd.weight", np.zeros((vocab, hidden), f32))
    w.add_tensor("output.weight", np.zeros((vocab, hidden), f32))
    w.add_tensor("output_norm.weight", np.zeros(hidden, f32))
    w.add_tensor("rope_freqs.weight", np.zeros(2, f32))
    for i in range(2):
        w.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((hidden, hidden), f32))
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", np.zeros((n_exp, hidden), f32))
        w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", np.zeros((n_exp, ffn, hidden), f32))
        w.add_tensor(f"blk.{i}.ffn_up_exps.weight", np.zeros((n_exp, ffn, hidden), f32))
        w.add_tensor(f"blk.{i}.ffn_down_exps.weight", np.zeros((n_exp, hidden, ffn), f32))
    finish_gguf(w)


def test_moe_layout_from_gguf(tmp_path):
    p = tmp_path / "moe.gguf"
    _write_moe_gguf(p)
    meta = read_gguf_meta(p)
    lay = ModelLayout.from_gguf_meta(meta, "moe@1")
    one_expert = 3 * 16 * 8 * 4  # gate + up + down of one expert, f32
    assert lay.experts is not None
    assert (lay.experts.n_experts, lay.experts.n_used) == (4, 2)
    assert lay.experts.expert_bytes == (one_expert, one_expert)
    assert lay.experts.total_bytes == 2 * 4 * one_expert
    assert lay.trunk_bytes == lay.total_bytes - 8 * one_expert
    assert not lay.tied and lay.shared_bytes == 8  # rope_freqs on every stage
    for s in range(2):
        for e in range(s + 1, 3):
            assert stage_bytes(lay, s, e) == meta.stage_bytes(s, e)
