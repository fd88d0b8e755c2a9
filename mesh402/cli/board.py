"""`mesh402 board post/read/watch`: the mesh blackboard through the running node's console."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from mesh402.cli.common import HomeOpt, fail, find_console

board_app = typer.Typer(help="The mesh blackboard: short signed posts every member can read and write.",
                        no_args_is_help=True)


def _show(post: dict[str, Any]) -> None:
    at = time.strftime("%H:%M:%S", time.localtime(post["created_ms"] / 1000))
    print(f"{at} [{post['topic']}] {post['author'][:12]}: {post['text']}", flush=True)


def _error(r: Any) -> str:
    try:
        return str(r.json().get("error"))
    except ValueError:
        return r.text[:200]


@board_app.command("post")
def post_cmd(
    topic: Annotated[str, typer.Argument(help="Topic, at most 64 characters on one line.")],
    text: Annotated[str, typer.Argument(help="Text, at most 4096 bytes.")],
    ttl: Annotated[int, typer.Option("--ttl", help="Seconds the post lives (at most 48 h).")] = 3600,
    home: HomeOpt = None,
) -> None:
    """Post to the mesh blackboard as this node (signed with its key)."""
    import httpx

    base, headers, _ = find_console(home)
    try:
        r = httpx.post(f"{base}/api/board", json={"topic": topic, "text": text, "ttl_s": ttl}, headers=headers,
                       timeout=10.0)
    except httpx.HTTPError as e:
        fail(f"cannot reach the node's console at {base}: {e}")
    if r.status_code != 201:
        fail(f"post refused: {_error(r)}")
    print(r.json()["id"], flush=True)


@board_app.command("read")
def read_cmd(
    topic: Annotated[str | None, typer.Option("--topic", help="Only posts of this topic.")] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many posts (the newest).")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print the posts as JSON.")] = False,
    home: HomeOpt = None,
) -> None:
    """Print the live posts, oldest first."""
    import httpx

    base, headers, _ = find_console(home)
    params: dict[str, Any] = {"limit": limit, **({"topic": topic} if topic else {})}
    try:
        r = httpx.get(f"{base}/api/board", params=params, headers=headers, timeout=10.0)
    except httpx.HTTPError as e:
        fail(f"cannot reach the node's console at {base}: {e}")
    if r.status_code != 200:
        fail(f"read refused: {_error(r)}")
    posts = r.json()["posts"]
    if as_json:
        print(json.dumps(posts, indent=1))
        return
    for p in posts:
        _show(p)


@board_app.command("watch")
def watch_cmd(
    topic: Annotated[str | None, typer.Option("--topic", help="Only posts of this topic.")] = None,
    home: HomeOpt = None,
) -> None:
    """Print new posts as they arrive, until interrupted."""
    import httpx

    base, headers, _ = find_console(home)
    try:
        with httpx.stream("GET", f"{base}/api/board/watch", params={"topic": topic} if topic else {},
                          headers=headers, timeout=httpx.Timeout(10.0, read=None)) as r:
            if r.status_code != 200:
                r.read()
                fail(f"watch refused: {_error(r)}")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    _show(json.loads(line[6:]))
    except httpx.HTTPError as e:
        fail(f"lost the node's console at {base}: {e}")
    except KeyboardInterrupt:
        pass
