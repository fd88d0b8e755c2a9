"""A hostile mesh member for tests: a real in-process MeshService that joined with a valid token and
then sends whatever a test wants to a real node process (stage and expert control frames, tunnelled
HTTP), the way an attacker on an open mesh could."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

from mesh402.api.tunnel import forward
from mesh402.mesh.config import MeshConfig, MeshTimers
from mesh402.mesh.framing import StreamType, make_frame
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.service import MeshService
from mesh402.serving.stage_link import K, Hop, OpenGrant, stage_frame


class EvilMember:
    """A member joined with a valid token (tests also use one as the honest member beside the attacker)."""

    def __init__(self, home: Path, token: str, bind_ip: str = "127.0.0.1") -> None:
        self.svc = MeshService(MeshConfig(home=home, bind_ip=bind_ip, timers=MeshTimers.fast()))
        self.token = token

    async def __aenter__(self) -> "EvilMember":
        await self.svc.start(join=self.token)
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.svc.stop(graceful=True)

    @property
    def node_id(self) -> str:
        return self.svc.node_id.hex()

    async def wait_connected(self, node: str, timeout: float = 20.0) -> None:
        for _ in range(int(timeout / 0.1)):
            if bytes.fromhex(node) in self.svc.connected_peers():
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"never connected to {node[:12]}")

    async def echo(self, node: str) -> bool:
        """One round trip on a fresh ECHO stream (what an honest member checks it is still served with)."""
        reply = await self.svc.request(bytes.fromhex(node), StreamType.ECHO,
                                       make_frame(echo=pb.Echo(payload=b"honest")), timeout=10)
        return reply is not None and reply.echo.payload == b"honest"

    async def open(self, node: str, stype: StreamType = StreamType.STAGE) -> Any:
        return await self.svc.open_stream(bytes.fromhex(node), stype)

    async def stage(self, node: str, frame: pb.Frame, stype: StreamType = StreamType.STAGE,
                    timeout: float = 15.0) -> pb.StageFrame | None:
        """Send one control frame on a fresh stream; the single reply (None: the stream just closed)."""
        fs = await self.open(node, stype)
        await fs.send(frame)
        reply = await fs.recv(timeout)
        await fs.finish()
        return reply.stage if reply is not None and reply.WhichOneof("body") == "stage" else None

    def answer_holding_proofs(self, model_path: Path, *, honest: bool = True) -> None:
        """Answer holding challenges (STAGE streams) from `model_path`, as a node that has the file does
        (honest=False: with a made-up proof, as a member without it must); every challenge is counted."""
        from mesh402.serving.holdings import Holdings

        prover = Holdings(self.node_id, self.open, lambda ch: Path(model_path))
        self.challenges = 0

        async def on_stage(peer: bytes, fs: Any) -> None:
            frame = await fs.recv(10)
            if frame is None or frame.stage.kind != K.STAGE_KIND_HOLDING_PROOF:
                return
            self.challenges += 1
            reply = await prover.on_challenge(bytes(peer).hex(), frame.stage)
            if not honest:
                reply = stage_frame(K.STAGE_KIND_RESULT, params={"proof": "00" * 32})
            await fs.send(reply)

        self.svc.register_handler(StreamType.STAGE, on_stage)

    def count_prompts(self) -> None:
        """Count every HTTP_TUNNEL stream a node opens to this member (a prompt routed to it); answer none."""
        self.prompts = 0

        async def on_tunnel(peer: bytes, fs: Any) -> None:
            self.prompts += 1

        self.svc.register_handler(StreamType.HTTP_TUNNEL, on_tunnel)

    def claim(self, model_id: str, content_hash: str, *, capacity: int = 2**62, plan: dict[str, Any] | None = None,
              **labels: str) -> None:
        """Announce the model on disk, a capacity, and a plan label of this member's making (a fake ready plan
        by default: it claims to serve the whole model itself, at a high epoch)."""
        key = f"{model_id}@{content_hash}"
        plan = plan if plan is not None else {"kind": "plan", "model_key": key, "epoch": 10**6, "host": self.node_id,
                                              "ready": True, "stages": [[self.node_id, 0, 30, 1]], "standbys": []}
        self.svc.update_local(models=[pb.ModelEntry(model_id=model_id, content_hash=content_hash)],
                              labels={"capacity_bytes": str(capacity), f"plan:{key}": json.dumps(plan), **labels})

    def grant(self, content_hash: str, epoch: int, hops: list[Hop], max_len: int = 64) -> dict[str, str]:
        """OPEN params carrying a grant this member signs itself (valid only where it is the host)."""
        sampling = json.dumps({"temperature": 0.0, "seed": 1})
        return OpenGrant(secrets.token_hex(8), content_hash, epoch, tuple(hops), max_len, sampling, False,
                         secrets.token_hex(12)).sign(self.svc.identity)

    async def tunnel(self, node: str, method: str, path: str, body: bytes = b"",
                     headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        status, hdrs, chunks = await forward(lambda: self.open(node, StreamType.HTTP_TUNNEL), method, path,
                                             {"content-type": "application/json", **(headers or {})}, body,
                                             secrets.token_hex(8), first_byte_timeout=60)
        return status, hdrs, b"".join([c async for c in chunks])


def assign_frame(model_id: str, content_hash: str, epoch: int, start: int, end: int) -> pb.Frame:
    return stage_frame(K.STAGE_KIND_ASSIGN, model_id=model_id, content_hash=content_hash, plan_epoch=epoch,
                       layer_start=start, layer_end=end)


def open_frame(model_id: str, content_hash: str, epoch: int, start: int, end: int, params: dict[str, str],
               request_id: str | None = None) -> pb.Frame:
    rid = request_id if request_id is not None else json.loads(params["grant"])["rid"] if "grant" in params else "x"
    return stage_frame(K.STAGE_KIND_OPEN, request_id=rid, model_id=model_id, content_hash=content_hash,
                       plan_epoch=epoch, layer_start=start, layer_end=end, params=params)


def board_post(member: EvilMember, mesh_id: str, i: int, topic: str = "spam", text: str = "buy now") -> pb.BoardPost:
    """A blackboard post the member signs itself (valid: the caps, not the signature, must stop a flood)."""
    import time

    from mesh402.mesh.board import signing_message

    p = pb.BoardPost(author=member.svc.node_id, topic=topic, text=f"{text} {i}", created_ms=int(time.time() * 1000),
                     ttl_s=600, nonce=i.to_bytes(8, "big"))
    p.signature = member.svc.identity.sign(signing_message(mesh_id, p))
    return p
