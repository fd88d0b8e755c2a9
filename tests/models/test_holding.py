"""Proofs of holding a model's tensors (models/holding.py): a holder's answer matches the challenger's own
computation, a relayed answer (another node's id), a different file or a challenge outside the file do not."""

from __future__ import annotations

import random
import secrets
import shutil
from pathlib import Path

import pytest

from mesh402.models.catalog import bundled_model_path
from mesh402.models.gguf_meta import read_gguf_meta
from mesh402.models.holding import EXTRA_TENSORS, Slice, answer, challenge

ME, OTHER = "ab" * 32, "cd" * 32


def test_a_challenge_covers_every_layer_and_a_holder_answers_it() -> None:
    path = bundled_model_path()
    meta = read_gguf_meta(path)
    slices = challenge(path, random.Random(1))
    others = sum(t.layer is None for t in meta.tensors)
    assert len(slices) == meta.n_layers + min(EXTRA_TENSORS, others)
    layers = set()
    for s in slices:
        t = next(t for t in meta.tensors if t.offset <= s.offset < t.offset + t.n_bytes)
        assert s.offset + s.length <= t.offset + t.n_bytes
        if t.layer is not None:
            layers.add(t.layer)
    assert layers == set(range(meta.n_layers))
    nonce = secrets.token_bytes(16)
    assert answer(path, ME, nonce, slices) == answer(path, ME, nonce, slices)
    assert answer(path, ME, nonce, slices) != answer(path, OTHER, nonce, slices)  # bound to the prover's id
    assert answer(path, ME, nonce, slices) != answer(path, ME, secrets.token_bytes(16), slices)


def test_another_file_or_a_slice_outside_the_model_does_not_answer(tmp_path: Path) -> None:
    path = bundled_model_path()
    copy = tmp_path / "m.gguf"
    shutil.copyfile(path, copy)
    slices = challenge(path, random.Random(2))
    nonce = b"n" * 16
    assert answer(copy, ME, nonce, slices) == answer(path, ME, nonce, slices)
    with open(copy, "r+b") as f:  # one byte of one challenged slice differs
        f.seek(slices[5].offset)
        b = f.read(1)
        f.seek(slices[5].offset)
        f.write(bytes([b[0] ^ 1]))
    assert answer(copy, ME, nonce, slices) != answer(path, ME, nonce, slices)
    with pytest.raises(ValueError):
        answer(path, ME, nonce, [Slice("", path.stat().st_size - 10, 100)])
    with pytest.raises(ValueError):
        answer(path, ME, nonce, [Slice("other.gguf", 0, 10)])  # a file name for a single-file model
    for bad in ([], ["", -1, 10], ["", 0, 10**6], ["../x", 0, 1], [".hidden", 0, 1], [1, 2, 3]):
        with pytest.raises(ValueError):
            Slice.from_json(bad)


def test_a_folder_model_is_challenged_over_its_weight_files(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(secrets.token_bytes(50_000))
    (tmp_path / "config.json").write_text("{}")
    slices = challenge(tmp_path, random.Random(3))
    assert slices and {s.file for s in slices} == {"model.safetensors"}
    assert len(answer(tmp_path, ME, b"x", slices)) == 64
