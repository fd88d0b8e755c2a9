"""Signed receipt chains made by hand for work-receipt tests (also run by a writer subprocess that is killed
mid-epoch, so it lives in an importable module)."""

from __future__ import annotations

import hashlib

from mesh402.mesh.identity import NodeIdentity
from mesh402.work.receipts import Receipt, sign_receipt

MODEL = "ab" * 32


def h(x: str) -> str:
    return hashlib.sha256(x.encode()).hexdigest()


def chain_for(rid: str, nodes: list[NodeIdentity], bounds: list[int], tokens: int) -> list[Receipt]:
    out: list[Receipt] = []
    inp = h(f"prompt:{rid}")
    for i, node in enumerate(nodes):
        r = sign_receipt(node, request_id=rid, stage=i, model_hash=MODEL, layer_start=bounds[i],
                         layer_end=bounds[i + 1], tokens=tokens, input_hash=inp, output_hash=h(f"{rid}:{i}"),
                         prev=out[-1].digest if out else "")
        out.append(r)
        inp = r.output_hash
    return out
