"""Serving a model across stages in process (mesh402.serving): the pipeline split over in-memory links, its
receipts, spot checks and wire dtypes, expert receipts, stop sequences and the verification policy."""
