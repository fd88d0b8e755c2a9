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
from mesh402.serving.engine_thread import EngineThread
from mesh402.serving.generation import NO_CONSTRAINTS, Constraints, Delta, Finished, GenerationRequest, generate
from mesh402.serving.pipeline import Chain, Failover, PipelineModel, StepTimer
from mesh402.serving.stage_link import Hop, MemoryLink, StageError
from mesh402.serving.stage_worker import StageKey, StageWorker

PATH = bundled_model_path()
# A lone session's decode rows run on the stage's loop thread whatever this machine's speed (a node: while
# steps take under 50 ms), so the tests that use this harness take the same path on every machine.
HERE_S = 60.0
HASH = "h-smollm2"


@pytest.fixture(scope="module")
def executor():
    """One worker thread for the module's stages and engines, as a node has (a lone session's decode rows run
    on the loop's thread when it is idle: serving.engine_thread)."""
    ex = EngineThread()
    yield ex
    ex.shutdown()


@pytest.fixture(scope="module")
def solo() -> Engine:
    """The bundled model whole, exact mode: what a split must equal."""
    return Engine.load(PATH, mode="exact")


class Mesh:
    """Workers keyed by name ("w0", "standby"), each with its own identity, whose hex id is the node id the
    plan's hops name and the key its receipts are signed with; reachable through in-memory links, and can be
    'killed'. `host` is the identity that assigns the ranges and signs the session grants; each link knows
    who opened it."""

    def __init__(self, executor: ThreadPoolExecutor, mode: str = "exact", max_batch: int = 8) -> None:
        self.executor = executor
        self.mode, self.max_batch = mode, max_batch  # the workers' numerics and decode rows per engine call
        self.host = NodeIdentity.generate()
        self.workers: dict[str, StageWorker] = {}
        self.ids: dict[str, NodeIdentity] = {}
        self.names: dict[str, str] = {}  # node id hex -> name
        self.tasks: dict[str, list[asyncio.Task]] = {}
        self.dead: set[str] = set()  # node ids

    def node(self, name: str) -> str:
        return self.ids[name].node_id_hex

    def add(self, name: str, **engine_kw: object) -> StageWorker:
        """A worker; `engine_kw` go to every Engine.load of its ranges (e.g. max_sessions)."""
        ident = self.ids[name] = NodeIdentity.generate()
        node = ident.node_id_hex
        w = StageWorker(node, self.executor, lambda h, a, b: Engine.load(PATH, mode=self.mode, layers=(a, b),
                                                                         load_tokenizer=False, **engine_kw),
                        lambda target, me=node: self.connect(target, caller=me), signer=ident,
                        max_batch=self.max_batch, here_s=HERE_S)
        self.workers[name], self.names[node], self.tasks[name] = w, name, []
        return w

    async def connect(self, node: str, caller: str | None = None) -> MemoryLink:
        name = self.names.get(node)
        if node in self.dead or name is None:
            raise ConnectionError(f"no route to {node}")
        client, server = MemoryLink.pair()
        peer = caller or self.host.node_id_hex
        self.tasks[name].append(asyncio.create_task(self.workers[name].handle(peer, server)))
        return client

    async def load(self, name: str, key: StageKey) -> None:
        """As an ASSIGN from the host would: the range, and who may grant sessions on it."""
        await self.workers[name].ensure_loaded(key, assigner=self.host.node_id_hex)

    def kill(self, name: str) -> None:
        """Like kill -9: the node's tasks stop and it never answers again."""
        self.dead.add(self.node(name))
        for t in self.tasks[name]:
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
                h = Hop(self.mesh.node(sb), h.start, h.end)
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


async def build(executor, splits: list[int], standbys: list[str] = (), *, mode: str = "exact",
                max_batch: int = 8) -> tuple[PipelineModel, Mesh, MeshFailover]:
    """`mode`: every stage's numerics; `max_batch`: decode rows per engine call on every stage (1: each session's
    step alone)."""
    mesh = Mesh(executor, mode, max_batch)
    hops = []
    for i, (a, b) in enumerate(zip(splits[1:], splits[2:])):
        name = f"w{i}"
        mesh.add(name)
        await mesh.load(name, StageKey(HASH, a, b))
        hops.append(Hop(mesh.node(name), a, b))
    for sb in standbys:
        mesh.add(sb)
    engine0 = await asyncio.get_running_loop().run_in_executor(
        executor, lambda: Engine.load(PATH, mode=mode, layers=(0, splits[1])))
    fo = MeshFailover(mesh, list(standbys))
    chain = Chain("smollm2", HASH, 1, splits[1], tuple(hops))
    return (PipelineModel(engine0, chain, mesh.connect, fo, executor, timer=StepTimer(floor_s=0.5), signer=mesh.host,
                          max_batch=max_batch),
            mesh, fo)
