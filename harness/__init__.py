"""What the tests and the benchmarks both drive mesh402 with: node processes and meshes of them, a local dev
chain and hand-made x402 payments, a Nostr relay, tiny GGUF writers, reference answers, tampered stages and
SSE reading. Neither a test nor a benchmark: `tests/` and `benchmarks/` import it, it imports neither, and it
has no pytest fixtures (those live in `tests/support`). Importable from the repository root, which
`python -m pytest` and every benchmark (`sys.path.insert(0, ROOT)`) put on sys.path."""
