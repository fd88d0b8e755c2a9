"""Management API: the mesh blackboard (mesh402.mesh.board).

- ``GET /api/board?topic=&author=&limit=``: live posts, oldest first (at most `limit`, newest kept);
- ``POST /api/board`` ``{"topic": "...", "text": "...", "ttl_s": 3600}``: post as this node (signed
  with its key, then flooded to the mesh); 201 with the post, 400 for a bad post, 429 when this node
  is over its own share or rate;
- ``GET /api/board/watch?topic=``: Server-Sent Events, one ``post`` event per new post (ours and
  relayed), ``: keepalive`` comments in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from mesh402.api.bodies import sse
from mesh402.mesh.board import BoardError
from mesh402.mesh.board_sync import BoardSync

KEEPALIVE_S = 15.0
_OVER_SHARE = {"author_full", "rate_limited", "board_full"}


class NewPost(BaseModel):
    topic: str = Field(min_length=1, max_length=64)
    text: str = Field(min_length=1, max_length=4096)
    ttl_s: int | None = Field(default=None, ge=1, le=48 * 3600)


def install(app: FastAPI, sync: BoardSync, keepalive_s: float = KEEPALIVE_S) -> None:
    board = sync.board

    @app.get("/api/board")
    async def get_board(topic: str | None = Query(None, max_length=64), author: str | None = Query(None, max_length=64),
                        limit: int = Query(100, ge=0, le=1024)) -> dict[str, Any]:
        return {"posts": board.read(topic, limit, author), "board": board.status()}

    @app.post("/api/board")
    async def post_board(request: Request) -> JSONResponse:
        try:
            body = NewPost.model_validate_json(await request.body())
        except ValidationError as e:
            return JSONResponse({"error": "body must be {\"topic\": str, \"text\": str, \"ttl_s\": int}",
                                 "detail": e.errors(include_url=False, include_context=False)}, status_code=400)
        try:
            stored = sync.post(body.topic, body.text, body.ttl_s)
        except BoardError as e:
            return JSONResponse({"error": str(e), "code": e.code}, status_code=429 if e.code in _OVER_SHARE else 400)
        return JSONResponse(stored.view(), status_code=201)

    @app.get("/api/board/watch")
    async def watch_board(request: Request, topic: str | None = Query(None, max_length=64)) -> Any:
        try:
            q = board.subscribe()
        except BoardError as e:
            return JSONResponse({"error": str(e), "code": e.code}, status_code=503)

        async def stream() -> AsyncIterator[bytes]:
            try:
                while True:
                    try:
                        post = await asyncio.wait_for(q.get(), keepalive_s)
                    except TimeoutError:
                        if await request.is_disconnected():
                            return
                        yield b": keepalive\n\n"
                        continue
                    if topic is None or post["topic"] == topic:
                        yield sse(post, event="post")
            finally:
                board.unsubscribe(q)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
