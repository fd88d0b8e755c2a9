"""Pure routing policy: classification, model scoring from metadata, affinity and stickiness."""

from __future__ import annotations

from mesh402.routing.affinity import AffinityTable, ReplicaPicker, prefix_key
from mesh402.routing.classify import classify
from mesh402.routing.models import Candidate, ModelFacts, rank_models


def u(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_classify_categories_and_complexity() -> None:
    assert classify(u("Fix this python function: def f(x): return x +")).category == "code"
    assert classify(u("Refactor the SQL query and add a unit test")).category == "code"
    assert classify(u("Prove that the square root of 2 is irrational, step by step")).label() == "reasoning/deep"
    assert classify(u("Write a haiku about autumn")).category == "creative"
    assert classify(u("What is the capital of France?")).label() == "info/quick"
    assert classify(u("hi there")).label() == "chat/quick"
    assert classify(u("Book me a table"), tools=[{"type": "function"}]).category == "tool_call"
    assert classify([{"role": "system", "content": "You are a coding assistant."}] + u("how do I do it?")).category == "code"
    assert classify(u("x " * 300)).complexity == "deep"
    assert classify(u("tell me something interesting, please, about the weather today")).complexity == "moderate"


CODER = ModelFacts("model-b", 8192, 135_000_000, frozenset({"code", "programming"}), tools=True)
GENERAL = ModelFacts("model-a", 8192, 135_000_000, frozenset(), tools=False)
BIG = ModelFacts("model-c", 32768, 14_000_000_000, frozenset({"chat"}), tools=True)


def test_code_request_goes_to_code_metadata_not_name() -> None:
    cands = [Candidate(GENERAL, "n1"), Candidate(CODER, "n2")]
    best = rank_models(cands, classify(u("Write a python function that parses JSON")))[0]
    assert best.candidate.facts.model_id == "model-b" and any("code" in w for w in best.why)
    # names do not matter: swap them and the tags still decide
    swapped = [Candidate(ModelFacts("coder-xl", 8192, 135_000_000, frozenset(), False), "n1"),
               Candidate(ModelFacts("plain", 8192, 135_000_000, frozenset({"code"}), True), "n2")]
    assert rank_models(swapped, classify(u("fix this bug in my rust code")))[0].candidate.facts.model_id == "plain"


def test_capability_filters_tools_and_context() -> None:
    cls = classify(u("Call the weather tool"), tools=[{"type": "function"}])
    ranked = rank_models([Candidate(GENERAL, "n1"), Candidate(CODER, "n2")], cls)
    assert [r.candidate.facts.model_id for r in ranked] == ["model-b"]
    # a prompt longer than a model's context excludes it
    small = ModelFacts("short", 512, 135_000_000)
    assert [r.candidate.facts.model_id for r in rank_models([Candidate(small, "n")], classify(u("hi")), 600)] == []


def test_deep_prefers_big_tier_quick_prefers_fast_and_load_counts() -> None:
    deep = classify(u("Explain in detail, step by step, the architecture of a database engine"))
    assert rank_models([Candidate(GENERAL, "a"), Candidate(BIG, "b")], deep)[0].candidate.facts.model_id == "model-c"
    quick = classify(u("hi"))
    fast = rank_models([Candidate(GENERAL, "a", tok_s=90), Candidate(BIG, "b", tok_s=5)], quick)
    assert fast[0].candidate.facts.model_id == "model-a"
    busy = rank_models([Candidate(GENERAL, "a", inflight=6), Candidate(ModelFacts("model-d", 8192, 135_000_000), "b")], quick)
    assert busy[0].candidate.facts.model_id == "model-d"


def test_prefix_key_depends_on_system_and_tools_only() -> None:
    sys_ = [{"role": "system", "content": "You are terse."}]
    k1 = prefix_key("m", sys_ + u("one"))
    assert k1 == prefix_key("m", sys_ + u("two"))
    assert k1 != prefix_key("m", [{"role": "system", "content": "You are verbose."}] + u("one"))
    assert k1 != prefix_key("m", sys_ + u("one"), tools=[{"type": "function", "function": {"name": "f"}}])
    assert k1 != prefix_key("other", sys_ + u("one"))


def test_affinity_lru_ttl() -> None:
    t = AffinityTable(capacity=2, ttl_s=10)
    t.put("a", "r1", 0)
    t.put("b", "r2", 1)
    assert t.get("a", 2) == "r1"  # touches a
    t.put("c", "r3", 3)  # evicts b (least recently used)
    assert t.get("b", 3) is None and t.get("c", 3) == "r3"
    assert t.get("a", 20) is None  # expired


def test_replica_order_sticky_affinity_least_loaded() -> None:
    p = ReplicaPicker()
    reps = ["r1", "r2", "r3"]
    s1 = p.order(reps, {}, sticky="alice")
    assert s1[0].reason == "sticky" and all(p.order(reps, {"r1": 5}, sticky="alice")[0].replica == s1[0].replica for _ in range(5))
    assert {c.replica for c in s1} == set(reps)  # the rest are retry candidates
    users = {p.order(reps, {}, sticky=f"user{i}")[0].replica for i in range(30)}
    assert len(users) == 3  # different users spread
    p.served("k", "r2", now=0)
    assert p.order(reps, {"r2": 3}, prefix="k", now=1)[0] .replica == "r2"
    assert p.order(reps, {"r1": 1, "r2": 0, "r3": 2}, prefix="other", now=1)[0].replica == "r2"
    assert p.order(["r1"], {}, prefix="k", now=1)[0].replica == "r1"  # affinity target gone: fall back


def test_standby_promotion_from_demand() -> None:
    from mesh402.routing.demand import decayed, standby_promotions

    now = 100 * 3600 * 1000
    demand = {"a": {"requests": 3, "last_active_ms": now}, "b": {"requests": 50, "last_active_ms": now},
              "c": {"requests": 5, "last_active_ms": now - 23 * 3600 * 1000}, "d": {"requests": 1, "last_active_ms": now}}
    servers = {"b": 2, "d": 1}
    got = standby_promotions(demand, servers, ["a", "b", "c", "d", "e"], now_ms=now)
    assert got == ["b", "a"]  # b is hot (25 per server), a is unserved; c decayed below 1; d served, cold
    assert decayed(10, now - 12 * 3600 * 1000, now) == 5.0
