"""The host side of a pipeline split: stage 0 runs here, the rest on a chain of remote stages.

The host's session owns everything needed to rebuild the remote state: the activations it sent
for every step, with the original step boundaries (fixed prefill chunks, then single decode
steps). When a stage dies mid-generation the host asks for a replacement chain and replays those
frames, so the rebuilt KV is bit-identical and generation continues where it stopped; tokens
already streamed are never sent again (the generation loop only sees the next token).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mesh402.serving.generation import NO_CONSTRAINTS, Constraints
from mesh402.serving.hop_trace import HOST_RECV, HOST_SEND, mark
from mesh402.serving.speculative import DraftPolicy
from mesh402.serving.stage_batch import RowBatcher
from mesh402.serving.stage_link import (
    RECOVERABLE_CODES,
    Hop,
    K,
    Link,
    OpenGrant,
    StageError,
    dump_json,
    expect_stage,
    is_link_failure,
    stage_frame,
)
from mesh402.serving.work_pay import PAY_PARAM, EntrySessionPay, VoucherSigner, WorkTerms
from mesh402.work.receipts import Receipt, bound_chain
from mesh402.work.store import kept

log = logging.getLogger(__name__)

MAX_SLOW_EXTENSIONS = 12  # deadlines a step may overrun while every stage still answers pings


@dataclass(frozen=True)
class Chain:
    """A plan as the host uses it: its own layer range, then the remote hops, for one plan epoch."""

    model_id: str
    content_hash: str
    epoch: int
    local_end: int
    hops: tuple[Hop, ...]


class Failover:
    """What the node gives a pipeline so it can survive a dead stage (all of it I/O the node owns)."""

    async def alive(self, node: str) -> bool:
        """Probe a node (a ping off the compute thread); False when it does not answer."""
        raise NotImplementedError

    async def replace(self, chain: Chain, dead: set[str]) -> Chain:
        """A chain without the dead nodes, with the same host range; raises StageError if none."""
        raise NotImplementedError


@dataclass
class StepTimer:
    """Per-step deadline adapted to measured step time: slow steps under load do not look like death."""

    floor_s: float = 5.0
    factor: float = 10.0
    ema_s: float | None = None

    def observe(self, seconds: float) -> None:
        self.ema_s = seconds if self.ema_s is None else 0.8 * self.ema_s + 0.2 * seconds

    @property
    def deadline(self) -> float:
        return max(self.floor_s, self.factor * (self.ema_s or 0.0))


@dataclass
class PipelineStats:
    steps: int = 0
    failovers: int = 0
    replayed_steps: int = 0
    replayed_tokens: int = 0
    bytes_sent: int = 0


class PipelineModel:
    """A split model as its host sees it: the local stage-0 engine plus the current chain."""

    def __init__(self, engine0: Any, chain: Chain, connect: Callable[[str], Awaitable[Link]], failover: Failover,
                 executor: ThreadPoolExecutor, *, wire_dtype: str = "f32", open_timeout: float = 60.0,
                 timer: StepTimer | None = None, signer: Any = None,
                 receipt_sink: Callable[..., Any] | None = None, auditor: Any = None, max_batch: int = 8,
                 speculative_k: int = 0) -> None:
        self.engine0 = engine0
        # Speculative decoding through the chain: up to this many prompt-lookup drafts ride each decode step
        # as extra rows, so one round trip through the stages can yield several tokens (PipelineStepper._draft).
        self.speculative_k = speculative_k
        # Requests' decode rows on the host's stage run as one forward (serving.stage_batch), so they leave
        # for the next stage together and the stages batch them too; 1: each request's step alone.
        self.rows = RowBatcher(engine0, executor, max_batch=max_batch) \
            if max_batch > 1 and hasattr(engine0, "forward_batch") else None
        # Work receipts: with a signer (this node's NodeIdentity) and a sink, every stage signs a receipt per
        # request and the chain of them is handed to receipt_sink (mesh402.work.receipts) on release.
        self.signer = signer
        self.receipt_sink = receipt_sink
        self.auditor = auditor  # work.evidence.Auditor: which requests' steps the stages reveal
        # Escrow vouchers (serving.work_pay), set by a node that pays its stages from escrow: the terms per
        # remote stage of a chain (stages without terms are not paid by vouchers) and the issuer that signs.
        self.pay_terms: Callable[[Chain], dict[str, WorkTerms]] | None = None
        self.voucher_signer: VoucherSigner | None = None
        self.chain = chain
        self.connect = connect
        self.failover = failover
        self.executor = executor
        self.wire_dtype = wire_dtype
        self.open_timeout = open_timeout
        self.timer = timer or StepTimer()
        self.stats = PipelineStats()
        self.prefix: Any = None  # KV prefix reuse across requests (see PipelineStepper._try_prefix)
        try:
            from mesh402.engine.prefix import RowStore  # lazy: loads gguf, numpy, torch only when needed

            self.prefix = RowStore(max_entries=16)
        except Exception:  # no torch in this process: no reuse
            self.prefix = None

    @property
    def n_ctx(self) -> int:
        return int(self.engine0.info.n_ctx)

    @property
    def engine(self) -> Any:
        """The host's stage-0 engine: tokenizer, chat template and model facts for the API."""
        return self.engine0

    @property
    def tokenizer(self) -> Any:
        return self.engine0.tokenizer

    @property
    def eos_ids(self) -> list[int]:
        return list(self.engine0.eos_token_ids)

    async def open(self, max_len: int, sampling: Any, request_id: str = "",
                   constraints: Constraints = NO_CONSTRAINTS) -> "PipelineStepper":
        loop = asyncio.get_running_loop()
        session = await loop.run_in_executor(self.executor, self.engine0.new_session, max_len)
        stepper = PipelineStepper(self, session, sampling, max_len, request_id or uuid.uuid4().hex,
                                  constraints=constraints)
        if constraints.grammar is not None:  # the host's own matcher, in step with the tokens the last stage draws
            stepper.matcher = constraints.grammar.matcher()
        if self.speculative_k > 0:
            stepper.drafts = DraftPolicy.for_engine(self.speculative_k, self.engine0)
        if self.signer is not None and self.receipt_sink is not None:
            from mesh402.work.receipts import StageTally  # lazy: kept off this module's import path
            stepper.tally = StageTally(stepper.request_id, self.chain.content_hash, 0, self.chain.hops[0].start)
        try:
            await stepper.connect_chain()
        except BaseException:
            stepper.release()
            raise
        return stepper


@dataclass
class _Sent:
    """One step as sent to the first remote stage: replayed verbatim after a failover."""

    kind: int
    position: int
    tokens: list[int]
    n_real: int
    payload: bytes
    shape: list[int]
    sample: bool
    draft: bool = False  # the token and its drafts as adjacent rows (never kept in `sent`: its kept rows are)


@dataclass
class PipelineStepper:
    model: PipelineModel
    session: Any  # stage-0 engine session
    sampling: Any
    max_len: int
    request_id: str
    cached_tokens: int = 0
    chain: Chain | None = None
    link: Link | None = None
    sent: list[_Sent] = field(default_factory=list)
    tally: Any = None  # work.receipts.StageTally of the local stage, when receipts are on
    constraints: Constraints = NO_CONSTRAINTS
    matcher: Any = None  # engine.grammar.Matcher over the tokens accepted from the last stage
    logprob: Any = None  # engine.sampling.TokenLogprob of the token returned last (logprobs asked)
    steps_done: int = 0  # steps the current chain processed for this request (what a reveal may name)
    _released: bool = False
    _closing: asyncio.Task | None = None  # closing the chain, receipts included (release)
    _store: tuple | None = None  # (aligned prompt tokens, n): kept for later requests on release
    pay: EntrySessionPay | None = None  # what this request owes its stages, and the vouchers for it
    drafts: DraftPolicy | None = None  # speculative decoding on: how many drafts ride a step
    history: list[int] = field(default_factory=list)  # prompt and fed tokens: where drafts are looked up
    drafted: int = 0  # drafts sent / accepted (benchmarks)
    accepted: int = 0
    _ahead: list[tuple[int, int, Any]] = field(default_factory=list)  # (token, the one drawn after it, its
    # logprob) already verified

    # ---------------------------------------------------------------- chain management
    async def connect_chain(self) -> None:
        chain = self.model.chain
        first = chain.hops[0]
        if self.model.signer is None:
            raise StageError("a split needs the host's identity to grant sessions to its stages", code="no_plan")
        terms = self.model.pay_terms(chain) if self.model.pay_terms and self.model.voucher_signer else {}
        if terms and self.pay is None:
            assert self.model.voucher_signer is not None
            self.pay = EntrySessionPay(self.model.voucher_signer, terms, self.request_id)
        elif self.pay is not None:  # new stage sessions: the old ones are vouchered in full, new ones start
            await asyncio.to_thread(self.pay.reopen, terms)
        link = await self.model.connect(first.node)
        grant = OpenGrant(self.request_id, chain.content_hash, chain.epoch, chain.hops, self.max_len,
                          self.constraints.sampling_json(self.sampling), self.tally is not None, secrets.token_hex(12),
                          terms)
        params = grant.sign(self.model.signer)
        opening = await asyncio.to_thread(self.pay.opening) if self.pay is not None else None
        if opening:  # each stage's current voucher: it sees this entry is not behind
            params[PAY_PARAM] = dump_json(opening)
        await link.send(stage_frame(K.STAGE_KIND_OPEN, request_id=self.request_id, plan_epoch=chain.epoch,
                                    model_id=chain.model_id, content_hash=chain.content_hash,
                                    layer_start=first.start, layer_end=first.end, params=params))
        try:
            expect_stage(await link.recv(self.model.open_timeout), K.STAGE_KIND_RESULT, "first stage")
        except asyncio.TimeoutError:
            raise StageError(f"stage {first.node[:12]} did not answer OPEN", node=first.node, code="timeout") from None
        self.chain, self.link = chain, link

    async def _fail_over(self, cause: Exception) -> None:
        """Find the dead stages, get a replacement chain, replay every step sent so far."""
        assert self.chain is not None
        model = self.model
        hint = getattr(cause, "node", "")
        probes = await asyncio.gather(*(model.failover.alive(h.node) for h in self.chain.hops))
        dead = {h.node for h, ok in zip(self.chain.hops, probes) if not ok}
        if hint and hint in {h.node for h in self.chain.hops} and getattr(cause, "code", "") in (
                "unreachable", "timeout", "bad_output"):
            dead.add(hint)  # bad_output: it answers probes, but it is the stage at fault
        if not dead:
            raise StageError(f"pipeline step failed but every stage answers a probe: {cause}", code="stage_error")
        log.warning("request %s: stage(s) %s down (%s); re-planning", self.request_id,
                    ", ".join(d[:12] for d in dead), cause)
        if self.link is not None:
            try:
                await self.link.reset(1)
            except Exception:
                pass
        model.chain = await model.failover.replace(self.chain, dead)
        await self.connect_chain()
        assert self.link is not None
        t0 = time.monotonic()
        for s in self.sent:  # pipelined: the stages answer in order (and are paid for the replay)
            await self.link.send(self._frame(s, await self._pay_step(s)))
        for s in self.sent:
            expect_stage(await self.link.recv(self.model.open_timeout), K.STAGE_KIND_RESULT, "replay")
        model.stats.failovers += 1
        model.stats.replayed_steps += len(self.sent)
        replayed_tokens = sum(s.n_real for s in self.sent)
        model.stats.replayed_tokens += replayed_tokens
        log.warning("request %s: replayed %d steps (%d tokens) onto epoch %d in %.2fs", self.request_id,
                    len(self.sent), replayed_tokens, model.chain.epoch, time.monotonic() - t0)

    async def _pay_step(self, s: _Sent) -> str | None:
        """Account one step sent to the stages; the vouchers that ride on it (JSON), if any are due. Signing
        (an EIP-712 signature and an fsync'd write per stage) runs off the loop."""
        if self.pay is None or not self.pay.accrue(s.n_real):
            return None
        due = await asyncio.to_thread(self.pay.vouchers)
        return dump_json(due) if due else None

    def _frame(self, s: _Sent, pay: str | None = None) -> Any:
        from mesh402.engine.activations import activation_hash  # lazy: loads gguf, numpy, torch only when needed

        assert self.chain is not None
        params = {"n_real": s.n_real, "sample": "1" if s.sample else "0"}
        if s.draft:
            params["draft"] = "1"
        if pay:
            params[PAY_PARAM] = pay
        return stage_frame(s.kind, request_id=self.request_id, plan_epoch=self.chain.epoch, position=s.position,
                           tokens=s.tokens, dtype=self.model.wire_dtype, shape=s.shape, activations=s.payload,
                           input_hash=activation_hash(s.payload), params=params)

    async def _close_params(self) -> dict[str, str]:
        """CLOSE's final vouchers: everything this request owes each stage (signed off the loop)."""
        final = await asyncio.to_thread(self.pay.vouchers) if self.pay is not None else None
        return {PAY_PARAM: dump_json(final)} if final else {}

    async def _exchange(self, s: _Sent) -> int | None:
        """Send one step and wait for its reply, failing over as often as stages die."""
        token = await self._round_trip(s, self._drawn if s.sample else (lambda rs: None))
        self._commit(s)
        return token

    async def _round_trip(self, s: _Sent, answer: Callable[[Any], Any]) -> Any:
        """`answer(reply)` of one step sent through the chain; a stage that dies or answers badly (`answer`
        raises a recoverable StageError) is replaced and the steps sent so far replayed, as often as needed."""
        while True:
            assert self.link is not None
            pay = await self._pay_step(s)  # again after a failover: the new stage sessions count this step too
            t0 = time.monotonic()
            mark(HOST_SEND, self.request_id, s.position)
            try:
                await self.link.send(self._frame(s, pay))
                for _ in range(MAX_SLOW_EXTENSIONS):
                    try:
                        reply = await self.link.recv(self.model.timer.deadline)
                        break
                    except asyncio.TimeoutError:
                        # Slow or dead? Probe every stage off the compute path before deciding.
                        probes = await asyncio.gather(*(self.model.failover.alive(h.node) for h in self.chain.hops))
                        if not all(probes):
                            raise StageError("a stage stopped answering", code="timeout") from None
                else:  # every stage answers pings but the step never completes: give up, never hang
                    raise StageError("the pipeline step did not complete although every stage is alive",
                                     code="stuck")
                mark(HOST_RECV, self.request_id, s.position)
                rs = expect_stage(reply, K.STAGE_KIND_RESULT, "pipeline")
                value = answer(rs)
            except StageError as e:
                if e.code not in RECOVERABLE_CODES:
                    raise
                await self._fail_over(e)
                continue
            except Exception as e:
                if not is_link_failure(e):
                    raise
                await self._fail_over(e)
                continue
            self.model.timer.observe(time.monotonic() - t0)
            return value

    def _commit(self, s: _Sent) -> None:
        """A step the chain has done and keeps: replayed after a failover, counted in the receipt."""
        self.model.stats.steps += 1
        self.model.stats.bytes_sent += len(s.payload)
        self.sent.append(s)
        if self.tally is not None:
            from mesh402.engine.activations import activation_hash  # lazy: loads gguf, numpy, torch only when needed
            from mesh402.work.receipts import token_step_hash  # lazy: kept off this module's import path
            self.tally.step(s.n_real, token_step_hash(s.tokens[:s.n_real]), activation_hash(s.payload))
            self.steps_done += 1

    def _drawn_rows(self, rs: Any, rows: list[int]) -> tuple[list[int], list[Any]]:
        """The tokens the last stage drew for a draft step, checked: 1..len(rows) of them, every one but the
        last equal to the draft after it (that is what accepting a draft means), then as `_draws` checks them;
        with their logprobs."""
        toks = [int(t) for t in rs.tokens]
        if not 1 <= len(toks) <= len(rows):
            raise StageError(f"the last stage answered {len(rows)} draft rows with {len(toks)} tokens",
                             node=self._last(), code="bad_output")
        if any(toks[i] != rows[i + 1] for i in range(len(toks) - 1)):
            raise StageError("the last stage accepted a draft it did not draw", node=self._last(), code="bad_output")
        return toks, self._draws(toks, rs.params.get("lps", ""), many=True)

    def _drawn(self, rs: Any) -> int:
        """The token (and logprobs) the last stage returned for a plain step, checked as `_draws` checks."""
        if len(rs.tokens) != 1:
            raise StageError("the last stage returned no token in the vocabulary", node=self._last(),
                             code="bad_output")
        token = int(rs.tokens[0])
        self.logprob = self._draws([token], rs.params.get("lp", ""), many=False)[0]
        return token

    def _last(self) -> str:
        assert self.chain is not None
        return self.chain.hops[-1].node

    def _draws(self, toks: list[int], lp_json: str, *, many: bool) -> list[Any]:
        """Tokens the last stage drew, checked before anything uses them: in the vocabulary, with well-formed
        logprobs of themselves when the session asks for them (`lp_json`: one record, or a list of them when
        `many`), allowed by the grammar in order (the host's matcher takes them). Anything else is the last
        stage's fault (`bad_output`): the step fails over to a replacement, which redraws under the same mask
        (a refusal leaves the matcher as it was). Returns each token's logprobs (None when not asked)."""
        from mesh402.engine.sampling import logprob_from_record  # lazy: loads gguf, numpy, torch only when needed

        last = self._last()
        vocab = int(self.model.engine0.info.vocab_size)
        if not all(0 <= t < vocab for t in toks):
            raise StageError("the last stage returned no token in the vocabulary", node=last, code="bad_output")
        top = self.constraints.top_logprobs
        lps: list[Any] = [None] * len(toks)
        if top is not None:
            try:
                recs = json.loads(lp_json) if many else [json.loads(lp_json)]
                if not isinstance(recs, list) or len(recs) != len(toks):
                    raise ValueError(f"{len(toks)} tokens, logprobs of {len(recs) if isinstance(recs, list) else 0}")
                lps = [logprob_from_record(r, vocab, top) for r in recs]
            except ValueError as e:
                raise StageError(f"the last stage returned bad logprobs: {e}", node=last, code="bad_output") from None
            if any(lp.token != t for lp, t in zip(lps, toks)):
                raise StageError("the last stage's logprobs are for another token", node=last, code="bad_output")
        if self.matcher is not None:
            for j, t in enumerate(toks):
                if not self.matcher.accept(t):
                    self.matcher.rollback(j)
                    raise StageError(f"the last stage drew token {t}, which the grammar forbids", node=last,
                                     code="bad_output")
        return lps

    # ---------------------------------------------------------------- Stepper
    async def _local(self, chunk: list[int], pos: int, pad_to: int) -> tuple[bytes, list[int]]:
        from mesh402.engine.activations import forward_tokens  # lazy: loads gguf, numpy, torch only when needed

        return await asyncio.get_running_loop().run_in_executor(
            self.model.executor, forward_tokens, self.session, chunk, pos, pad_to, self.model.wire_dtype)

    # ---------------------------------------------------------------- KV prefix reuse
    # The host keeps, per chunk-aligned prompt prefix, its own KV rows and the frames it sent for
    # those positions; every stage keeps its rows under a key the host names. A warm request
    # restores all of them (one round trip) and prefills only the rest, at the same chunk
    # boundaries as a cold run: identical tokens. The cached frames join `sent`, so a failover
    # still replays the whole session onto a replacement stage. Any stage missing its rows: the
    # host drops the chain's sessions and opens fresh ones (a cold run).

    def _prefix_key(self, toks: tuple[int, ...]) -> str:

        h = hashlib.sha256(self.model.chain.content_hash.encode() + b"\0" + ",".join(map(str, toks)).encode())
        return h.hexdigest()[:32]

    async def _try_prefix(self, ids: list[int], C: int) -> list[int]:
        store = self.model.prefix
        if store is None or self.sent or len(self.session) or self.link is None or self.chain is None:
            return ids
        best, best_n = None, 0
        for toks, entry in store.items():
            common = 0
            for a, b in zip(toks, ids):
                if a != b:
                    break
                common += 1
            n = min(len(toks), common, len(ids) - 1) // C * C
            if n > best_n:
                best, best_n = (toks, entry), n
        if best is None or best_n < C:
            return ids
        toks, (rows, frames) = best
        m = best_n
        rkey = self._prefix_key(toks)
        try:
            await self.link.send(stage_frame(K.STAGE_KIND_PREFILL, request_id=self.request_id,
                                             plan_epoch=self.chain.epoch, tokens=ids[:m],
                                             params={"op": "restore", "key": rkey, "n": str(m), "ok": "1"}))
            rs = expect_stage(await self.link.recv(self.model.open_timeout), K.STAGE_KIND_RESULT, "prefix restore")
            ok = rs.params.get("restored") == "1"
        except Exception as e:
            log.info("request %s: prefix restore failed (%s); cold run", self.request_id, e)
            ok = False
        if not ok:  # some stage lacks the rows: fresh sessions on the same chain
            old = self.link
            self.link = None
            try:
                await old.send(stage_frame(K.STAGE_KIND_CLOSE, request_id=self.request_id))
                await old.finish()
            except Exception:
                pass
            await self.connect_chain()
            return ids
        from mesh402.engine.prefix import load_rows  # lazy: loads gguf, numpy, torch only when needed

        await asyncio.get_running_loop().run_in_executor(self.model.executor, load_rows, self.session, rows, m, ids[:m])
        self.sent.extend(frames[: m // C])
        self.cached_tokens = m
        return ids[m:]

    def _keep_prefix(self) -> None:
        """On release: keep this prompt's aligned prefix (host rows + frames) and tell the stages."""
        store, st = self.model.prefix, self._store
        if store is None or st is None or self.link is None:
            return
        toks, n = st
        C = self.model.engine0.prefill_chunk
        frames = [dataclasses.replace(f, sample=False) for f in self.sent[: n // C]]
        if len(frames) != n // C or any(f.kind != K.STAGE_KIND_PREFILL or f.position != i * C or f.n_real != C
                                        for i, f in enumerate(frames)):
            return
        from mesh402.engine.prefix import copy_rows, rows_nbytes  # lazy: loads gguf, numpy, torch only when needed

        def keep() -> None:
            rows = copy_rows(self.session, n)
            store.put(toks, (rows, frames), rows_nbytes(rows) + sum(len(f.payload) for f in frames))

        self.model.executor.submit(keep)  # before the session closes (same single engine thread)
        self._store_frame = stage_frame(K.STAGE_KIND_PREFILL, request_id=self.request_id,
                                        plan_epoch=self.chain.epoch if self.chain else 0,
                                        params={"op": "store", "key": self._prefix_key(toks), "n": str(n)})

    async def prefill(self, ids: list[int]) -> int:
        from mesh402.engine.chunks import prefill_steps  # lazy: loads gguf, numpy, torch only when needed

        C = self.model.engine0.prefill_chunk
        token: int | None = None
        prompt = list(ids)
        self.history.extend(prompt)
        ids = await self._try_prefix(prompt, C)
        n_al = len(prompt) // C * C
        if n_al >= C and n_al > self.cached_tokens:
            self._store = (tuple(prompt[:n_al]), n_al)
        steps = prefill_steps(len(self.session), len(ids), C)
        for i, (off, n) in enumerate(steps):
            pos = len(self.session)
            chunk = ids[off:off + n]
            payload, shape = await self._local(chunk, pos, C)
            last = i == len(steps) - 1
            token = await self._exchange(_Sent(K.STAGE_KIND_PREFILL, pos, chunk, n, payload, shape, last))
        assert token is not None
        return token

    async def decode(self, token: int) -> int:
        if self._ahead:  # verified by an earlier draft step: the token's rows are in on every stage
            fed, nxt, self.logprob = self._ahead.pop(0)
            if fed != token:
                raise ValueError("decode of a token other than the one drawn")
            self.history.append(token)
            return nxt
        rows = self._draft_rows(token)
        self.history.append(token)
        t0 = time.monotonic()
        nxt = await (self._draft(rows) if len(rows) > 1 else self._decode_one(token))
        if self.drafts is not None:  # the whole step as the request waits for it: stage 0 here, the round trip
            self.drafts.timed(len(rows), time.monotonic() - t0)
        return nxt

    async def _decode_one(self, token: int) -> int:
        pos = len(self.session)
        rows_b, wire = self.model.rows, self.model.wire_dtype
        if rows_b is not None:  # one row of the host's batched step: the bytes a 1-row forward gives
            from mesh402.engine.activations import encode_activations  # lazy: loads gguf, numpy, torch only when needed

            payload, shape = await rows_b.step(self.session, [int(token)], lambda out: encode_activations(out, wire))
        else:
            payload, shape = await self._local([token], pos, 1)
        nxt = await self._exchange(_Sent(K.STAGE_KIND_DECODE, pos, [token], 1, payload, shape, True))
        assert nxt is not None
        if self.drafts is not None:
            self.drafts.settle(0, 0, nxt)
        return nxt

    def _draft_rows(self, token: int) -> list[int]:
        """The token to feed and the drafts that ride with it (as many as pay and fit)."""
        if self.drafts is None:
            return [token]
        # the last row at most at max_len - 2: plain decoding never feeds the answer's last token
        return [token] + self.drafts.propose(self.history + [token], self.max_len - len(self.session) - 2)

    async def _draft(self, rows: list[int]) -> int:
        """One round trip for the token and its drafts: every stage runs them as adjacent rows (each as its 1-row
        decode computes it), the last stage draws each position as plain decoding would and accepts drafts while
        its draws equal them. The kept rows become ordinary 1-row steps here (replayed after a failover,
        counted in the receipt); the host's own KV past them is rolled back as the stages roll theirs."""
        from mesh402.engine.activations import encode_activations  # lazy: loads gguf, numpy, torch only when needed

        n, pos, wire = len(rows), len(self.session), self.model.wire_dtype

        def stage0() -> tuple[bytes, list[int]]:
            return encode_activations(self.session.engine.forward_session_rows(self.session, rows), wire)

        loop = asyncio.get_running_loop()
        payload, shape = await loop.run_in_executor(self.model.executor, stage0)
        drawn, lps = await self._round_trip(
            _Sent(K.STAGE_KIND_DECODE, pos, list(rows), n, payload, shape, True, True),
            lambda rs: self._drawn_rows(rs, rows))
        kept = len(drawn)
        if kept < n:
            await loop.run_in_executor(self.model.executor, self.session.truncate, pos + kept)
        w = len(payload) // n
        for i in range(kept):
            self._commit(_Sent(K.STAGE_KIND_DECODE, pos + i, [rows[i]], 1, payload[i * w:(i + 1) * w], [1, shape[1]],
                               True))
        assert self.drafts is not None
        self.drafts.settle(n - 1, kept - 1, drawn[0])
        self.drafted += n - 1
        self.accepted += kept - 1
        self._ahead = [(drawn[j], drawn[j + 1], lps[j + 1]) for j in range(kept - 1)]
        self.logprob = lps[0]
        return drawn[0]

    async def _collect_receipts(self, link: Link) -> None:
        """CLOSE carrying this node's stage-0 receipt; the stages add theirs and the chain comes back."""
        from mesh402.work.evidence import sign_stage0_terms  # lazy: kept off this module's import path

        mine = self.tally.receipt(self.model.signer, 0)
        terms = sign_stage0_terms(self.model.signer, mine, mode=self.model.engine0.mode, dtype=self.model.wire_dtype)
        params = {"receipts": dump_json([mine.to_json()]), "stage0_terms": dump_json(terms),
                  **(await self._close_params())}
        auditor, chain = self.model.auditor, self.chain
        step = auditor.pick([h.node for h in chain.hops], self.steps_done, [len(x.payload) for x in self.sent]) \
            if auditor and chain else None
        if step is not None:  # drawn only now: every stage has sent (committed to) all its outputs
            params["reveal"] = str(step)
        await link.send(stage_frame(K.STAGE_KIND_CLOSE, request_id=self.request_id, params=params))
        evidence: list[Any] = []
        try:
            rs = expect_stage(await link.recv(self.model.open_timeout), K.STAGE_KIND_RESULT, "receipts")
            got = json.loads(rs.params.get("receipts", "[]"))
            receipts = [Receipt.from_wire(r) for r in (got if isinstance(got, list) else [])]
            evidence = json.loads(rs.params.get("evidence", "[]")) if step is not None else []
        except Exception as e:
            log.info("request %s: no receipts from the stages: %s", self.request_id, e)
            receipts = [mine]
        # Only what is bound to this request as this entry planned and fed it is stored: its own stage-0
        # receipt, the planned hops' nodes and layers, the tokens it sent, this request id.
        hops = [(h.node, h.start, h.end) for h in (chain.hops if chain else ())]
        receipts, unbound = bound_chain(receipts, mine, hops)
        if unbound:
            log.warning("request %s: receipts from the stages refused (%s); keeping %d of %d stage(s)",
                        self.request_id, "; ".join(unbound), len(receipts), len(hops) + 1)
        # a reveal is judged against the whole chain only: a cut chain keeps its receipts, unaudited
        audited = step is not None and len(receipts) == len(hops) + 1 and isinstance(evidence, list)
        try:  # committed before the answer's end goes out (finish awaits this)
            await kept(self.model.receipt_sink(receipts, evidence if audited else None))
        except Exception as e:  # a chain that does not verify is logged, never stored
            log.warning("request %s: receipts not kept: %s", self.request_id, e)

    async def finish(self) -> None:
        """The answer is complete: close the chain now and, when receipts are kept, wait until the stages'
        receipts (the CLOSE acknowledgement) are committed, so the answer's end never goes out first."""
        closing = self.release()
        if closing is not None and self.tally is not None:
            await asyncio.shield(closing)

    def release(self) -> asyncio.Task | None:
        """Free the session; the chain is closed (and the receipts collected) in a task, returned."""
        if self._released:
            return self._closing
        self._released = True
        if self.drafted:
            log.info("request %s: %d of %d drafts accepted in %d steps", self.request_id, self.accepted, self.drafted,
                     self.steps_done)
        self._store_frame = None
        if self.model.rows is not None:
            self.model.rows.leave(self.session)
        try:
            self._keep_prefix()
        except Exception as e:  # reuse is an optimisation: never fail a release over it
            log.info("request %s: prefix not kept: %s", self.request_id, e)
        self.model.executor.submit(self.session.close)
        if self.link is not None:
            try:
                self._closing = asyncio.get_running_loop().create_task(self._close(self.link, self._store_frame))
            except RuntimeError:
                pass
        return self._closing

    async def _close(self, link: Link, store_frame: Any) -> None:
        try:
            if store_frame is not None:
                await link.send(store_frame)
            if self.tally is not None and self.sent:
                await self._collect_receipts(link)
            else:
                await link.send(stage_frame(K.STAGE_KIND_CLOSE, request_id=self.request_id,
                                            params=await self._close_params()))
            await link.finish()
        except Exception:
            pass
