"""The entry's own stage 0, audited by the first remote stage (docs/verification.md, "The entry's own stage 0").

The entry chooses which of its requests the stages reveal, so it would never audit its own stage 0, and only
the first remote stage (stage 1) ever sees what stage 0 produced. Each step stage 1 receives carries the token
ids stage 0 ran and the payload it sent, and at CLOSE the entry's signed stage-0 receipt commits to both (a
running hash per step). So stage 1 can audit the entry with its own randomness: the first request of each entry
per epoch, any other with the audit rate. It builds a spot check (work.evidence.first_stage_check) that a
validator re-executes from the token ids on its own copy of layers [0, k), and, under `--quorum`, opens a
check on the entry's agent as the reporter (its owner key pays the report bond; a failed entry's slash pays it
the reporter share) and pushes it through the quorum like the entry's own round does (QuorumEntry). Only
exact-mode work is audited this way: fast-mode numbers are judged only on the same kernels, and the entry's
device signature is its own claim. A check whose evidence does not run to the entry's signed receipt is
skipped by every validator, so a reporter cannot frame an honest entry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from typing import Any, Callable

from mesh402.commitment import activation_hash
from mesh402.serving.quorum_votes import QuorumEntry
from mesh402.work.evidence import Auditor, SpotCheck, first_stage_check, stage0_terms_errors
from mesh402.work.receipts import Receipt, running_hash, verify_receipt

log = logging.getLogger(__name__)

MAX_REPORTS = 64  # (epoch, entry) checks this node reports and drives at once
DRIVE_EVERY_S = 2.0


class FirstStageReports:
    """The store QuorumEntry reads and writes (the entry's EntryReceipts has the same three methods): one stage-0
    check per (epoch, entry), in memory (a restart stops driving it; the check on chain stays, and anyone may
    draw, finalize and execute it)."""

    def __init__(self) -> None:
        self.checks: OrderedDict[tuple[int, str], list[SpotCheck]] = OrderedDict()
        self.rows: dict[int, dict[str, dict[str, Any]]] = {}

    def spot_checks(self, epoch: int, node: str) -> list[SpotCheck]:
        return list(self.checks.get((epoch, node), []))

    def validations(self, epoch: int) -> dict[str, dict[str, Any]]:
        return self.rows.get(epoch, {})

    def save_validation(self, epoch: int, node: str, request_hash: str, validator: str, agent_id: int | None,
                        statement: str, verdict: str | None) -> None:
        self.rows.setdefault(epoch, {})[node] = {"request_hash": request_hash, "validator": validator,
                                                 "agent_id": agent_id, "statement": statement, "verdict": verdict}


class FirstStageAuditor:
    def __init__(self, me: str, quorum: QuorumEntry, rate: float, epoch_s: int, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.me = me
        self.quorum = quorum
        self.epoch_s = int(epoch_s)
        self.clock = clock
        self.auditor = Auditor(rate, epoch_s, clock=clock)
        self.reports = FirstStageReports()
        self.results: dict[str, dict[str, Any]] = {}  # "epoch:entry" -> the last step's result (status)
        self._tasks: dict[tuple[int, str], asyncio.Task] = {}
        self.unsigned = 0  # CLOSEs whose entry signed no stage-0 terms: its stage 0 cannot be judged

    def on_close(self, receipt: dict[str, Any], terms: str, records: list[dict[str, Any]], restored: bool) -> None:
        """Stage 1's CLOSE: the entry's signed stage-0 receipt and terms, and the steps this stage received.
        Decides (its own randomness) whether to audit, and starts the quorum check in the background. Never
        raises. An entry that signs no terms cannot be judged: its stage-0 work is counted (`unsigned`)."""
        try:
            self._on_close(receipt, terms, records, restored)
        except Exception as e:  # an audit is never worth failing a CLOSE over
            log.warning("stage-0 audit not started: %s", e)

    def _on_close(self, receipt: dict[str, Any], raw_terms: str, records: list[dict[str, Any]],
                  restored: bool) -> None:
        if restored or not records:
            return  # a restored prefix has no records from position 0
        r = Receipt.from_json(receipt)
        if r.stage != 0 or r.layer_start != 0 or not verify_receipt(r):
            return
        terms = json.loads(raw_terms) if raw_terms and len(raw_terms) <= 4096 else None
        if not isinstance(terms, dict) or stage0_terms_errors(terms, r):
            self.unsigned += 1
            return
        if terms.get("mode") != "exact" or any(x.get("dtype") != terms.get("dtype") for x in records):
            return  # fast-mode work is judged only on the same kernels (the entry's device is its own claim)
        if running_hash([activation_hash(x["data"]) for x in records]) != r.output_hash:
            log.info("request %s: the entry's stage-0 receipt is not what this stage received: not audited",
                     r.request_id)
            return
        epoch = int(self.clock()) // self.epoch_s
        key = (epoch, r.node_id)
        if key in self.reports.checks or len(self._tasks) >= MAX_REPORTS:
            return  # one check per entry and epoch (its statement is opened once)
        step = self.auditor.pick([r.node_id], len(records), [len(x["data"]) for x in records])
        if step is None:
            return
        self.reports.checks[key] = [first_stage_check(receipt, terms, records, step, self.me)]
        while len(self.reports.checks) > MAX_REPORTS * 4:
            self.reports.checks.popitem(last=False)
        self._tasks[key] = asyncio.get_running_loop().create_task(self._drive(epoch, r.node_id))
        log.info("request %s: auditing the entry %s's stage 0 at step %d", r.request_id, r.node_id[:12], step)

    async def _drive(self, epoch: int, entry: str) -> None:
        """Open the check, send its evidence, draw, finalize and execute it (one QuorumEntry step at a time)."""
        try:
            while True:
                try:
                    res = await self.quorum.step(self.reports, epoch, entry)
                except Exception as e:  # RPC down, not enough bond: try again
                    res = {"error": f"quorum check: {e}"}
                self.results[f"{epoch}:{entry}"] = res
                if "score" in res or "not on chain" in str(res.get("error", "")) or "no ERC-8004" in str(
                        res.get("error", "")):
                    return
                await asyncio.sleep(DRIVE_EVERY_S)
        finally:
            self._tasks.pop((epoch, entry), None)

    async def stop(self) -> None:
        for t in list(self._tasks.values()):
            t.cancel()

    def status(self) -> dict[str, Any]:
        return {"driving": len(self._tasks), "unsigned": self.unsigned, "checks": {k: json.loads(json.dumps(v, default=str))
                                                        for k, v in list(self.results.items())[-16:]}}
