"""Expert parallelism (mesh402.engine.expert_parallel) on tiny random MoE GGUFs, in process.

The host runs the trunk and router; expert shards run experts on the rows routed to them and the
host combines the results in solo order, so outputs are bit-identical to a single node holding
every expert. Bytes on the wire are activations (about hidden x 4 x top-k per token and MoE layer).
"""
import pytest
import torch

torch.set_num_threads(1)
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from mesh402.engine import Engine  # noqa: E402
from mesh402.engine.moe import ExpertBank  # noqa: E402
from mesh402.engine.weights import open_source  # noqa: E402
from mesh402.models.gguf_meta import read_gguf_meta  # noqa: E402
from mesh402.placement import ModelLayout, plan_experts  # noqa: E402
from mesh402.engine.expert_parallel import ExpertShardWorker, ExpertUnavailable, LoopbackTransport, RemoteExperts, local_workers_for_plan, owners_from_plan

from tests.support.moe_models import E, H, K, NL, SEQ, hf_moe, write_moe_gguf  # noqa: E402
from tests.support.placement import full_mesh  # noqa: E402

PROMPT = SEQ[:20]
N_GEN = 10


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    out = {}
    for arch, q in (("qwen2moe", "Q8_0"), ("mixtral", "Q4_0")):
        p = d / f"{arch}.gguf"
        write_moe_gguf(hf_moe(arch), arch, p, q)
        out[arch] = p
    p = d / "hot.gguf"
    write_moe_gguf(hf_moe("olmoe", seed=2, hot=5), "olmoe", p, "Q8_0")
    out["hot"] = p
    return out


def greedy(path, experts=None, n=N_GEN, on_step=None, mode="exact"):
    """Greedy tokens and all logits (prefill + each decode step)."""
    eng = Engine.load(path, load_tokenizer=False, experts=experts, mode=mode)
    s = eng.new_session(len(PROMPT) + n + 1)
    logits = [s.prefill(PROMPT)]
    toks = []
    for i in range(n):
        t = int(torch.argmax(logits[-1]))
        toks.append(t)
        if on_step:
            on_step(i)
        logits.append(s.decode(t))
    s.close()
    return toks, torch.stack(logits), eng


def split_owners(n_nodes: int, host: str = "host"):
    """Experts dealt round-robin over ``w0..w{n-2}`` and (for n_nodes >= 3) the host too."""
    nodes = [f"w{i}" for i in range(n_nodes - 1)] + ([host] if n_nodes >= 3 else [])
    owners = {}
    for li in range(NL):
        for e in range(E):
            owners[(li, e)] = [nodes[e % len(nodes)]]
    return owners


def build(path, owners, host="host", delay_s=0.0, mode="exact"):
    src = open_source(path)
    held: dict[str, list] = {}
    for ex, ns in owners.items():
        for n in ns:
            held.setdefault(n, []).append(ex)
    bank = ExpertBank(src, held.pop(host), mode=mode) if host in held else None
    workers = {n: ExpertShardWorker(src, exs, mode=mode) for n, exs in held.items()}
    tr = LoopbackTransport(workers, delay_s=delay_s)
    return RemoteExperts(owners, tr, local=bank, local_node=host), tr, workers


@pytest.mark.parametrize("arch", ["qwen2moe", "mixtral"])
@pytest.mark.parametrize("n_nodes", [2, 3])
def test_expert_parallel_equals_solo(ggufs, arch, n_nodes):
    solo_toks, solo_logits, _ = greedy(ggufs[arch])
    runner, tr, workers = build(ggufs[arch], split_owners(n_nodes))
    toks, logits, eng = greedy(ggufs[arch], runner)
    assert toks == solo_toks
    assert torch.equal(logits, solo_logits)  # bit-identical, not just close
    assert eng.stages[0].expert_bank is None  # the host holds no expert weights of its own here
    assert sum(w.weight_bytes for w in workers.values()) > 0


def test_expert_parallel_fast_mode_equals_solo_fast(ggufs):
    solo_toks, solo_logits, _ = greedy(ggufs["mixtral"], mode="fast")
    runner, _, _ = build(ggufs["mixtral"], split_owners(3), mode="fast")
    toks, logits, _ = greedy(ggufs["mixtral"], runner, mode="fast")
    assert toks == solo_toks and torch.equal(logits, solo_logits)


def test_wire_bytes_per_token_are_activations(ggufs):
    runner, tr, workers = build(ggufs["qwen2moe"], split_owners(3))
    counts = []

    def step(i):
        counts.append(tr.wire_bytes)

    greedy(ggufs["qwen2moe"], runner, on_step=step)
    per_tok = [b - a for a, b in zip(counts, counts[1:])]  # decode steps only
    act = H * 4
    expert_w = min(w.bank.experts[next(iter(w.bank.experts))].nbytes for w in workers.values())
    for b in per_tok:
        # per MoE layer: the row out once per node touched (<= k) and k expert outputs back, plus headers
        assert b <= NL * (act * 2 * K + 256)
        assert b >= NL * act * K  # the k expert outputs come back
    print(f"\nwire bytes/token {sum(per_tok) / len(per_tok):.0f} (activation {act} B x top-{K} x {NL} layers = "
          f"{act * K * NL} B; one expert's weights: {expert_w} B)")


def test_replica_takes_over_when_a_node_dies(ggufs):
    solo_toks, solo_logits, _ = greedy(ggufs["qwen2moe"])
    owners = split_owners(3)
    for ex, ns in owners.items():  # w0's experts are also on w2
        if ns == ["w0"]:
            owners[ex] = ["w0", "w2"]
    runner, tr, _ = build(ggufs["qwen2moe"], owners)
    toks, logits, _ = greedy(ggufs["qwen2moe"], runner, on_step=lambda i: i == 4 and tr.kill("w0"))
    assert toks == solo_toks and torch.equal(logits, solo_logits)
    assert runner.failovers == 1 and "w0" in runner.dead


def test_losing_the_only_owner_fails_loudly(ggufs):
    runner, tr, _ = build(ggufs["mixtral"], split_owners(2))
    tr.kill("w0")
    with pytest.raises(ExpertUnavailable):
        greedy(ggufs["mixtral"], runner, n=2)


def test_skewed_usage_replicates_the_hot_expert_and_survives_a_kill(ggufs):
    path = ggufs["hot"]
    solo_toks, solo_logits, eng = greedy(path, n=N_GEN)
    usage = eng.stages[0].expert_usage()
    for li in range(NL):  # the gate really prefers expert 5
        assert usage[(li, 5)] == max(usage[(li, e)] for e in range(E))
    lay = ModelLayout.from_gguf_meta(read_gguf_meta(path), "hot@t")
    ex_bytes = sum(lay.experts.expert_bytes)
    trunk = lay.trunk_bytes
    # the host fits the trunk and about half the experts; each peer all of them (+15%), not the host
    caps = {"a-host": int((trunk + 2 * ex_bytes) * 1.5), "b": int(E * ex_bytes * 1.15),
            "c": int(E * ex_bytes * 1.15)}
    snap = full_mesh(caps, models=("hot@t",))
    plan = plan_experts("hot@t", lay, snap, usage=usage, epoch=1)
    assert hasattr(plan, "shards"), plan
    assert plan.host == "a-host"
    for li in range(NL):
        assert (li, 5) in plan.replicated
        assert len(plan.owners((li, 5))) >= 2
    host_bank, workers = local_workers_for_plan(path, plan)
    tr = LoopbackTransport(workers)
    runner = RemoteExperts(owners_from_plan(plan), tr, local=host_bank, local_node=plan.host)
    toks, logits, _ = greedy(path, runner)
    assert toks == solo_toks and torch.equal(logits, solo_logits)
    # the node the host uses for the hot expert stops answering: the replica takes over
    hot_owners = owners_from_plan(plan)
    primary = runner.owner(0, 5)
    for li in range(NL):
        assert runner.owner(li, 5) == primary
    if primary == plan.host:  # prefer a peer's copy so that a peer's death is what we test
        runner.owners = {ex: (ns[1:] + ns[:1]) if ex[1] == 5 else ns for ex, ns in hot_owners.items()}
        primary = runner.owner(0, 5)
    assert primary != plan.host
    # a node dies but only its copies of the hot experts matter here: detach its other experts
    # (held once) to a stand-in that stays up, so the death tests the replica path alone
    others = [ex for ex, ns in runner.owners.items() if primary in ns and ex[1] != 5]
    if others:
        workers["standin"] = ExpertShardWorker(path, others)
        tr.workers["standin"] = workers["standin"]
        for ex in others:
            runner.owners[ex] = tuple("standin" if n == primary else n for n in runner.owners[ex])
    runner.dead.clear()
    toks2, logits2, _ = greedy(path, runner, on_step=lambda i: i == 3 and tr.kill(primary))
    assert toks2 == solo_toks and torch.equal(logits2, solo_logits)
    assert runner.failovers >= 1 and primary in runner.dead
