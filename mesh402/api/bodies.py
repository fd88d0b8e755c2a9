"""What crosses HTTP at the edge: request bodies read and validated into pydantic models, and
server-sent events written."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from mesh402.api.errors import APIError, bad_request
from mesh402.api.fields import Table, check

Body = TypeVar("Body", bound=BaseModel)


def validation_message(err: ValidationError | RequestValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts)


async def read_json(request: Request, model: type[Body], max_bytes: int, table: Table | None = None,
                    endpoint: str = "") -> Body:
    """The request body as `model`; 413 over `max_bytes`, 400 for anything malformed, and with a field
    `table` (api/fields.py) 400 naming a refused or unknown field."""
    body = await request.body()
    if len(body) > max_bytes:
        raise APIError(413, f"request body over {max_bytes} bytes")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    if table is not None:
        check(data, table, endpoint)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise bad_request(validation_message(e)) from None


def sse(obj: Any, event: str | None = None) -> bytes:
    """One server-sent event (`event:` line when named) carrying `obj` as JSON. A Responses event (a `type`
    such as "response.output_text.delta") is named by its type, as OpenAI sends them."""
    kind = obj.get("type") if isinstance(obj, dict) else None
    event = event or (kind if isinstance(kind, str) and kind.startswith("response.") else None)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':') if event else None)}\n\n".encode()
