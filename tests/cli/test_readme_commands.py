"""The README's first command, run literally, starts a node that answers a question."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time

import httpx
import pytest

from harness.procs import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```\n(.*?)```", text, re.S)
    assert block, "README must open with a code block holding the two commands"
    return [ln.strip() for ln in block.group(1).splitlines() if ln.strip()]


def test_readme_opens_with_two_commands_and_ci_runs_the_second() -> None:
    cmds = readme_commands()
    assert len(cmds) == 2
    assert "serve" in cmds[0] and "pytest" in cmds[1]
    assert cmds[1] in (REPO / ".ci" / "run").read_text()


@pytest.mark.slow
def test_first_command_starts_a_node_that_answers(tmp_path) -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 9337)) == 0:
            pytest.fail("port 9337 is taken; the README command uses the default port")
    cmd = readme_commands()[0]
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(["bash", "-c", cmd], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "MESH402_HOME": str(tmp_path / "home")}, start_new_session=True)
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get("http://127.0.0.1:9337/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - t0 < 300, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        print(f"README node ready after {time.monotonic() - t0:.1f}s (set-up included)")
        r = httpx.post("http://127.0.0.1:9337/v1/chat/completions", timeout=120, json={
            "model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["message"]["content"]
        print("answer:", answer)
        assert "Paris" in answer
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
