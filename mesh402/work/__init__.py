"""The data a worker signs: per-stage work receipts, work units and spot-check evidence (no chain, no HTTP)."""
