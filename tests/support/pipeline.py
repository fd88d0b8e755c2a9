"""An in-process pipeline split for serving tests: real StageWorkers and a PipelineModel over in-memory links
(no QUIC, no processes), workers that can be 'killed', and failover to standbys; the `executor` and `solo`
fixtures (module-scoped: one bundled-model engine per test module) are registered by tests/serving/conftest.py."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from mesh402.engine import Engine
from mesh402.engine.sampling import SamplingParams
from mesh402.mesh.identity import NodeIdentity
from mesh402.models.catalog import bundled_model_path
from mesh402.serving.generation import NO_CONSTRAINTS, Constraints, Delta, Finished, GenerationRequest, generate
from mesh402.serving.pipeline import Chain, Failover, PipelineModel, StepTimer
from mesh402.serving.stage_link import Hop, MemoryLink, StageError
from mesh402.serving.stage_worker import StageKey, StageWorker

PATH = bundled_model_path()
HASH = "h-smollm2"


@pytest.fixture(scope="module")
def executor():
    """One worker thread for the module's stages and engines, as a node has."""
    ex = ThreadPoolExecutor(1)
    yield ex
    ex.shutdown()


@pytest.fixture(scope="module")
def solo() -> Engine:
    """The bundled model whole, exact mode: what a split must equal."""
    return Engine.load(PATH, mode="exact")


class Mesh:
    """Workers keyed by node id, reachable through in-memory links; nodes can be 'killed'. `host` is the
    identity that assigns the ranges and signs the session grants; each link knows who opened it."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self.executor = executor
        self.host = NodeIdentity.generate()
        self.workers: dict[str, StageWorker] = {}
        self.tasks: dict[str, list[asyncio.Task]] = {}
        self.dead: set[str] = set()

    def add(self, node: str) -> StageWorker:
        w = StageWorker(node, self.executor, lambda h, a, b: Engine.load(PATH, mode="exact", layers=(a, b),
                                                                         load_tokenizer=False),
                        lambda target, me=node: self.connect(target, caller=me))
        self.workers[node] = w
        self.tasks[node] = []
        return w

    async def connect(self, node: str, caller: str | None = None) -> MemoryLink:
        if node in self.dead or node not in self.workers:
            raise ConnectionError(f"no route to {node}")
        client, server = MemoryLink.pair()
        peer = caller or self.host.node_id_hex
        self.tasks[node].append(asyncio.create_task(self.workers[node].handle(peer, server)))
        return client

    async def load(self, node: str, key: StageKey) -> None:
        """As an ASSIGN from the host would: the range, and who may grant sessions on it."""
        await self.workers[node].ensure_loaded(key, assigner=self.host.node_id_hex)

    def kill(self, node: str) -> None:
        """Like kill -9: the node's tasks stop and it never answers again."""
        self.dead.add(node)
        for t in self.tasks[node]:
            t.cancel()


class MeshFailover(Failover):
    def __init__(self, mesh: Mesh, standbys: list[str]) -> None:
        self.mesh = mesh
        self.standbys = standbys
        self.epoch = 1

    async def alive(self, node: str) -> bool:
        return node not in self.mesh.dead

    async def replace(self, chain: Chain, dead: set[str]) -> Chain:
        hops = []
        for h in chain.hops:
            if h.node in dead:
                if not self.standbys:
                    raise StageError("no standby left", code="no_plan")
                sb = self.standbys.pop(0)
                await self.mesh.load(sb, StageKey(HASH, h.start, h.end))
                h = Hop(sb, h.start, h.end)
            hops.append(h)
        self.epoch += 1
        return Chain(chain.model_id, chain.content_hash, self.epoch, chain.local_end, tuple(hops))


async def run_gen(model, prompt: list[int], n: int, kill_after: int | None = None, on_kill=None,
                  constraints: Constraints = NO_CONSTRAINTS) -> list[int]:
    """Greedy tokens; without constraints no EOS (always n tokens), with a grammar up to its end."""
    sampling = SamplingParams(temperature=0, seed=1)
    req = GenerationRequest(prompt, n, sampling, constraints=constraints)
    stepper = await model.open(len(prompt) + n, sampling, constraints=constraints)
    eos = model.eos_ids if constraints.grammar is not None else []
    out: list[int] = []
    async for ev in generate(req, stepper, model.tokenizer, eos):
        if isinstance(ev, Delta) and ev.token_id is not None:
            out.append(ev.token_id)
            if kill_after is not None and len(out) == kill_after:
                on_kill()
        elif isinstance(ev, Finished):
            assert ev.completion_tokens == n or eos
    return out


async def build(executor, splits: list[int], standbys: list[str] = ()) -> tuple[PipelineModel, Mesh, MeshFailover]:
    mesh = Mesh(executor)
    hops = []
    for i, (a, b) in enumerate(zip(splits[1:], splits[2:])):
        node = f"w{i}"
        mesh.add(node)
        await mesh.load(node, StageKey(HASH, a, b))
        hops.append(Hop(node, a, b))
    for sb in standbys:
        mesh.add(sb)
    engine0 = await asyncio.get_running_loop().run_in_executor(
        executor, lambda: Engine.load(PATH, mode="exact", layers=(0, splits[1])))
    fo = MeshFailover(mesh, list(standbys))
    chain = Chain("smollm2", HASH, 1, splits[1], tuple(hops))
    return (PipelineModel(engine0, chain, mesh.connect, fo, executor, timer=StepTimer(floor_s=0.5), signer=mesh.host),
            mesh, fo)
