"""Activations on the wire: tensors to bytes and back, with a hash that receipts can commit to.

f32 is bit-exact; f16/bf16 halve the bytes at a measured cost in agreement.
"""

from __future__ import annotations

import numpy as np
import torch

from mesh402.commitment import activation_hash  # noqa: F401  (re-exported: the wire's commitment hash)

WIRE_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def encode_activations(x: torch.Tensor, dtype: str = "f32") -> tuple[bytes, list[int]]:
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {dtype!r}; one of {sorted(WIRE_DTYPES)}")
    t = x.detach().to("cpu", WIRE_DTYPES[dtype]).contiguous()
    # bf16 has no numpy dtype: ship its raw 16-bit patterns
    raw = t.view(torch.int16).numpy().tobytes() if dtype == "bf16" else t.numpy().tobytes()
    return raw, list(t.shape)


def decode_activations(data: bytes, shape: list[int], dtype: str, device: str | torch.device = "cpu") -> torch.Tensor:
    """Rebuild fp32 activations; raises ValueError when the byte count does not match the shape."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {dtype!r}")
    n = int(np.prod(shape)) if shape else 0
    width = 4 if dtype == "f32" else 2
    if n <= 0 or len(data) != n * width:
        raise ValueError(f"activation payload of {len(data)} bytes does not match shape {shape} in {dtype}")
    if dtype == "bf16":
        t = torch.frombuffer(bytearray(data), dtype=torch.int16).view(torch.bfloat16)
    else:
        t = torch.frombuffer(bytearray(data), dtype=WIRE_DTYPES[dtype])
    return t.reshape(shape).to(device=device, dtype=torch.float32)


def forward_tokens(session, ids: list[int], position: int, pad_to: int, dtype: str) -> tuple[bytes, list[int]]:
    """Run token ids through a first-stage session (padded to `pad_to` rows); activations for the wire."""
    x = torch.tensor(list(ids) + [0] * (pad_to - len(ids)), dtype=torch.long)
    out = session.forward(x, position, len(ids))
    return encode_activations(out, dtype)
