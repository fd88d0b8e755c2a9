"""The worker side of a pipeline split: holds assigned layer ranges and runs sessions over them.

A stage answers ASSIGN (load layers [a, b) of a model for a plan epoch; stale epochs refused) and
serves one stream per session: OPEN, then PREFILL/DECODE steps, then CLOSE. A middle stage forwards
its output to the next stage and relays the reply; the last stage samples with the session's
sampling parameters, its own copy of the token history and the (seed, position)-keyed RNG, so the
token it draws is the one the host would have drawn.

Any member may open a STAGE stream, so nothing is taken on trust: an ASSIGN is accepted only when the
node's policy (`may_assign`: the model's elected host, a bounded epoch, within the node's budget) says
so; an OPEN only with a grant signed by the host that assigned the range, from the stage before this one
in that grant; every receive has a deadline, and each peer holds a bounded number of streams.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.serving.hop_trace import STAGE_DONE, STAGE_RECV, STAGE_RUN, STAGE_SEND, mark
from mesh402.serving.stage_batch import RowBatcher
from mesh402.serving.stage_link import (
    Hop,
    K,
    Link,
    OpenGrant,
    StageError,
    dump_json,
    error_frame,
    expect_stage,
    stage_body,
    stage_frame,
)
from mesh402.serving.work_pay import PAY_PARAM, PayerOf, WorkerPay, pay_map, payer_refusal
from mesh402.work.evidence import fingerprint_ids, last_step_hash, reveal, sign_reveal
from mesh402.work.receipts import Receipt

log = logging.getLogger(__name__)

Connect = Callable[[str], Awaitable[Link]]  # node id hex -> a fresh STAGE stream to it
Loader = Callable[[str, int, int], Any]  # (content_hash, start, end) -> partial Engine (runs in the engine thread)
# (peer, ASSIGN frame) -> None to accept, else (code, reason) to refuse
AssignPolicy = Callable[[str, pb.StageFrame], "tuple[str, str] | None | Awaitable[tuple[str, str] | None]"]
MAX_STREAMS_PER_PEER = 64  # STAGE streams one peer may hold open here at once (sessions + control)
RECENT_REQUESTS = 4096  # grant nonces remembered: a grant opens one session, once
MAX_DRAFT_ROWS = 17  # rows of one speculative step: the sampled token and up to 16 drafts (--draft-tokens)
# A lone session's decode row runs on the event loop's thread while the stage's steps take under this long
# (serving.stage_batch): it saves two thread wake-ups a token, and blocks the loop no longer than this.
HERE_S = 0.05


@dataclass(frozen=True)
class StageKey:
    content_hash: str
    start: int
    end: int


@dataclass
class StageStats:
    sessions_opened: int = 0
    sessions_refused: int = 0
    steps: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    stale_epochs_refused: int = 0
    assigns_refused: int = 0
    opens_refused: int = 0
    sessions_idle_closed: int = 0  # sessions whose upstream went silent past the deadline
    streams_refused: int = 0  # over a peer's stream quota
    by_link: dict[str, int] = field(default_factory=dict)  # activation bytes sent per next-hop node


class StageWorker:
    def __init__(self, node_id: str, executor: ThreadPoolExecutor, loader: Loader, connect: Connect,
                 *, open_timeout: float = 30.0, step_timeout: float = 300.0, idle_timeout: float = 120.0,
                 signer: Any = None, may_assign: AssignPolicy | None = None, max_batch: int = 8,
                 here_s: float = HERE_S) -> None:
        self.node_id = node_id
        # decode rows of this many sessions per engine call on a range (stage_batch); 1: one call per step
        self.max_batch = max_batch
        self.here_s = here_s  # a lone session's rows run on the loop's thread while steps take under this
        self.batchers: dict[StageKey, RowBatcher] = {}
        # None: no peer may assign layers here (in-process harnesses load ranges with ensure_loaded)
        self.may_assign = may_assign
        self.idle_timeout = idle_timeout  # an upstream silent this long mid-session loses the session
        self.signer = signer  # NodeIdentity: signs per-request work receipts when the entry asks for them
        self.executor = executor
        self.loader = loader
        self.connect = connect
        self.open_timeout = open_timeout
        self.step_timeout = step_timeout
        self.engines: dict[StageKey, Any] = {}
        self.epochs: dict[str, int] = {}  # content_hash -> newest accepted plan epoch
        self.assigners: dict[StageKey, str] = {}  # who assigned each range: only it may grant sessions on it
        self.stats = StageStats()
        self.streams: dict[str, int] = {}  # peer -> STAGE streams it holds open here
        self.sessions: dict[StageKey, int] = {}  # open sessions per range (ranges in use are never dropped)
        self._recent: dict[str, None] = {}  # nonces of the grants used (insertion-ordered, bounded)
        self._loading: dict[StageKey, asyncio.Future[Any]] = {}
        self.prefix_rows: Any = None  # KV rows of prompt prefixes the host asked to keep (RowStore)
        # Verification services (docs/verification.md), set by the node when it has them:
        # kind -> async (peer id, StageFrame) -> reply Frame. VERIFY: re-execute spot checks (a validator);
        # VALIDATION_ASK: request ERC-8004 validation of this node's work (a node with an owner key).
        self.services: dict[int, Callable[[str, pb.StageFrame], Awaitable[pb.Frame]]] = {}
        self.on_receipt: Callable[[str], None] | None = None  # called with the entry's node id per signed receipt
        # the first remote stage's audit of the entry's stage 0 (serving.first_stage_audit), set under --quorum:
        # (the entry's stage-0 receipt, its signed stage-0 terms (JSON), the steps received, whether a prefix was
        # restored)
        self.on_first_stage: Callable[[dict[str, Any], str, list[dict[str, Any]], bool], None] | None = None
        # Escrow vouchers (serving.work_pay), set by the node that is paid by them: every session must carry
        # pay terms for this stage in its grant, and the entry must keep its vouchers up (else `unpaid`).
        self.pay: WorkerPay | None = None
        self.payer_of: PayerOf | None = None  # host node id -> the wallet it announces on this escrow

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---------------------------------------------------------------- plan assignment
    async def assign(self, sf: pb.StageFrame, peer: str = "") -> pb.Frame:
        key = StageKey(sf.content_hash, sf.layer_start, sf.layer_end)
        refused = ("not_allowed", "this node accepts no layer assignments") if self.may_assign is None \
            else self.may_assign(peer, sf)
        if inspect.isawaitable(refused):  # the policy may first ask the host to prove it holds the model
            refused = await refused
        if refused is not None:  # checked before anything is stored: a refused epoch poisons nothing
            self.stats.assigns_refused += 1
            log.info("ASSIGN from %s refused: %s", peer[:12], refused[1])
            return error_frame("", refused[1], self.node_id, refused[0])
        current = self.epochs.get(sf.content_hash, 0)
        if sf.plan_epoch < current:
            self.stats.stale_epochs_refused += 1
            return error_frame("", f"stale plan epoch {sf.plan_epoch} < {current}", self.node_id, "stale_epoch")
        self.epochs[sf.content_hash] = sf.plan_epoch
        try:
            await self.ensure_loaded(key, assigner=peer)
        except Exception as e:
            log.exception("loading stage %s failed", key)
            return error_frame("", f"cannot load layers [{key.start}, {key.end}): {e}", self.node_id, "load_failed")
        self._drop_unused(key)
        return stage_frame(K.STAGE_KIND_READY, model_id=sf.model_id, content_hash=sf.content_hash,
                           plan_epoch=sf.plan_epoch, layer_start=key.start, layer_end=key.end)

    def _drop_unused(self, keep: StageKey) -> None:
        """Other ranges of the same model that no session uses go when a new one is assigned: repeated
        assignments cannot pile up engines (ranges still serving sessions stay until those end)."""
        for key in [k for k in self.engines if k.content_hash == keep.content_hash and k != keep]:
            if not self.sessions.get(key):
                self.drop(key)

    async def ensure_loaded(self, key: StageKey, assigner: str = "") -> Any:
        """Load a range; `assigner` is the host that may grant sessions on it."""
        self.assigners[key] = assigner
        if key in self.engines:
            return self.engines[key]
        fut = self._loading.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._run(self.loader, key.content_hash, key.start, key.end))
            self._loading[key] = fut
        try:
            engine = await fut
        finally:
            self._loading.pop(key, None)
        self.engines[key] = engine
        return engine

    def drop(self, key: StageKey) -> None:
        self.engines.pop(key, None)
        self.batchers.pop(key, None)
        self.assigners.pop(key, None)

    # ---------------------------------------------------------------- streams
    async def handle(self, peer_id: str, link: Link) -> None:
        """Entry point for one STAGE stream from a peer (at most MAX_STREAMS_PER_PEER at once)."""
        if self.streams.get(peer_id, 0) >= MAX_STREAMS_PER_PEER:
            self.stats.streams_refused += 1
            await link.send(error_frame("", "too many open stage streams from this peer", self.node_id, "busy"))
            return
        self.streams[peer_id] = self.streams.get(peer_id, 0) + 1
        try:
            await self._handle(peer_id, link)
        finally:
            self.streams[peer_id] -= 1
            if not self.streams[peer_id]:
                del self.streams[peer_id]

    async def _handle(self, peer_id: str, link: Link) -> None:
        try:
            frame = await link.recv(self.open_timeout)
        except asyncio.TimeoutError:
            return
        if frame is None:
            return
        if frame.WhichOneof("body") != "stage":
            await link.send(error_frame("", "expected a stage frame", self.node_id, "protocol"))
            return
        sf = frame.stage
        if sf.kind == K.STAGE_KIND_ASSIGN:
            await link.send(await self.assign(sf, peer_id))
        elif sf.kind == K.STAGE_KIND_OPEN:
            await self._session(peer_id, link, sf)
        elif sf.kind in self.services:
            try:
                await link.send(await self.services[sf.kind](peer_id, sf))
            except Exception as e:  # a service failure is the asker's answer, never this node's crash
                log.warning("stage service %s for %s failed: %s", sf.kind, peer_id[:12], e)
                await link.send(error_frame(sf.request_id, f"{type(e).__name__}: {e}", self.node_id, "service"))
        else:
            await link.send(error_frame(sf.request_id, f"stream must start with OPEN or ASSIGN, got kind {sf.kind}",
                                        self.node_id, "protocol"))

    def _check_open(self, peer: str, open_: pb.StageFrame, key: StageKey) -> tuple[Any, list[Hop]]:
        """The OPEN's grant and the rest of the chain after this stage; StageError when the session is not
        the assigning host's, not for this range, not from the stage before this one, or a replay."""
        grant, host = OpenGrant.verify(open_.params)
        if host != self.assigners.get(key):
            raise StageError(f"layers [{key.start}, {key.end}) were not assigned here by {host[:12]}", code="not_host")
        here = next((i for i, h in enumerate(grant.hops) if (h.node, h.start, h.end) == (self.node_id, key.start, key.end)),
                    None)
        if (here is None or grant.request_id != open_.request_id or grant.content_hash != key.content_hash
                or grant.epoch != open_.plan_epoch):
            raise StageError("the OPEN does not match its grant", code="bad_grant")
        upstream = host if here == 0 else grant.hops[here - 1].node
        if peer != upstream:
            raise StageError(f"OPEN for this stage must come from {upstream[:12]}, not {peer[:12]}", code="bad_grant")
        once = grant.nonce  # the host re-opens a request (failover, cold prefix) with a new grant
        if once in self._recent:
            raise StageError(f"session {grant.request_id[:16]} was already opened", code="duplicate_session")
        self._recent[once] = None
        while len(self._recent) > RECENT_REQUESTS:
            del self._recent[next(iter(self._recent))]
        return grant, list(grant.hops[here + 1:])

    async def _session(self, peer: str, up: Link, open_: pb.StageFrame) -> None:
        rid = open_.request_id
        key = StageKey(open_.content_hash, open_.layer_start, open_.layer_end)
        engine = self.engines.get(key)
        if engine is None:
            self.stats.sessions_refused += 1
            await up.send(error_frame(rid, f"layers [{key.start}, {key.end}) of {open_.model_id} are not assigned here",
                                      self.node_id, "not_assigned"))
            return
        if open_.plan_epoch < self.epochs.get(key.content_hash, 0):
            self.stats.stale_epochs_refused += 1
            await up.send(error_frame(rid, f"stale plan epoch {open_.plan_epoch}", self.node_id, "stale_epoch"))
            return
        try:
            grant, chain = self._check_open(peer, open_, key)
            pay_key = await self._admit_pay(grant, open_, self.assigners.get(key, peer))
        except StageError as e:
            self.stats.opens_refused += 1
            log.info("OPEN from %s refused: %s", peer[:12], e)
            await up.send(error_frame(rid, str(e), self.node_id, e.code))
            return
        up.entitle()  # a session of the elected host's: its activations are work, not chatter
        from mesh402.engine import (
            EngineError,  # engine types only when a session really starts
        )  # lazy: loads gguf, numpy, torch only when needed

        try:
            session = await self._run(engine.new_session, grant.max_len)
        except (EngineError, ValueError, KeyError) as e:
            self.stats.sessions_refused += 1
            await up.send(error_frame(rid, f"stage cannot open the session: {e}", self.node_id, "stage_full"))
            return
        self.sessions[key] = self.sessions.get(key, 0) + 1
        down: Link | None = None
        try:
            draw = None
            if engine.stages[-1].last:
                draw = await self._draw(engine, grant.sampling)
            if chain:
                down = await self._open_next(open_, chain[0])
            self.stats.sessions_opened += 1
            await up.send(stage_frame(K.STAGE_KIND_RESULT, request_id=rid, plan_epoch=open_.plan_epoch))
            tally = None
            if grant.receipts:  # the entry wants a signed work receipt per stage
                from mesh402.work.receipts import StageTally  # lazy: kept off this module's import path
                tally = StageTally(rid, open_.content_hash, open_.layer_start, open_.layer_end, keep=True)
                tally.sampling = grant.sampling if draw is not None else ""
            await self._serve_steps(up, down, engine, session, draw, rid, chain[0].node if chain else "", tally,
                                    pay_key, self._batcher(key, engine))
        except StageError as e:
            await up.send(error_frame(rid, str(e), e.node or self.node_id, e.code))
        except EngineError as e:  # a step the session cannot take (past its max_len, closed): the sender's error
            await up.send(error_frame(rid, f"stage cannot run the step: {e}", self.node_id, "protocol"))
        except (ConnectionError, asyncio.TimeoutError, OSError, ValueError, TypeError) as e:
            log.info("session %s ended: %s", rid, e)
        finally:
            self.sessions[key] -= 1
            if key in self.batchers:
                self.batchers[key].leave(session)
            if pay_key and self.pay is not None:
                self.pay.close(pay_key)
            self.executor.submit(session.close)
            if down is not None:
                try:
                    await down.finish()
                except Exception:
                    pass

    async def _admit_pay(self, grant: OpenGrant, open_: pb.StageFrame, host: str) -> str:
        """The session's key in the worker's pay book ('' when this stage is not paid by vouchers); raises
        StageError `unpaid` when the grant names no terms for this stage, names a payer other than the wallet its
        host announces (a host could otherwise run work on another entry's float and leave that entry behind
        here), or the entry cannot pay now."""
        if self.pay is None:
            return ""
        terms = grant.pay.get(self.node_id)
        if terms is None:
            raise StageError("this stage is paid by escrow vouchers: the grant names no pay terms for it",
                             code="unpaid")
        why = payer_refusal(self.payer_of, host, terms.payer, "the grant names payer")
        if why is not None:
            raise StageError(why, node=self.node_id, code="unpaid")
        try:
            mine = (pay_map(open_.params.get(PAY_PARAM)) or {}).get(self.node_id)
        except ValueError as e:
            raise StageError(str(e), code="unpaid") from None
        why = await self.pay.open(grant.nonce, terms, mine)
        if why is not None:
            raise StageError(why, node=self.node_id, code="unpaid")
        return grant.nonce

    async def _take_pay(self, pay_key: str, sf: pb.StageFrame, n_real: int | None) -> None:
        """Keep this stage's voucher from a frame and account a step of `n_real` rows (None: CLOSE, no
        step); StageError `unpaid` when the entry fell behind."""
        if not pay_key or self.pay is None:
            return
        try:
            got = pay_map(sf.params.get(PAY_PARAM))
        except ValueError as e:
            raise StageError(str(e), node=self.node_id, code="unpaid") from None
        why = await self.pay.vouchers(pay_key, got, self.node_id)
        if why is None and n_real is not None:
            why = self.pay.step(pay_key, n_real)
        if why is not None:
            raise StageError(why, node=self.node_id, code="unpaid")

    async def _draw(self, engine: Any, sampling: str) -> "Draw":
        """How this (last) stage draws the session's tokens, from the grant's sampling JSON: the sampler, a
        grammar matcher (compiled here from the spec, on the engine thread) and the logprobs to return."""
        from mesh402.engine.grammar import GrammarError  # lazy: loads gguf, numpy, torch only when needed
        from mesh402.engine.sampling import Sampler, parse_decoding  # lazy: loads gguf, numpy, torch only when needed

        try:
            params, spec, top = parse_decoding(json.loads(sampling))
        except ValueError as e:
            raise StageError(f"bad sampling in the grant: {e}", code="bad_grant") from None
        matcher = None
        if spec:
            try:
                matcher = await self._run(lambda: engine.grammar_compiler().from_spec(spec).matcher())
            except (GrammarError, OSError) as e:
                raise StageError(f"cannot build the session's grammar: {e}", code="bad_grammar") from None
        return Draw(Sampler(params), matcher, top)

    async def _prefix_op(self, up: Link, down: Link | None, engine: Any, session: Any, sf: pb.StageFrame,
                         history: list[int], tally: Any = None) -> None:
        """`store`: keep this session's rows [0, n) under the host's key (no reply). `restore`: put them
        into this still-empty session; the last stage answers whether every stage had them."""
        from mesh402.engine.prefix import RowStore, copy_rows, load_rows, rows_nbytes  # lazy: loads gguf, numpy, torch only when needed

        if self.prefix_rows is None:
            self.prefix_rows = RowStore(max_entries=16)
        op, n = sf.params.get("op"), int(sf.params.get("n", "0") or 0)
        key = (id(engine), tuple(engine.layers), sf.params.get("key", ""))
        if op == "store":
            if 0 < n <= len(session):
                rows = await self._run(copy_rows, session, n)
                # the steps that built these rows go with them: a later request's reveal replays them
                records = [r for r in (tally.prefix_records + tally.records) if r["pos"] < n] if tally else []
                self.prefix_rows.put(key, (rows, records), rows_nbytes(rows) + sum(len(r["data"]) for r in records))
            if down is not None:
                await down.send(stage_frame(sf.kind, request_id=sf.request_id, plan_epoch=sf.plan_epoch,
                                            params=dict(sf.params)))
            return
        kept = self.prefix_rows.get(key) if op == "restore" else None
        rows, records = kept if kept is not None else (None, [])
        # a paid session must be able to reveal from position 0: rows kept by an unpaid one come without
        # the steps that built them, so they are not reused (the request runs cold instead)
        ok = (sf.params.get("ok") == "1" and rows is not None and len(session) == 0 and n > 0
              and (tally is None or bool(records)))
        if ok:
            await self._run(load_rows, session, rows, n)
            if tally is not None:
                tally.prefix_records = list(records)
        if down is None:
            if ok:
                history.extend(sf.tokens[:n])
            await up.send(stage_frame(K.STAGE_KIND_RESULT, request_id=sf.request_id, plan_epoch=sf.plan_epoch,
                                      params={"restored": "1" if ok else "0"}))
            return
        await down.send(stage_frame(sf.kind, request_id=sf.request_id, plan_epoch=sf.plan_epoch, tokens=list(sf.tokens),
                                    params={**dict(sf.params), "ok": "1" if ok else "0"}))
        reply = await down.recv(self.step_timeout)
        if reply is None:
            raise StageError("next stage closed during a prefix restore", code="unreachable")
        await up.send(reply)

    async def _close_receipts(self, up: Link, down: Link | None, close: pb.StageFrame, tally: Any,
                              engine: Any) -> None:
        """Sign this stage's receipt after those of the stages before it (carried by CLOSE), pass CLOSE on,
        and send the whole chain of receipts back up (what the next stage returned, else ours). When the
        entry audits the request, CLOSE names the step (`reveal`) and each stage adds its evidence."""
        rid = close.request_id
        try:
            chain = list(json.loads(close.params.get("receipts", "[]")))
            evidence = list(json.loads(close.params.get("evidence", "[]")))
            if self.on_first_stage is not None and len(chain) == 1 and tally is not None:
                # the first remote stage: the entry's own stage 0 is audited from what arrived here
                self.on_first_stage(chain[0], close.params.get("stage0_terms", ""), list(tally.records),
                                    bool(tally.prefix_records))
            if self.signer is not None:
                prev = Receipt.from_json(chain[-1]).digest if chain else ""
                chain.append(tally.receipt(self.signer, len(chain), prev).to_json())
                if self.on_receipt is not None and len(chain) > 1:
                    self.on_receipt(str(chain[0]["node_id"]))
                if close.params.get("reveal", "") != "":
                    from mesh402.engine.replay import device_signature  # lazy: loads gguf, numpy, torch only when needed
                    ev = reveal(tally, int(close.params["reveal"]), len(chain) - 1, self.signer.node_id_hex,
                                engine.stages[0].mode,
                                last=down is None, device=device_signature(engine.device))
                    evidence.append(sign_reveal(self.signer, ev))
        except (ValueError, TypeError, KeyError) as e:
            log.info("session %s: bad receipts or reveal on CLOSE: %s", rid, e)
            return
        params = {"receipts": dump_json(chain), "evidence": dump_json(evidence)}
        if down is not None:
            try:
                await down.send(stage_frame(K.STAGE_KIND_CLOSE, request_id=rid,
                                            params={**params, "reveal": close.params.get("reveal", ""),
                                                    **_pass_pay(close)}))
                rs = expect_stage(await down.recv(self.open_timeout), K.STAGE_KIND_RESULT, "receipts")
                if json.loads(rs.params.get("receipts", "[]")):
                    params = {"receipts": rs.params["receipts"], "evidence": rs.params.get("evidence", "[]")}
            except Exception as e:  # the next stage is gone: its receipt is missing, ours still goes up
                log.info("session %s: no receipts from the next stage: %s", rid, e)
        await up.send(stage_frame(K.STAGE_KIND_RESULT, request_id=rid, params=params))

    async def _open_next(self, open_: pb.StageFrame, nxt: Hop) -> Link:
        try:
            down = await self.connect(nxt.node)
        except Exception as e:
            raise StageError(f"cannot reach next stage {nxt.node[:12]}: {e}", node=nxt.node, code="unreachable") from None
        fwd = {k: open_.params[k] for k in ("grant", "host", "sig")}  # the host's grant, passed on as signed
        fwd.update(_pass_pay(open_))
        await down.send(stage_frame(K.STAGE_KIND_OPEN, request_id=open_.request_id, plan_epoch=open_.plan_epoch,
                                    model_id=open_.model_id, content_hash=open_.content_hash,
                                    layer_start=nxt.start, layer_end=nxt.end, params=fwd))
        try:
            expect_stage(await down.recv(self.open_timeout), K.STAGE_KIND_RESULT, f"stage {nxt.node[:12]}")
        except asyncio.TimeoutError:
            raise StageError(f"next stage {nxt.node[:12]} did not answer OPEN", node=nxt.node, code="timeout") from None
        return down

    def _batcher(self, key: StageKey, engine: Any) -> RowBatcher | None:
        """The range's row batcher (None: batching off, or an engine without batched forwards)."""
        if self.max_batch < 2 or not hasattr(engine, "forward_batch"):
            return None
        if key not in self.batchers:
            self.batchers[key] = RowBatcher(engine, self.executor, max_batch=self.max_batch, here_s=self.here_s)
        return self.batchers[key]

    async def _serve_steps(self, up: Link, down: Link | None, engine: Any, session: Any, draw: "Draw | None",
                           rid: str, next_node: str, tally: Any = None, pay_key: str = "",
                           rows: RowBatcher | None = None) -> None:
        from mesh402.engine.activations import activation_hash, decode_activations  # lazy: loads gguf, numpy, torch only when needed

        history: list[int] = []
        # the last stage commits to a fingerprint of its logits per step (docs/verification.md)
        fp_ids = fingerprint_ids(rid, engine.config.vocab_size) if tally is not None and down is None else None
        while True:
            try:
                frame = await up.recv(self.idle_timeout)
            except asyncio.TimeoutError:  # a silent upstream does not hold KV forever
                self.stats.sessions_idle_closed += 1
                log.info("session %s: upstream silent for %.0f s, closed", rid, self.idle_timeout)
                return
            if frame is None:
                return
            sf = stage_body(frame, "upstream")
            mark(STAGE_RECV, rid, sf.position)
            if sf.kind == K.STAGE_KIND_CLOSE:
                try:  # the final voucher: a refusal only means the entry stays behind (the next OPEN sees it)
                    await self._take_pay(pay_key, sf, None)
                except StageError as e:
                    log.info("session %s: final voucher refused: %s", rid, e)
                if tally is not None:
                    await self._close_receipts(up, down, sf, tally, engine)
                elif down is not None and PAY_PARAM in sf.params:  # the next stages' final vouchers
                    await down.send(stage_frame(K.STAGE_KIND_CLOSE, request_id=rid, params=_pass_pay(sf)))
                return
            if sf.kind not in (K.STAGE_KIND_PREFILL, K.STAGE_KIND_DECODE):
                raise StageError(f"unexpected stage kind {sf.kind} in a session", code="protocol")
            if sf.params.get("op"):  # KV prefix reuse: keep or restore rows (no activations)
                await self._prefix_op(up, down, engine, session, sf, history, tally)
                continue
            n_real = int(sf.params.get("n_real", len(sf.tokens)))
            await self._take_pay(pay_key, sf, n_real)
            self.stats.bytes_in += len(sf.activations)
            try:
                x = decode_activations(sf.activations, list(sf.shape), sf.dtype)
            except ValueError as e:
                raise StageError(str(e), node=self.node_id, code="bad_activations") from None
            if sf.kind == K.STAGE_KIND_DECODE and sf.params.get("draft") == "1":
                await self._draft_step(up, down, engine, session, draw, rid, next_node, tally, sf, x, history, fp_ids)
                continue
            if down is None:
                history.extend(sf.tokens[:n_real])
                if draw is not None and sf.kind == K.STAGE_KIND_DECODE:
                    for t in sf.tokens[:n_real]:
                        draw.take(int(t))
            sample = draw if down is None and sf.params.get("sample") == "1" else None
            # One engine-thread call per step (forward, then sample or encode): every extra hand-off
            # between the loop and the engine thread is a thread wake-up on the per-token path.
            wire = None if down is None else sf.dtype
            mark(STAGE_RUN, rid, sf.position)
            if rows is not None and sf.kind == K.STAGE_KIND_DECODE and n_real == 1 and x.shape[0] == 1 \
                    and sf.position == len(session):
                # a decode row: shares one forward with the other sessions' rows waiting here (each row's
                # output bit-identical to this forward alone), then finished for this session only
                token, payload, shape, fp, lp = await rows.step(
                    session, x, lambda out: _finish(out, sample, history, wire, fp_ids))
            else:
                token, payload, shape, fp, lp = await self._run(_step, session, x, sf.position, n_real, sample,
                                                                history, wire, fp_ids)
            mark(STAGE_DONE, rid, sf.position)
            self.stats.steps += 1
            in_hash = activation_hash(sf.activations)
            if tally is not None:
                record = {"kind": int(sf.kind), "pos": int(sf.position), "n_real": n_real, "dtype": sf.dtype,
                          "shape": list(sf.shape), "data": sf.activations, "tokens": [int(t) for t in sf.tokens[:n_real]]}
                out = activation_hash(payload) if payload is not None else last_step_hash(token, fp or b"", lp)
                tally.step(n_real, in_hash, out, record, fp, token, lp)
            if down is None:
                reply = stage_frame(K.STAGE_KIND_RESULT, request_id=rid, plan_epoch=sf.plan_epoch,
                                    position=sf.position, input_hash=in_hash, params={"lp": lp.decode()} if lp else None)
                if token is not None:
                    reply.stage.tokens.append(token)
                mark(STAGE_SEND, rid, sf.position)
                await up.send(reply)
                continue
            t0 = time.monotonic()
            reply, rs = await self._pass_down(down, next_node, rid, sf, payload, shape)
            rs.activation_hashes.append(in_hash)  # chain of commitments, nearest stage last
            log.debug("hop %s took %.2f ms", next_node[:8], (time.monotonic() - t0) * 1000)
            mark(STAGE_SEND, rid, sf.position)
            await up.send(reply)

    async def _pass_down(self, down: Link, next_node: str, rid: str, sf: pb.StageFrame, payload: bytes,
                         shape: list[int]) -> tuple[pb.Frame, pb.StageFrame]:
        """Send this stage's output of step `sf` to the next stage, under the session's own request id `rid`;
        its RESULT (frame, stage body)."""
        from mesh402.engine.activations import activation_hash  # lazy: loads gguf, numpy, torch only when needed

        fwd = stage_frame(sf.kind, request_id=rid, plan_epoch=sf.plan_epoch, position=sf.position,
                          tokens=list(sf.tokens), dtype=sf.dtype, shape=shape, activations=payload,
                          input_hash=activation_hash(payload), params=dict(sf.params))
        self.stats.bytes_out += len(payload)
        self.stats.by_link[next_node] = self.stats.by_link.get(next_node, 0) + len(payload)
        await down.send(fwd)
        try:
            reply = await down.recv(self.step_timeout)
        except asyncio.TimeoutError:
            raise StageError(f"next stage {next_node[:12]} timed out", node=next_node, code="timeout") from None
        except Exception as e:
            raise StageError(f"next stage {next_node[:12]} failed: {e}", node=next_node, code="unreachable") from None
        return reply, expect_stage(reply, K.STAGE_KIND_RESULT, f"stage {next_node[:12]}")

    async def _draft_step(self, up: Link, down: Link | None, engine: Any, session: Any, draw: "Draw | None",
                          rid: str, next_node: str, tally: Any, sf: pb.StageFrame, x: Any, history: list[int],
                          fp_ids: list[int] | None) -> None:
        """A speculative step: the sampled token and its drafts as adjacent rows of this session, each computed
        as a 1-row decode computes it (Engine.forward_session_rows). The last stage draws each position as plain
        decoding would and stops at the first draw that differs from the next draft; its reply names the
        tokens drawn, and every stage keeps only the rows before that point: its KV is rolled back and its
        tally records one 1-row decode step per kept row, the very steps (inputs, outputs, tokens) plain
        decoding would have recorded, so receipts, reveals and replays see no difference."""
        from mesh402.engine.activations import activation_hash, encode_activations  # lazy: loads gguf, numpy, torch only when needed

        tokens = [int(t) for t in sf.tokens]
        n = len(tokens)
        pos = int(sf.position)
        if not (2 <= n <= MAX_DRAFT_ROWS and int(sf.params.get("n_real", n)) == n and x.shape[0] == n
                and pos == len(session) and sf.params.get("sample") == "1"):
            raise StageError(f"a draft step is 2..{MAX_DRAFT_ROWS} rows, one token each, sampled, at the session's "
                             f"next position {len(session)}", code="protocol")
        if down is None and draw is None:
            raise StageError("draft rows need a sampled session", code="protocol")
        ins = _rows_of(sf.activations, n)
        try:
            out = await self._run(engine.forward_session_rows, session, x)
        except ValueError as e:
            raise StageError(str(e), node=self.node_id, code="bad_activations") from None
        self.stats.steps += 1
        hidden = [1, int(sf.shape[1])]

        def record(i: int) -> dict[str, Any]:
            return {"kind": int(sf.kind), "pos": pos + i, "n_real": 1, "dtype": sf.dtype, "shape": hidden,
                    "data": ins[i], "tokens": [tokens[i]]}

        if down is None:
            drawn = await self._run(_draw_rows, out, draw, history, tokens, fp_ids)
            await self._run(session.truncate, pos + len(drawn))
            for i, (token, fp, lp) in enumerate(drawn):
                if tally is not None:
                    tally.step(1, activation_hash(ins[i]), last_step_hash(token, fp or b"", lp), record(i), fp, token,
                               lp)
            lps = [lp.decode() for _, _, lp in drawn]  # each kept row's logprobs (JSON), when the session asks
            reply = stage_frame(K.STAGE_KIND_RESULT, request_id=rid, plan_epoch=sf.plan_epoch, position=pos,
                                input_hash=activation_hash(sf.activations),
                                params={"lps": "[" + ",".join(lps) + "]"} if any(lps) else None)
            reply.stage.tokens.extend(t for t, _, _ in drawn)
            await up.send(reply)
            return
        payload, shape = await self._run(encode_activations, out, sf.dtype)
        reply, rs = await self._pass_down(down, next_node, rid, sf, payload, shape)
        kept = len(rs.tokens)
        if not 1 <= kept <= n:
            raise StageError(f"next stage {next_node[:12]} answered a {n}-row draft step with {kept} tokens",
                             node=next_node, code="bad_output")
        await self._run(session.truncate, pos + kept)
        outs = _rows_of(payload, n)
        if tally is not None:
            for i in range(kept):
                tally.step(1, activation_hash(ins[i]), activation_hash(outs[i]), record(i))
        rs.activation_hashes.append(activation_hash(sf.activations))
        await up.send(reply)


def _rows_of(payload: bytes, n: int) -> list[bytes]:
    """A wire payload of n rows cut into the payloads of its rows (row-major: a row's bytes are its encoding)."""
    w = len(payload) // n
    return [payload[i * w:(i + 1) * w] for i in range(n)]


def _draw_rows(out: Any, draw: "Draw", history: list[int], tokens: list[int], fp_ids: list[int] | None
               ) -> list[tuple[int, bytes | None, bytes]]:
    """Engine thread: draw each draft row's position as plain decoding draws it (the fed token joins the
    history, and the grammar's state, first), up to the first draw that differs from the next draft or ends
    the grammar; (token, fingerprint, logprobs JSON or b"") per kept row."""
    drawn: list[tuple[int, bytes | None, bytes]] = []
    m = draw.matcher
    for i, fed in enumerate(tokens):
        draw.take(fed)
        history.append(fed)
        token, _, _, fp, lp = _finish(out[i], draw, history, None, fp_ids)
        assert token is not None
        drawn.append((token, fp, lp))
        if i + 1 == len(tokens) or token != tokens[i + 1] or (m is not None and token in m.grammar.eos_ids):
            break
    return drawn


def _pass_pay(sf: pb.StageFrame) -> dict[str, str]:
    """The `pay` param to pass on to the next stage (the entry's vouchers for the stages after this one)."""
    return {PAY_PARAM: sf.params[PAY_PARAM]} if PAY_PARAM in sf.params else {}


@dataclass
class Draw:
    """How the last stage draws a session's tokens: its sampler, the grammar matcher that masks the draw
    (advanced by the generated tokens the host sends back as decode inputs) and the logprobs to return
    (None: none; else this many alternatives)."""

    sampler: Any  # engine.sampling.Sampler
    matcher: Any = None  # engine.grammar.Matcher
    top_logprobs: int | None = None

    def take(self, token: int) -> None:
        """A decode step's input, the token generated last: the grammar state follows it (a token the grammar
        forbids is the host's error)."""
        if self.matcher is not None and not self.matcher.accept(token):
            raise StageError(f"the host sent token {token}, which the grammar forbids", code="protocol")


def _step(session: Any, x: Any, position: int, n_real: int, draw: Draw | None, history: list[int],
          wire: str | None, fp_ids: list[int] | None = None
          ) -> tuple[int | None, bytes | None, list[int] | None, bytes | None, bytes]:
    """One stage step on the engine thread: (sampled token, None, None, fp, logprobs) on the last stage when
    asked to sample, (None, payload, shape, None, b"") on a middle stage, else (None, None, None, fp, b"").
    `fp` is the logits fingerprint the last stage commits to when `fp_ids` is given; `logprobs` the
    canonical JSON of the drawn token's logprobs when the session asks for them (b"" otherwise)."""
    return _finish(session.forward(x, position, n_real), draw, history, wire, fp_ids)


def _finish(out: Any, draw: Draw | None, history: list[int], wire: str | None, fp_ids: list[int] | None
            ) -> tuple[int | None, bytes | None, list[int] | None, bytes | None, bytes]:
    """A step's output made into its answer (see _step), on the engine thread."""
    fp = None
    if fp_ids is not None:
        from mesh402.engine.replay import fingerprint  # lazy: loads gguf, numpy, torch only when needed

        fp = fingerprint(out, fp_ids)
    if draw is not None:
        from mesh402.engine.sampling import logprob_bytes, token_logprobs  # lazy: loads gguf, numpy, torch only when needed

        allowed = draw.matcher.allowed() if draw.matcher is not None else None
        token = int(draw.sampler.sample(out, history, len(history), allowed=allowed))
        lp = logprob_bytes(token_logprobs(out, token, draw.top_logprobs)) if draw.top_logprobs is not None else b""
        return token, None, None, fp, lp
    if wire is not None:
        from mesh402.engine.activations import encode_activations  # lazy: loads gguf, numpy, torch only when needed

        payload, shape = encode_activations(out, wire)
        return None, payload, shape, None, b""
    return None, None, None, fp, b""
