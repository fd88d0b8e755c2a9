"""The bundled model forced into a pipeline split on real nodes, for the multi-node scenarios."""

SPLIT_ARGS = ["--mode", "exact", "--max-vram", "0.08"]  # ~98 MB model: no node can hold it alone
