"""Commit–reveal of activations and the spot checks built from a reveal (see docs/verification.md).

Pure code: hashes and JSON, no torch. The re-execution itself is engine code (mesh402.engine.replay)."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mesh402.commitment import activation_hash
from mesh402.mesh.identity import verify
from mesh402.work.receipts import Receipt, running_hash, token_step_hash, verify_receipt

FP_SIZE = 256  # logits the last stage commits to per step
REVEAL_BUDGET = 24 * 1024 * 1024  # bytes of step inputs one reveal may carry (frames are limited to 64 MiB)
LAST_STEP_DOMAIN = b"mesh402 last-stage step v1"

PASS_SCORE = 100  # a verdict's score when every verifiable check holds (the ERC-8004 validation response)


def fingerprint_ids(request_id: str, vocab_size: int, n: int = FP_SIZE) -> list[int]:
    """`n` distinct vocabulary ids picked by SHA-256 in counter mode over the request id (sorted)."""
    n = min(n, vocab_size)
    out: set[int] = set()
    counter = 0
    while len(out) < n:
        block = hashlib.sha256(b"mesh402 fingerprint ids\0" + request_id.encode() + struct.pack("<Q", counter)).digest()
        for j in range(0, 32, 4):
            out.add(int.from_bytes(block[j:j + 4], "little") % vocab_size)
            if len(out) == n:
                break
        counter += 1
    return sorted(out)


def last_step_hash(token: int | None, fingerprint: bytes, logprobs: bytes = b"") -> bytes:
    """The last stage's per-step output hash: the token it drew (-1: none), its logits fingerprint and, when
    the request asked for them, the logprobs it returned (canonical JSON): its receipt covers them."""
    t = -1 if token is None else int(token)
    tail = b"\0logprobs\0" + bytes(logprobs) if logprobs else b""
    return hashlib.sha256(LAST_STEP_DOMAIN + struct.pack("<q", t) + bytes(fingerprint) + tail).digest()


# ---------------------------------------------------------------- the stage's reveal


def _b64(b: bytes) -> str:
    return base64.b64encode(bytes(b)).decode()


def reveal(tally: Any, step: int, stage: int, node_id: str, mode: str, last: bool, device: str = "") -> dict[str, Any]:
    """What a stage sends on CLOSE for the audited step: its inputs of steps 0..step (after those of a
    restored prefix), every per-step hash, and on the last stage the step's fingerprint and token.
    `device`: what its fast-mode numbers depend on (engine.replay.device_signature)."""
    if not 0 <= step < len(tally.records):
        raise ValueError(f"no step {step} to reveal ({len(tally.records)} kept)")
    inputs = [{**r, "data": _b64(r["data"])} for r in [*tally.prefix_records, *tally.records[:step + 1]]]
    ev: dict[str, Any] = {"stage": stage, "node_id": node_id, "step": step, "mode": mode, "last": last, "device": device,
                          "inputs": inputs, "in_hashes": [h.hex() for h in tally.in_hashes],
                          "out_hashes": [h.hex() for h in tally.out_hashes]}
    if last:
        ev["fp"], ev["token"] = _b64(tally.fingerprints[step]), tally.tokens_out[step]
        ev["sampling"] = json.loads(tally.sampling) if tally.sampling else None
        if tally.logprobs and tally.logprobs[step]:
            ev["logprobs"] = tally.logprobs[step].decode()
    return ev


# ---------------------------------------------------------------- the entry's checks


@dataclass(frozen=True)
class SpotCheck:
    """One audited step of one stage, ready for a validator: re-run `inputs` through layers [start, end)
    in `mode` and compare the last step's output with `expected` (the next stage's revealed input, or the
    last stage's fingerprint). `fault` is set when the reveal itself did not match the commitments."""
    request_id: str
    stage: int
    node_id: str
    model_hash: str
    layer_start: int
    layer_end: int
    mode: str
    step: int
    last: bool
    inputs: list[dict[str, Any]]  # data base64
    expected: str  # base64
    expected_dtype: str = "f32"
    expected_shape: list[int] = field(default_factory=list)
    fault: str = ""
    # what lets the validator check the entry's evidence against the stage's own signatures (so an entry
    # cannot frame an honest stage): its signed receipt, its per-step hashes, the token it drew (last
    # stage), and for a reveal the entry calls broken, the stage's signed reveal itself
    receipt: dict[str, Any] = field(default_factory=dict)
    in_hashes: list[str] = field(default_factory=list)
    out_hashes: list[str] = field(default_factory=list)
    token: int = -1
    reveal: dict[str, Any] | None = None
    device: str = ""
    signature: str = ""  # the stage's signature over its reveal (signed_reveal_of rebuilds what it covers)
    sampling: dict[str, Any] | None = None  # last stage: the request's sampling parameters (token check)
    logprobs: str = ""  # last stage: the logprobs it returned at the step (JSON), when the request asked
    # the entry's own stage 0, audited by the first remote stage from what it received (first_stage_check):
    # inputs are token ids, the expected output the payload that stage received, `reporter` who built it
    first: bool = False
    reporter: str = ""
    # one EXPERT_RUN of an MoE expert node (expert_check): `inputs` holds its request payload, `expected` the
    # reply it sent, `receipt` its signed ExpertReceipt, the hash lists the per-run hashes its receipt runs over
    expert: bool = False

    @property
    def needs_device(self) -> str:
        """The validator device this check needs ("" = any: exact mode is portable across CPUs)."""
        return self.device if self.mode == "fast" and not self.fault else ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SpotCheck":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def body(self) -> bytes:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return hashlib.sha256(b"mesh402 spot check v1\n" + self.body()).hexdigest()

    def decoded_inputs(self) -> list[dict[str, Any]]:
        return [{**r, "data": base64.b64decode(r["data"])} for r in self.inputs]


UNVERIFIABLE = "unverifiable: "  # a check the validator skips (not the stage's fault)
NO_REVEAL = "no reveal for the audited step"  # unprovable: the entry pays the stage nothing for that request
REVEAL_DOMAIN = b"mesh402 stage reveal v1\n"


def reveal_body(ev: dict[str, Any]) -> bytes:
    return REVEAL_DOMAIN + json.dumps({k: v for k, v in ev.items() if k != "signature"}, sort_keys=True,
                                      separators=(",", ":")).encode()


def sign_reveal(identity: Any, ev: dict[str, Any]) -> dict[str, Any]:
    """The stage signs its reveal: a reveal that contradicts its receipt is then provable to a validator."""
    return {**ev, "signature": identity.sign(reveal_body(ev)).hex()}


def reveal_signed_by(ev: dict[str, Any], node_id: str) -> bool:
    try:
        return verify(bytes.fromhex(node_id), reveal_body(ev), bytes.fromhex(str(ev.get("signature", ""))))
    except (ValueError, TypeError):
        return False


def _reveal_errors(r: Any, ev: dict[str, Any] | None, last: bool) -> tuple[str, list[dict[str, Any]]]:
    """Why a stage's reveal does not match its receipt ("" if it does), and its decoded step inputs when
    those match the commitments (they pin the previous stage's output even if the rest of the reveal fails)."""
    if ev is None:
        return NO_REVEAL, []
    try:
        step = int(ev["step"])
        ins = [bytes.fromhex(h) for h in ev["in_hashes"]]
        outs = [bytes.fromhex(h) for h in ev["out_hashes"]]
        inputs = [{**x, "data": base64.b64decode(x["data"])} for x in ev["inputs"]]
        fp = base64.b64decode(ev["fp"]) if last else b""
    except (KeyError, TypeError, ValueError) as e:
        return f"malformed reveal: {e}", []
    if running_hash(ins) != r.input_hash or running_hash(outs) != r.output_hash:
        return "revealed step hashes do not match the signed receipt", []
    if not (0 <= step < len(ins) == len(outs)) or len(inputs) < step + 1:
        return f"reveal of step {step} is incomplete", []
    own = inputs[len(inputs) - step - 1:]
    if any(activation_hash(x["data"]) != ins[j] for j, x in enumerate(own)):
        return "a revealed input is not what the stage received", []
    lp = str(ev.get("logprobs") or "").encode() if last else b""
    if last and last_step_hash(ev.get("token"), fp, lp) != outs[step]:  # its inputs still pin the stage before
        return "the revealed fingerprint is not the committed one", inputs
    return "", inputs


def spot_checks(receipts: list[Any], evidence: list[dict[str, Any]]) -> list[SpotCheck]:
    """One SpotCheck per remote stage (stage >= 1) of an audited request with a valid receipt chain.
    Every stage reveals the same step; stage k's expected output there is stage k+1's last revealed
    input, the payload stage k committed to by sending it."""
    by_stage = {int(e.get("stage", -1)): e for e in evidence if isinstance(e, dict)}
    rs = sorted(receipts, key=lambda r: r.stage)[1:]
    checked = [(r, *_reveal_errors(r, by_stage.get(r.stage), i == len(rs) - 1)) for i, r in enumerate(rs)]
    out = []
    for i, (r, fault, inputs) in enumerate(checked):
        ev = by_stage.get(r.stage) or {}
        last = i == len(checked) - 1
        expected, dtype, shape = "", "f32", []
        if not fault and last:
            expected = ev["fp"]
        elif not fault and checked[i + 1][2]:
            x = checked[i + 1][2][-1]
            expected, dtype, shape = _b64(x["data"]), str(x["dtype"]), list(x["shape"])
        elif not fault:
            fault = UNVERIFIABLE + "the next stage's reveal is missing or failed"
        own_fault = bool(fault) and not fault.startswith(UNVERIFIABLE)
        out.append(SpotCheck(r.request_id, r.stage, r.node_id, r.model_hash, r.layer_start, r.layer_end,
                             str(ev.get("mode", "")), int(ev.get("step", -1)) if not fault else -1, last,
                             [] if fault else [{**x, "data": _b64(x["data"])} for x in inputs],
                             expected, dtype, shape, fault, r.to_json(),
                             [] if fault else list(ev["in_hashes"]), [] if fault else list(ev["out_hashes"]),
                             int(ev.get("token", -1) if last and not fault else -1),
                             ev if own_fault and ev else None, str(ev.get("device", "")),
                             "" if fault else str(ev.get("signature", "")),
                             ev.get("sampling") if last and not fault else None,
                             str(ev.get("logprobs") or "") if last and not fault else ""))
    return out


def signed_reveal_of(check: SpotCheck) -> dict[str, Any]:
    """The stage's signed reveal, rebuilt from the check's fields (a spot check stores each part once)."""
    ev: dict[str, Any] = {"stage": check.stage, "node_id": check.node_id, "step": check.step, "mode": check.mode,
                          "last": check.last, "device": check.device, "inputs": check.inputs,
                          "in_hashes": check.in_hashes, "out_hashes": check.out_hashes, "signature": check.signature}
    if check.last:
        ev["fp"], ev["token"], ev["sampling"] = check.expected, check.token, check.sampling
        if check.logprobs:
            ev["logprobs"] = check.logprobs
    return ev


STAGE0_TERMS_DOMAIN = b"mesh402 stage-0 terms v1\n"


def _terms_body(terms: dict[str, Any]) -> bytes:
    return STAGE0_TERMS_DOMAIN + json.dumps({k: v for k, v in terms.items() if k != "signature"}, sort_keys=True,
                                            separators=(",", ":")).encode()


def sign_stage0_terms(identity: Any, receipt: Receipt, *, mode: str, dtype: str) -> dict[str, Any]:
    """What the entry signs at CLOSE next to its stage-0 receipt: the mode its stage 0 ran and the wire dtype of
    what it sent. Replay needs both and the receipt does not say them (f16 and bf16 payloads have the same
    size), so without this signature a first remote stage could frame an honest entry by misstating them."""
    terms = {"request_id": receipt.request_id, "receipt": receipt.digest, "mode": str(mode), "dtype": str(dtype)}
    return {**terms, "signature": identity.sign(_terms_body(terms)).hex()}


def stage0_terms_errors(terms: Any, r: Receipt) -> str:
    """Why `terms` are not the entry's signed terms for receipt `r` ("" when they are)."""
    try:
        ok = verify(bytes.fromhex(r.node_id), _terms_body(terms), bytes.fromhex(str(terms["signature"])))
    except (ValueError, TypeError, KeyError, AttributeError):
        ok = False
    if not ok or terms.get("receipt") != r.digest or terms.get("request_id") != r.request_id:
        return "the stage-0 terms are not the entry's, for this receipt"
    return ""


def first_stage_check(receipt: dict[str, Any], terms: dict[str, Any], records: list[dict[str, Any]], step: int,
                      reporter: str) -> SpotCheck:
    """The first remote stage's spot check of the entry's own stage 0: the entry's signed stage-0 receipt (it
    came with CLOSE), and what this stage received per step (token ids, positions, the payloads stage 0 sent).
    The receipt commits to every step's tokens and payload hash, so nothing here is the reporter's word."""
    r = Receipt.from_json(receipt)
    if not 0 <= step < len(records):
        raise ValueError(f"no step {step} to audit ({len(records)} received)")
    x = records[step]
    return SpotCheck(r.request_id, 0, r.node_id, r.model_hash, r.layer_start, r.layer_end, str(terms.get("mode", "")),
                     step, False,
                     [{**rec, "data": _b64(rec["data"])} for rec in records[:step + 1]], _b64(x["data"]),
                     str(x["dtype"]), list(x["shape"]), receipt=r.to_json(),
                     in_hashes=[token_step_hash(rec["tokens"]).hex() for rec in records],
                     out_hashes=[activation_hash(rec["data"]).hex() for rec in records], reveal=dict(terms),
                     first=True, reporter=reporter)


def expert_check(receipt: Any, in_hashes: list[bytes], out_hashes: list[bytes], step: int, payload: bytes,
                 reply: bytes, mode: str) -> SpotCheck:
    """The host's spot check of one run of an expert node: the run's request payload and the reply the node sent,
    with the per-run hashes the node's signed receipt commits to (sha256 of every payload and reply)."""
    return SpotCheck(receipt.request_id, receipt.stage, receipt.node_id, receipt.model_hash, 0, 0, mode, step, False,
                     [{"data": _b64(payload)}], _b64(reply), receipt=receipt.to_json(),
                     in_hashes=[h.hex() for h in in_hashes], out_hashes=[h.hex() for h in out_hashes], expert=True)


def _expert_errors(check: SpotCheck) -> str:
    """Why an expert check is not backed by the node's own signed receipt ("" when it is): its per-run hashes
    run to the receipt's, and the audited run's payload and reply are the ones they name."""
    from mesh402.work.receipts import ExpertReceipt

    try:
        r = ExpertReceipt.from_json(check.receipt)
        ins = [bytes.fromhex(h) for h in check.in_hashes]
        outs = [bytes.fromhex(h) for h in check.out_hashes]
        payload = base64.b64decode(check.inputs[0]["data"])
        reply = base64.b64decode(check.expected)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        return f"malformed evidence: {e}"
    if not verify_receipt(r) or (r.node_id, r.request_id, r.model_hash, r.stage) != (
            check.node_id, check.request_id, check.model_hash, check.stage) or r.stage < 1:
        return "the receipt is not the expert node's signed receipt for this check"
    if running_hash(ins) != r.input_hash or running_hash(outs) != r.output_hash:
        return "the per-run hashes do not run to the node's signed receipt"
    if not 0 <= check.step < len(ins) == len(outs):
        return f"no run {check.step} in the receipt's {len(ins)}"
    if hashlib.sha256(payload).digest() != ins[check.step] or hashlib.sha256(reply).digest() != outs[check.step]:
        return "the audited run is not the one the node committed to"
    return ""


def _first_stage_errors(check: SpotCheck, r: Receipt) -> str:
    """Why a stage-0 check is not backed by the entry's own signed receipt ("" when it is): every step's tokens
    and payload run to the receipt's commitments, the positions follow from the token counts (no gaps, no
    restored prefix), and the expected output is the step's committed payload. Evidence a reporter edited
    never matches, so it cannot frame an honest entry: such a check is skipped, never failed."""
    if r.stage != 0 or r.layer_start != 0:
        return "not a receipt of the entry's stage 0"
    terms = check.reveal or {}
    problem = stage0_terms_errors(terms, r)
    if problem:
        return problem
    if check.mode != terms.get("mode") or check.expected_dtype != terms.get("dtype") or any(
            x.get("dtype") != terms.get("dtype") for x in check.inputs):
        return "the mode or wire dtype is not the one the entry signed"
    try:
        ins = [bytes.fromhex(h) for h in check.in_hashes]
        outs = [bytes.fromhex(h) for h in check.out_hashes]
        inputs = check.decoded_inputs()
        expected = base64.b64decode(check.expected)
    except (ValueError, TypeError, KeyError) as e:
        return f"malformed evidence: {e}"
    if running_hash(ins) != r.input_hash or running_hash(outs) != r.output_hash:
        return "the per-step hashes do not run to the entry's signed receipt"
    if not (0 <= check.step < len(ins) == len(outs)) or len(inputs) != check.step + 1:
        return f"evidence of step {check.step} is incomplete"
    pos = 0
    for j, x in enumerate(inputs):
        tokens = [int(t) for t in x.get("tokens", [])]
        if token_step_hash(tokens) != ins[j] or activation_hash(x["data"]) != outs[j]:
            return f"step {j} is not what the entry committed to"
        if int(x.get("pos", -1)) != pos or int(x.get("n_real", -1)) != len(tokens):
            return f"step {j}: position or length is not the one its tokens give"
        pos += len(tokens)
    if activation_hash(expected) != outs[check.step]:
        return "the expected output is not the payload the entry committed to"
    return ""


def commitment_errors(check: SpotCheck) -> tuple[str, bool]:
    """What the validator checks before any compute: (problem, the stage is at fault). ("", False): the
    evidence is the stage's own signed reveal and matches its signed receipt, so re-execution decides.
    (p, True): the stage's signed reveal contradicts its signed receipt. (p, False): the entry's evidence
    is not backed by the stage's signatures, so it proves nothing against the stage (skipped). A stage-0
    check (`first`) is backed by the entry's own signed receipt instead of a reveal."""
    if check.expert:  # backed by the expert node's signed receipt; a wrong reply is for the replay to find
        problem = _expert_errors(check)
        return (UNVERIFIABLE + problem, False) if problem else ("", False)
    try:
        r = Receipt.from_json(check.receipt)
    except (TypeError, KeyError):
        return UNVERIFIABLE + "no signed receipt", False
    if not verify_receipt(r) or (r.node_id, r.request_id, r.model_hash, r.layer_start, r.layer_end) != (
            check.node_id, check.request_id, check.model_hash, check.layer_start, check.layer_end):
        return UNVERIFIABLE + "the receipt is not the stage's signed receipt for this check", False
    if check.first:
        problem = _first_stage_errors(check, r)
        return (UNVERIFIABLE + problem, False) if problem else ("", False)
    if check.fault.startswith(UNVERIFIABLE):
        return check.fault, False
    ev = check.reveal if check.fault else signed_reveal_of(check)
    if ev is None or not reveal_signed_by(ev, check.node_id):
        return UNVERIFIABLE + "the evidence is not the stage's signed reveal", False
    problem, _ = _reveal_errors(r, ev, check.last)
    if problem:  # its own signature on a reveal that contradicts its own receipt
        return problem, True
    if check.fault:
        return UNVERIFIABLE + f"the entry's claim ({check.fault}) does not hold for the signed reveal", False
    try:
        expected_hash = activation_hash(base64.b64decode(check.expected))
    except (ValueError, TypeError) as e:
        return UNVERIFIABLE + f"malformed evidence: {e}", False
    if not check.last and expected_hash != bytes.fromhex(check.out_hashes[check.step]):
        return UNVERIFIABLE + "the expected output is not the one the stage committed to", False
    return "", False


# ---------------------------------------------------------------- which requests the entry audits


class Auditor:
    """The entry's audit policy: the first request each stage node serves in an epoch is always audited
    (every paid node is checked at least once per epoch), any other with probability `rate`. The step is
    drawn uniformly. Randomness is the entry's own (`secrets`), drawn only after every step is done."""

    def __init__(self, rate: float, epoch_s: int, *, clock: Any = time.time) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError("audit rate must be in [0, 1]")
        self.rate, self.epoch_s, self.clock = float(rate), int(epoch_s), clock
        self._seen: set[tuple[int, str]] = set()
        self._rng = secrets.SystemRandom()

    def pick(self, nodes: list[str], n_steps: int, step_bytes: list[int] | None = None) -> int | None:
        """The step the stages must reveal, or None. `step_bytes`: the input bytes of every step the stages
        hold for this request (a restored prefix first); a step is eligible while the inputs up to it fit
        REVEAL_BUDGET, so a reveal always fits one frame (only very long prompts on big models meet this)."""
        if step_bytes is not None:
            total, fit = 0, 0
            for b in step_bytes:
                total += b
                if total * 4 // 3 > REVEAL_BUDGET:  # base64
                    break
                fit += 1
            n_steps = min(n_steps, fit - (len(step_bytes) - n_steps))
        if n_steps <= 0 or not nodes:
            return None
        epoch = int(self.clock()) // self.epoch_s
        fresh = [n for n in nodes if (epoch, n) not in self._seen]
        if not fresh and self._rng.random() >= self.rate:
            return None
        self._seen.update((epoch, n) for n in nodes)
        return self._rng.randrange(n_steps)


def statement(epoch: int, entry: str, node: str, validator: str, checks: list[str]) -> tuple[str, str]:
    """(canonical JSON, "0x" keccak256 of it): what a node's validation request is about (its hash is the
    ERC-8004 ValidationRegistry requestHash)."""
    from eth_utils import keccak
    body = {"v": 1, "epoch": int(epoch), "entry": entry, "node": node, "validator": validator, "checks": list(checks)}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return text, "0x" + keccak(text=text).hex()
