"""Routing facts about a model file, from its metadata only (never from its name):
context length, parameter count, capability tags (GGUF ``general.tags``; safetensors
``config.json`` ``tags``) and whether its chat template renders tool definitions."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any


def _tools_in_template(tpl: Any) -> bool:
    if isinstance(tpl, list):  # several named templates
        tpl = " ".join(str(t.get("template", "")) for t in tpl if isinstance(t, dict))
    return isinstance(tpl, str) and "tools" in tpl


@lru_cache(maxsize=64)
def model_profile(path: str, fmt: str = "gguf") -> dict[str, Any]:
    p = Path(path)
    if fmt == "gguf" or p.suffix == ".gguf":
        from mesh402.models.gguf_meta import read_gguf_meta  # lazy: loads gguf, numpy only when needed

        meta = read_gguf_meta(p)
        tags = meta.fields.get("general.tags") or []
        return {"ctx": int(meta.n_ctx), "params": int(meta.n_params),
                "tags": sorted({str(t).lower() for t in tags}) if isinstance(tags, (list, tuple)) else [],
                "tools": _tools_in_template(meta.fields.get("tokenizer.chat_template"))}
    cfg = json.loads((p / "config.json").read_text())
    tpl = ""
    tc = p / "tokenizer_config.json"
    if tc.exists():
        tpl = json.loads(tc.read_text()).get("chat_template", "")
    size = sum(f.stat().st_size for f in p.glob("*.safetensors"))
    return {"ctx": int(cfg.get("max_position_embeddings", 0) or 0), "params": int(size // 2),
            "tags": sorted(str(t).lower() for t in cfg.get("tags", []) or []), "tools": _tools_in_template(tpl)}
