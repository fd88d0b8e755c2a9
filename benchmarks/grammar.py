"""Constrained decoding on CPU: which grammar library, and what the mask costs per token (docs/structured-output.md).

    .venv/bin/python benchmarks/grammar.py [--quick]      (xgrammar, outlines-core: bash scripts/bench-deps.sh)

Prints tables and writes benchmarks/results/grammar.json.

Candidates: llguidance, xgrammar, outlines-core, each given the bundled SmolLM2 vocabulary (49,152 tokens) as
raw bytes from our own tokenizer (special tokens are never text; the EOS ids are the stop tokens).
1. Per-token mask cost: the token sequence of a fixed JSON document is replayed through a fresh matcher; at
   each position the allowed-token bitmask is computed (timed) and then the token is consumed (not timed).
   Grammars: `json_object` (any JSON object) and a realistic schema (nested object, enum, arrays, bounded
   integer, pattern, required fields, additionalProperties false). Compile time is reported separately.
2. Schema coverage: per JSON-schema feature a schema, one instance that must be accepted and one that must
   be refused; a library "supports" a feature when it compiles the schema, accepts the valid instance and
   refuses the invalid one (refusing at compile time counts as unsupported, as does accepting bad output).
3. Install weight: wheel and installed size, and what the package declares as dependencies.
4. The sampler with a mask (mesh402.engine.grammar + sampling): per-token cost of applying the mask and
   drawing, against the same draw without one.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from mesh402.engine.tokenizer import Tokenizer  # noqa: E402
from mesh402.models.catalog import bundled_model_path  # noqa: E402

torch.set_num_threads(1)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 64},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "status": {"enum": ["active", "inactive", "banned"]},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "scores": {"type": "array", "items": {"type": "number"}},
        "verified": {"type": "boolean"},
    },
    "required": ["name", "age", "status", "address", "tags", "scores", "verified"],
    "additionalProperties": False,
}
SCHEMA_DOC = {
    "name": "Ada Lovelace", "age": 36, "status": "active",
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10115"},
    "tags": ["math", "engines", "poetry"], "scores": [9.5, 7.25, 10], "verified": True,
}
OBJECT_DOC = {"id": 7, "items": [{"sku": "A-1", "qty": 2, "price": 3.5}, {"sku": "B-22", "qty": 1, "price": 12.0}],
              "note": "deliver after 5pm, ring twice", "gift": False, "meta": {"source": "web", "tags": ["x", "y"]}}

# feature -> (schema, valid instance, invalid instance)
FEATURES: dict[str, tuple[dict[str, Any], Any, Any]] = {
    "type string/number/boolean/null": (
        {"type": "object", "properties": {"s": {"type": "string"}, "n": {"type": "number"}, "b": {"type": "boolean"},
                                          "z": {"type": "null"}}, "required": ["s", "n", "b", "z"]},
        {"s": "x", "n": 1.5, "b": True, "z": None}, {"s": 1, "n": 1.5, "b": True, "z": None}),
    "integer": ({"type": "integer"}, 42, 4.5),
    "enum": ({"enum": ["red", "green", 3]}, "green", "blue"),
    "const": ({"const": "fixed"}, "fixed", "other"),
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"a": 1}, {}),
    "additionalProperties false": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
        {"a": 1}, {"a": 1, "b": 2}),
    "additionalProperties schema": (
        {"type": "object", "additionalProperties": {"type": "integer"}}, {"x": 1, "y": 2}, {"x": "s"}),
    "nested object": (
        {"type": "object", "properties": {"o": {"type": "object", "properties": {"k": {"type": "boolean"}},
                                                "required": ["k"]}}, "required": ["o"]},
        {"o": {"k": True}}, {"o": {"k": 1}}),
    "array items": ({"type": "array", "items": {"type": "integer"}}, [1, 2, 3], [1, "2"]),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, [1, 2], [1]),
    "prefixItems (tuple)": ({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
                             "items": False}, ["a", 1], [1, "a"]),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 4}, "abc", "abcdef"),
    "pattern": ({"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}, "AB-123", "ab-123"),
    "format date-time": ({"type": "string", "format": "date-time"}, "2024-05-01T12:30:00Z", "yesterday"),
    "format email": ({"type": "string", "format": "email"}, "a@b.io", "not an email"),
    "format uuid": ({"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", "123"),
    "minimum/maximum": ({"type": "integer", "minimum": 1, "maximum": 10}, 7, 11),
    "exclusiveMinimum (number)": ({"type": "number", "exclusiveMinimum": 0}, 0.5, -1),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 15, 7),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, "s", True),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "s"),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
              {"a": 1, "b": "x"}, {"a": 1}),
    "type list (nullable)": ({"type": ["string", "null"]}, None, 3),
    "$ref + $defs": ({"$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
                      "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"]},
                     {"p": {"x": 1}}, {"p": {"x": "a"}}),
    "recursive $ref": ({"$defs": {"N": {"type": "object", "properties": {"v": {"type": "integer"},
                                                                          "next": {"anyOf": [{"$ref": "#/$defs/N"},
                                                                                             {"type": "null"}]}},
                                        "required": ["v", "next"], "additionalProperties": False}},
                        "$ref": "#/$defs/N"},
                       {"v": 1, "next": {"v": 2, "next": {"v": 3, "next": {"v": 4, "next": {"v": 5, "next": None}}}}},
                       {"v": 1, "next": {"v": "x", "next": None}}),
    "patternProperties": ({"type": "object", "patternProperties": {"^n_": {"type": "integer"}},
                           "additionalProperties": False}, {"n_a": 1}, {"m": 1}),
    "propertyNames": ({"type": "object", "propertyNames": {"pattern": "^[a-z]+$"},
                       "additionalProperties": {"type": "integer"}}, {"ab": 1}, {"AB": 1}),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    "not": ({"not": {"type": "string"}}, 1, "s"),
    "if/then/else": ({"type": "object", "properties": {"k": {"type": "string"}, "v": {}},
                      "if": {"properties": {"k": {"const": "n"}}}, "then": {"properties": {"v": {"type": "integer"}}},
                      "else": {"properties": {"v": {"type": "string"}}}}, {"k": "n", "v": 1}, {"k": "n", "v": "x"}),
    "minProperties": ({"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 2},
                      {"a": 1, "b": 2}, {"a": 1}),
}


# ---- the three libraries behind one tiny interface ----------------------------------------------
class Lib:
    """compile(kind, schema) -> factory of matchers; a matcher: fill(mask) / consume(tok) -> bool / accepting()."""

    name = ""
    package = ""

    def compile(self, schema: dict[str, Any] | None) -> Callable[[], Any]:
        raise NotImplementedError


def _vocab(tok: Tokenizer) -> list[bytes]:
    return [tok.token_bytes(i) for i in range(tok.vocab_size)]


class LLGuidance(Lib):
    name, package = "llguidance", "llguidance"

    def __init__(self, tok: Tokenizer) -> None:
        from mesh402.engine.grammar import llg_tokenizer

        self.lt = llg_tokenizer(tok)

    def compile(self, schema):
        import llguidance as llg
        from llguidance.torch import fill_next_token_bitmask

        # Default options (flexible whitespace), the same footing as the other two libraries.
        grammar = llg.LLMatcher.grammar_from_json_schema(schema if schema is not None else {"type": "object"})
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.lt)
        if is_error:
            raise ValueError(messages[0])
        lt = self.lt

        class M:
            def __init__(self) -> None:
                self.m = llg.LLMatcher(lt, grammar, log_level=0)
                if self.m.is_error():
                    raise ValueError(self.m.get_error())

            def fill(self, mask):
                fill_next_token_bitmask(self.m, mask.view(1, -1))

            def consume(self, t):
                return self.m.consume_token(t) and not self.m.is_error()

            def accepting(self):
                return self.m.is_accepting()

        M()  # surface compile errors here, not in the timed loop
        return M


class XGrammar(Lib):
    name, package = "xgrammar", "xgrammar"

    def __init__(self, tok: Tokenizer) -> None:
        import xgrammar as xgr

        self.stop = tok.eos_ids[0]
        # Special tokens as empty strings: xgrammar then never allows them inside text; EOS ids stop.
        vocab = [b"" if tok.is_special(i) else tok.token_bytes(i) for i in range(tok.vocab_size)]
        info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                 stop_token_ids=list(tok.eos_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.vocab_size = tok.vocab_size

    def compile(self, schema):
        import xgrammar as xgr

        compiled = (self.compiler.compile_builtin_json_grammar() if schema is None
                    else self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, strict_mode=False))

        class M:
            def __init__(self) -> None:
                self.m = xgr.GrammarMatcher(compiled)

            def fill(self, mask):
                self.m.fill_next_token_bitmask(mask.view(1, -1))

            def consume(self, t):
                return self.m.accept_token(t)

            def accepting(self):  # EOS is allowed exactly when the grammar may end
                mask = torch.zeros(1, (words * 32 + 31) // 32, dtype=torch.int32)
                self.m.fill_next_token_bitmask(mask)
                return bool((int(mask[0, stop // 32]) >> (stop % 32)) & 1)

        words, stop = (self.vocab_size + 31) // 32, self.stop
        M()
        return M


class OutlinesCore(Lib):
    name, package = "outlines-core", "outlines-core"

    def __init__(self, tok: Tokenizer) -> None:
        import outlines_core as oc

        by_bytes: dict[bytes, list[int]] = {}
        for i in range(tok.vocab_size):
            if not tok.is_special(i):  # special tokens are never text
                by_bytes.setdefault(tok.token_bytes(i), []).append(i)
        self.vocab = oc.Vocabulary(tok.eos_ids[0], by_bytes)

    def compile(self, schema):
        import outlines_core as oc

        # json_object has no regex: outlines bounds the nesting (default depth 3).
        regex = oc.json_schema.build_regex_from_schema(json.dumps(schema if schema is not None else {"type": "object"}),
                                                       whitespace_pattern=r"[ ]?")
        index = oc.Index(regex, self.vocab)

        class M:
            def __init__(self) -> None:
                self.g = oc.Guide(index)

            def fill(self, mask):
                self.g.write_mask_into(mask.data_ptr(), mask.numel(), 4)

            def consume(self, t):
                try:
                    self.g.advance(t, return_tokens=False)
                    return True
                except Exception:
                    return False

            def accepting(self):
                return self.g.is_finished()

        return M


# ---- measurements ------------------------------------------------------------------------------
def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def mask_cost(lib: Lib, tok: Tokenizer, schema: dict | None, doc: Any, runs: int) -> dict[str, Any]:
    lib.compile({"type": "object", "properties": {"warm": {"type": "integer"}}})  # one-time setup not counted
    t0 = time.perf_counter()
    factory = lib.compile(schema)
    compile_s = time.perf_counter() - t0
    ids = tok.encode(json.dumps(doc), add_special=False)
    mask = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)
    times: list[float] = []
    first: list[float] = []
    for _ in range(runs):
        m = factory()
        for j, t in enumerate(ids):
            a = time.perf_counter()
            m.fill(mask)
            dt = (time.perf_counter() - a) * 1e6
            (first if j == 0 else times).append(dt)
            if not (int(mask[t // 32]) >> (t % 32)) & 1 or not m.consume(t):
                raise AssertionError(f"{lib.name}: token {j} ({tok.token_to_piece(t)!r}) refused")
        if not m.accepting():
            raise AssertionError(f"{lib.name}: document not accepted at the end")
    return {"compile_ms": compile_s * 1e3, "tokens": len(ids), "first_mask_us": statistics.mean(first),
            "mean_us": statistics.mean(times), "p50_us": _pct(times, 0.5), "p99_us": _pct(times, 0.99),
            "max_us": max(times)}


def accepts(factory: Callable[[], Any], tok: Tokenizer, value: Any) -> bool:
    m = factory()
    for t in tok.encode(json.dumps(value), add_special=False):
        if not m.consume(t):
            return False
    return m.accepting()


def coverage(lib: Lib, tok: Tokenizer) -> dict[str, str]:
    out: dict[str, str] = {}
    for feature, (schema, good, bad) in FEATURES.items():
        try:
            factory = lib.compile(schema)
        except Exception as exc:  # noqa: BLE001 - any refusal counts as unsupported
            out[feature] = f"refused: {str(exc).splitlines()[0][:80]}"
            continue
        try:
            ok, leak = accepts(factory, tok, good), accepts(factory, tok, bad)
        except Exception as exc:  # noqa: BLE001
            out[feature] = f"error: {exc!s:.80}"
            continue
        out[feature] = "yes" if ok and not leak else ("rejects valid" if not ok else "not enforced")
    return out


def install_weight(package: str) -> dict[str, Any]:
    dist = md.distribution(package)
    size = sum(f.size or 0 for f in dist.files or [])
    deps = [r.split(";")[0].strip() for r in dist.requires or [] if "extra ==" not in r]
    return {"version": dist.version, "installed_mb": round(size / 2**20, 1), "declared_deps": deps}


def model_logits(tok: Tokenizer, ids: list[int]) -> list[torch.Tensor]:
    """The bundled model's logits before each of `ids`, teacher-forced after a JSON-asking chat prompt."""
    from mesh402.engine import Engine

    eng = Engine.load(bundled_model_path(), mode="exact")
    prompt = eng.chat_template.render([{"role": "user", "content": "Describe Ada Lovelace as JSON: "
                                        + json.dumps(SCHEMA)}])
    p_ids = tok.encode(prompt)
    with eng.new_session(len(p_ids) + len(ids) + 1) as s:
        out = [s.prefill(p_ids)]
        out += [s.decode(t) for t in ids[:-1]]
    return out


def sampler_overhead(tok: Tokenizer, runs: int) -> dict[str, Any]:
    """The engine's own path: Grammar + Matcher + Sampler(allowed=mask) against the plain Sampler, on the
    bundled model's real logits (peaked, as in decoding; random logits would make top-p sort the vocabulary)."""
    from mesh402.engine.grammar import GrammarCompiler
    from mesh402.engine.sampling import Sampler, SamplingParams

    grammar = GrammarCompiler(tok).json_schema(SCHEMA)
    ids = tok.encode(json.dumps(SCHEMA_DOC), add_special=False)
    logits = model_logits(tok, ids)
    out: dict[str, Any] = {}
    for label, params in (("greedy", SamplingParams(temperature=0)),
                          ("t=0.7 top_p=0.95", SamplingParams(seed=1, temperature=0.7, top_p=0.95))):
        rows: dict[str, list[float]] = {"plain": [], "mask": [], "masked_draw": [], "accept": []}
        sampler = Sampler(params)
        for _ in range(runs):
            m = grammar.matcher()
            for pos, (x, t) in enumerate(zip(logits, ids)):
                a = time.perf_counter()
                sampler.sample(x, [], pos)
                b = time.perf_counter()
                allowed = m.allowed()
                c = time.perf_counter()
                sampler.sample(x, [], pos, allowed=allowed)
                d = time.perf_counter()
                if not m.accept(t):
                    raise AssertionError("document refused by the engine's matcher")
                e = time.perf_counter()
                for k, v in zip(rows, (b - a, c - b, d - c, e - d)):
                    rows[k].append(v * 1e6)
        extra = [mm + md_ + ac - p for p, mm, md_, ac in zip(*rows.values())]
        out[label] = {k: {"mean_us": statistics.mean(v), "p50_us": _pct(v, 0.5), "p99_us": _pct(v, 0.99)}
                      for k, v in {**rows, "overhead": extra}.items()}
    return out


def end_to_end(tok: Tokenizer, runs: int, max_tokens: int = 192) -> dict[str, Any]:
    """Decode tok/s on the bundled model (fast mode, greedy), with and without the realistic schema."""
    from mesh402.engine import Engine
    from mesh402.engine.grammar import GrammarCompiler
    from mesh402.engine.sampling import Sampler, SamplingParams

    eng = Engine.load(bundled_model_path(), mode="fast")
    grammar = GrammarCompiler(tok).json_schema(SCHEMA)
    prompt = tok.encode_chat(eng.chat_template.render_segments(
        [{"role": "user", "content": "Describe Ada Lovelace as a JSON object."}]))
    out: dict[str, Any] = {}
    for label in ("unconstrained", "json_schema"):
        rates, n_tokens = [], 0
        for _ in range(max(1, min(3, runs))):
            sampler, m, gen = Sampler(SamplingParams(temperature=0)), grammar.matcher(), []
            with eng.new_session(len(prompt) + max_tokens + 1) as s:
                logits = s.prefill(prompt)
                t0 = time.perf_counter()
                for _ in range(max_tokens):
                    allowed = m.allowed() if label == "json_schema" else None
                    t = sampler.sample(logits, prompt + gen, len(prompt) + len(gen), allowed=allowed)
                    if allowed is not None:
                        m.accept(t)
                    if t in tok.eos_ids:
                        break
                    gen.append(t)
                    logits = s.decode(t)
                rates.append(len(gen) / (time.perf_counter() - t0))
                n_tokens = len(gen)
        out[label] = {"tok_s": statistics.median(rates), "tokens": n_tokens,
                      "valid_json": _parses(tok.decode(gen))}
    return out


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    ap.add_argument("--libs", default="llguidance,xgrammar,outlines-core")
    args = ap.parse_args()
    runs = 2 if args.quick else 10
    tok = Tokenizer.from_gguf(bundled_model_path())
    makers = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}
    result: dict[str, Any] = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                          "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
                              "vocab": tok.vocab_size, "runs": runs, "libs": {}}
    for name in args.libs.split(","):
        t0 = time.perf_counter()
        try:
            lib = makers[name](tok)
        except ImportError:
            print(f"skipping {name}: not installed (bash scripts/bench-deps.sh installs it)", file=sys.stderr)
            continue
        entry: dict[str, Any] = {"tokenizer_setup_ms": (time.perf_counter() - t0) * 1e3, **install_weight(lib.package)}
        for label, schema, doc in (("json_object", None, OBJECT_DOC), ("schema", SCHEMA, SCHEMA_DOC)):
            try:
                entry[label] = mask_cost(lib, tok, schema, doc, runs)
            except Exception as exc:  # noqa: BLE001 - report, keep measuring the others
                entry[label] = {"error": f"{type(exc).__name__}: {exc!s:.200}"}
        entry["coverage"] = coverage(lib, tok)
        entry["coverage_score"] = f"{sum(v == 'yes' for v in entry['coverage'].values())}/{len(FEATURES)}"
        result["libs"][name] = entry
        print(f"done {name}", file=sys.stderr)
    result["sampler"] = sampler_overhead(tok, runs)
    result["end_to_end"] = end_to_end(tok, runs)
    print_tables(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grammar.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {RESULTS / 'grammar.json'}")


def print_tables(r: dict[str, Any]) -> None:
    print(f"\nMask computation per token, vocab {r['vocab']}, {r['runs']} runs, 1 thread ({r['machine']['cpu']})")
    print(f"{'library':<14}{'grammar':<13}{'compile ms':>11}{'first µs':>10}{'mean µs':>9}{'p50 µs':>8}{'p99 µs':>8}")
    for name, e in r["libs"].items():
        for label in ("json_object", "schema"):
            m = e[label]
            if "error" in m:
                print(f"{name:<14}{label:<13} {m['error'][:60]}")
                continue
            print(f"{name:<14}{label:<13}{m['compile_ms']:>11.1f}{m['first_mask_us']:>10.0f}{m['mean_us']:>9.1f}"
                  f"{m['p50_us']:>8.1f}{m['p99_us']:>8.1f}")
    names = list(r["libs"])
    print("\nJSON-schema coverage (compiles, accepts the valid instance, refuses the invalid one)")
    print(f"{'feature':<34}" + "".join(f"{n:<16}" for n in names))
    for feature in FEATURES:
        print(f"{feature:<34}" + "".join(f"{r['libs'][n]['coverage'][feature][:15]:<16}" for n in names))
    print(f"{'total':<34}" + "".join(f"{r['libs'][n]['coverage_score']:<16}" for n in names))
    print("\nInstall weight")
    for n in names:
        e = r["libs"][n]
        print(f"{n:<14} {e['version']:<10} {e['installed_mb']:>6.1f} MB installed, deps: {', '.join(e['declared_deps']) or '-'}")
    print("\nSampler with the mask (engine path: matcher mask as bool [vocab] + masked draw + accept), "
          "realistic schema, model logits; µs per token")
    cols = ("plain", "mask", "masked_draw", "accept", "overhead")
    print(f"{'sampling':<18}{'stat':<6}" + "".join(f"{c:>13}" for c in cols))
    for label, s in r["sampler"].items():
        for stat in ("mean", "p50", "p99"):
            print(f"{label:<18}{stat:<6}" + "".join(f"{s[c][stat + '_us']:>13.1f}" for c in cols))

    print("\nEnd to end on the bundled model (fast mode, greedy, one thread; decode only, median of runs)")
    for label, e in r["end_to_end"].items():
        print(f"{label:<15}{e['tok_s']:>7.1f} tok/s  {e['tokens']:>3} tokens  output parses as JSON: {e['valid_json']}")


if __name__ == "__main__":
    main()
