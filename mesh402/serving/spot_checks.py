"""The validator's side of a spot check: re-execute audited steps on the same layers and judge them.

A node started with `--validator` answers VERIFY requests (docs/verification.md): for each spot check it
loads the stage's layer range of the same model (from its own disk copy) in the mode the stage declared,
replays the revealed inputs (mesh402.engine.replay.replay) and compares. The verdict is what the
validator reports on chain: PASS_SCORE when every verifiable check holds, 0 otherwise."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from mesh402.serving.stage_link import K
from mesh402.work.evidence import (
    PASS_SCORE,
    UNVERIFIABLE,
    SpotCheck,
    commitment_errors,
    fingerprint_ids,
)

EngineFor = Callable[[str, int, int, str], Any]  # (model hash, start, end, mode) -> partial Engine
ExpertsFor = Callable[[str, list[tuple[int, int]], str], Any]  # (model hash, experts, mode) -> ExpertShardWorker


@dataclass(frozen=True)
class CheckResult:
    request_id: str
    stage: int
    ok: bool
    skipped: bool
    rel_err: float
    tolerance: float
    detail: str


@dataclass
class Verdict:
    results: list[CheckResult] = field(default_factory=list)

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if not r.ok and not r.skipped]

    @property
    def checked(self) -> int:
        return sum(1 for r in self.results if not r.skipped)

    @property
    def score(self) -> int:
        return 0 if self.failed else PASS_SCORE

    def to_json(self) -> dict[str, Any]:
        return {"score": self.score, "checked": self.checked, "results": [asdict(r) for r in self.results]}

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True, default=str).encode()).digest()


def expert_ids(payload: bytes) -> list[tuple[int, int]]:
    """The (layer, expert) pairs one EXPERT_RUN payload asks for (its header only)."""
    from mesh402.serving.expert_receipts import expert_rows

    return sorted(expert_rows(payload))


def run_check(check: SpotCheck, engine_for: EngineFor, device: str = "",
              experts_for: ExpertsFor | None = None) -> CheckResult:
    """One spot check: a signed reveal that broke the stage's own commitments fails without compute; evidence
    the stage's signatures do not back (or that nothing pins) is skipped; any other is re-executed. An expert
    node's run is re-executed on `experts_for(model hash, its experts, mode)`."""
    def result(ok: bool, detail: str, err: float = float("inf"), tol: float = 0.0, skipped: bool = False) -> CheckResult:
        return CheckResult(check.request_id, check.stage, ok, skipped, err, tol, detail)

    if check.expert:
        return _run_expert_check(check, experts_for, device, result)

    if check.first != (check.layer_start == 0):  # a first stage takes token ids, any other activations
        return result(True, f"{UNVERIFIABLE}layers from {check.layer_start} do not match the check's kind", skipped=True)
    problem, at_fault = commitment_errors(check)
    if at_fault:
        return result(False, problem)
    if problem:
        return result(True, problem, skipped=True)
    if check.needs_device and device and check.needs_device != device:  # fast-mode noise differs across kernels
        return result(True, f"{UNVERIFIABLE}fast-mode work on {check.device} is not judged on {device}", skipped=True)
    try:
        engine = engine_for(check.model_hash, check.layer_start, check.layer_end, check.mode)
    except FileNotFoundError as e:  # this validator cannot hold those layers: not a verdict on the stage
        return result(True, f"{UNVERIFIABLE}{e}", skipped=True)
    from mesh402.engine.replay import replay  # lazy: loads gguf, numpy, torch only when needed

    ids = fingerprint_ids(check.request_id, engine.config.vocab_size) if check.last else None
    inputs = check.decoded_inputs()
    # the tokens generated before the step (the inputs of decode steps): the grammar state it drew under
    generated = [int(t) for r in inputs if r.get("kind") == K.STAGE_KIND_DECODE for t in r.get("tokens", [])]
    r = replay(engine, inputs, last=check.last, expected=base64.b64decode(check.expected),
               expected_dtype=check.expected_dtype, expected_shape=check.expected_shape or None, fp_ids=ids,
               mode=check.mode, token=check.token, sampling=check.sampling, generated=generated,
               logprobs=check.logprobs)
    return result(r.ok, r.detail, r.rel_err, r.tolerance)


def _run_expert_check(check: SpotCheck, experts_for: ExpertsFor | None, device: str,
                      result: Callable[..., CheckResult]) -> CheckResult:
    problem, _ = commitment_errors(check)
    if problem:  # evidence the node's own receipt does not back proves nothing against it
        return result(True, problem, skipped=True)
    if check.needs_device and device and check.needs_device != device:
        return result(True, f"{UNVERIFIABLE}fast-mode work on {check.device} is not judged on {device}", skipped=True)
    if experts_for is None:
        return result(True, f"{UNVERIFIABLE}this validator does not run expert shards", skipped=True)
    payload = base64.b64decode(check.inputs[0]["data"])
    try:
        worker = experts_for(check.model_hash, expert_ids(payload), check.mode)
    except (FileNotFoundError, ValueError) as e:
        return result(True, f"{UNVERIFIABLE}{e}", skipped=True)
    from mesh402.engine.replay import replay_expert  # lazy: loads gguf, numpy, torch only when needed

    r = replay_expert(worker, payload, base64.b64decode(check.expected), check.mode)
    return result(r.ok, r.detail, r.rel_err, r.tolerance)


def judge(checks: list[SpotCheck], engine_for: EngineFor, device: str = "",
          experts_for: ExpertsFor | None = None) -> Verdict:
    """`device`: this validator's device signature (fast-mode checks on another one are skipped)."""
    return Verdict([run_check(c, engine_for, device, experts_for) for c in checks])
