"""Process-wide torch settings for a node: how many threads one node's engine may use."""

from __future__ import annotations


def configure_torch(threads: int) -> None:
    """Several nodes may share one machine, so each node runs torch with a fixed small thread count."""
    import torch

    torch.set_num_threads(max(1, threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel work; harmless afterwards
        pass
