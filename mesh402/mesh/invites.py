"""The invite tokens this node hands out, revokes and honours (the token format is mesh402.mesh.invite)."""

from __future__ import annotations

from typing import Any, Callable, Optional

from mesh402.mesh import invite
from mesh402.mesh.context import MeshContext
from mesh402.mesh.invite import InviteError
from mesh402.mesh.proto import mesh_pb2 as pb


class InviteBook:
    def __init__(self, ctx: MeshContext, addrs: Callable[[], list[str]],
                 spend: Callable[[dict[str, int]], bool]) -> None:
        self.ctx = ctx
        self.addrs = addrs  # where the token says to dial
        self.spend = spend  # record nonces as spent mesh-wide; False if they already were
        self._token: Optional[str] = None
        self._token_expires_at = 0.0

    def mint(self, expires_in: Optional[float] = None, single_use: bool = False) -> str:
        ctx = self.ctx
        m = ctx.membership
        if not m.mesh_id:
            raise InviteError("not part of a mesh yet")
        return invite.mint_token(
            single_use=single_use,
            mesh_id=m.mesh_id,
            secret=m.secret,
            policy=m.policy,
            node_id=ctx.node_id,
            addrs=self.addrs(),
            relay_url=ctx.config.relay_url or "",
            expires_in=ctx.config.invite_expires if expires_in is None else expires_in,
            now=ctx.clock.time(),
        )

    def revoke(self, token: str) -> dict[str, Any]:
        """Stop a token of this mesh from admitting anyone (mesh-wide, through gossip). Members it
        already admitted stay."""
        m = self.ctx.membership
        tok = invite.decode_token(token)
        if tok.mesh_id != m.mesh_id:
            raise InviteError("this token belongs to another mesh", "wrong_mesh")
        cred = tok.credential
        if tok.policy != pb.ADMISSION_SECRET:
            raise InviteError("an open mesh admits anyone: there is nothing to revoke", "open_mesh")
        invite.check_mac(cred, mesh_id=m.mesh_id, secret=m.secret)
        nonce = cred.nonce.hex()
        if cred.expires_at <= self.ctx.clock.time():
            state = "expired"  # it admits no one already; nothing to gossip
        else:
            state = "revoked" if self.spend({nonce: int(cred.expires_at)}) else "already revoked"
        return {"nonce": nonce, "expires_at": int(cred.expires_at), "state": state}

    @property
    def token(self) -> str:
        """The token `serve` prints; re-minted when half its lifetime has passed."""
        now = self.ctx.clock.time()
        life = self.ctx.config.invite_expires
        if self._token is None or now > self._token_expires_at - life / 2:
            self._token = self.mint(life)
            self._token_expires_at = now + life
        return self._token

    def use(self, cred: pb.InviteCredential) -> None:
        """Refuse a spent or revoked token; a single-use one is honoured by its issuer alone (one event
        loop, so two joiners cannot both use it) and is spent here."""
        nonce = cred.nonce.hex()
        if nonce in self.ctx.membership.spent:
            raise InviteError("this invite token was revoked or, being single-use, is already used; "
                              "ask a member for a new one (mesh402 invite)", "spent")
        if cred.single_use:
            if bytes(cred.issuer) != self.ctx.node_id:
                raise InviteError("a single-use invite is accepted only by the member that minted it",
                                  "single_use_elsewhere")
            self.spend({nonce: int(cred.expires_at)})
