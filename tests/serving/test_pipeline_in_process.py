"""Pipeline split in one process over in-memory links: equal to solo, and exact after a stage dies."""

from __future__ import annotations

import asyncio

import pytest

from mesh402.engine import Engine
from mesh402.engine.sampling import SamplingParams
from mesh402.serving.generation import LocalModel
from mesh402.serving.pipeline import Chain, PipelineModel
from mesh402.serving.stage_link import Hop, StageError
from mesh402.serving.stage_worker import StageKey
from tests.support.pipeline import HASH, PATH, Mesh, MeshFailover, build, run_gen


@pytest.fixture(scope="module")
def prompt(solo: Engine) -> list[int]:
    text = solo.chat_template.render([{"role": "user", "content": "What is the capital of France?"}])
    return solo.tokenizer.encode(text, add_special=False)


N = 20


@pytest.fixture(scope="module")
def solo_tokens(solo: Engine, executor, prompt) -> list[int]:
    return asyncio.run(run_gen(LocalModel(solo, executor), prompt, N))


@pytest.mark.parametrize("splits", [[0, 15, 30], [0, 10, 20, 30]], ids=["2-stage", "3-stage"])
def test_split_equals_solo(executor, prompt, solo_tokens, splits) -> None:
    async def main() -> list[int]:
        model, _, _ = await build(executor, splits)
        return await run_gen(model, prompt, N)

    before = executor.ran_here
    assert asyncio.run(main()) == solo_tokens
    # the stages ran this lone session's decode rows on their event loop's thread (serving.engine_thread), not
    # the engine thread, after each stage's first: the same tokens either way
    assert executor.ran_here - before >= N - 2


def test_stage_killed_mid_generation_gives_identical_output(executor, prompt, solo_tokens) -> None:
    async def main() -> tuple[list[int], PipelineModel]:
        model, mesh, _ = await build(executor, [0, 10, 20, 30], standbys=["standby"])
        out = await run_gen(model, prompt, N, kill_after=7, on_kill=lambda: mesh.kill("w1"))
        return out, model

    out, model = asyncio.run(main())
    assert out == solo_tokens
    assert model.stats.failovers == 1
    assert model.stats.replayed_steps >= 7
    print(f"replayed {model.stats.replayed_steps} steps / {model.stats.replayed_tokens} tokens")


def test_no_replacement_is_a_clean_error(executor, prompt) -> None:
    async def main() -> None:
        model, mesh, _ = await build(executor, [0, 15, 30])
        await run_gen(model, prompt, N, kill_after=3, on_kill=lambda: mesh.kill("w0"))

    with pytest.raises(StageError, match="no standby"):
        asyncio.run(main())


def test_stage_refuses_sessions_beyond_its_memory(executor, prompt) -> None:
    async def main() -> None:
        mesh = Mesh(executor)
        mesh.add("w0", max_sessions=1)
        await mesh.load("w0", StageKey(HASH, 15, 30))
        engine0 = await asyncio.get_running_loop().run_in_executor(
            executor, lambda: Engine.load(PATH, mode="exact", layers=(0, 15)))
        model = PipelineModel(engine0, Chain("smollm2", HASH, 1, 15, (Hop(mesh.node("w0"), 15, 30),)), mesh.connect,
                              MeshFailover(mesh, []), executor, signer=mesh.host)
        sampling = SamplingParams(temperature=0, seed=1)
        first = await model.open(64, sampling)
        with pytest.raises(StageError) as e:
            await model.open(64, sampling)
        assert e.value.code == "stage_full" and "sessions in use" in str(e.value)
        first.release()
        await asyncio.sleep(0.2)
        (await model.open(64, sampling)).release()  # the slot is free again

    asyncio.run(main())
