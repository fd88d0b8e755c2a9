"""Wiring for the whole suite: the environment every node process and in-process engine inherits, and the
fixture modules of tests/support (each folder's conftest.py adds that folder's own)."""

from __future__ import annotations

import os

# Every node process and in-process engine uses one torch thread: the CI machine has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Node processes are forked from a per-worker server that has torch and the node's modules imported
# (harness/zygote.py): ~2.3 CPU-s less per start, ~230 starts. MESH402_NODE_ZYGOTE=0 starts each by exec.
os.environ.setdefault("MESH402_NODE_ZYGOTE", "1")

pytest_plugins = (
    "tests.support.api_node",  # api_node: one `mesh402 serve` per session
    "tests.support.nodes",  # mesh_nodes, nostr_relay
    "tests.support.netns",  # netns_pair
    "tests.support.grammar",  # smol_tokenizer, smol_grammars
    "tests.support.browser",  # browser: headless Chromium through Selenium
    "tests.support.watchdog",  # a hard per-test deadline that also ends hangs in native code
)
