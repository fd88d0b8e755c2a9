"""Classify a chat request by what it asks for and how much work it is.

Keyword and structure signals on the request alone (no model is called): category is one of
code, reasoning, tool_call, creative, info, chat; complexity is quick, moderate or deep.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

CATEGORIES = ("code", "reasoning", "tool_call", "creative", "info", "chat")
COMPLEXITIES = ("quick", "moderate", "deep")

_CODE = ("```", "def ", "class ", "function", "python", "javascript", "typescript", "rust", "golang", " sql",
         "select ", "regex", "compile", "stack trace", "traceback", "exception", "bug", "refactor", "unit test",
         "api endpoint", "json schema", "import ", "return ", "variable", "algorithm", "code", "script",
         "bash", "dockerfile", "kubernetes", "segfault", "null pointer", "async ", "lambda", "implement")
_CODE_RE = re.compile(r"[{};]\s*$|\w+\(\)|=>|::|\bfn\b|#include", re.M)
_REASON = ("prove", "proof", "step by step", "why does", "derive", "calculate", "how many", "solve",
           "logic", "puzzle", "theorem", "probability", "equation", "reason", "deduce", "compare and contrast",
           "trade-off", "tradeoff")
_CREATIVE = ("poem", "story", "lyrics", "haiku", "fiction", "novel", "imagine", "write a song", "roleplay",
             "character", "screenplay", "creative")
_INFO = ("what is", "who is", "who was", "when did", "where is", "define", "definition", "explain", "summarize",
         "summary", "history of", "capital of", "facts", "list of", "tell me about")
_DEEP = ("in detail", "thorough", "comprehensive", "step by step", "deep dive", "design a", "architecture",
         "analyze", "analyse", "prove")
_DEV_SYSTEM = ("you are a coding", "software engineer", "programming assistant", "code assistant", "developer")


@dataclass(frozen=True)
class Classification:
    category: str
    complexity: str
    needs_tools: bool
    prompt_chars: int
    signals: tuple[str, ...] = ()

    def label(self) -> str:
        return f"{self.category}/{self.complexity}"


def content_text(content: Any) -> str:
    """A chat message's content as text: the string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _count(text: str, words: Iterable[str]) -> int:
    return sum(1 for w in words if w in text)


def classify(messages: list[dict[str, Any]], tools: list[Any] | None = None) -> Classification:
    users = [content_text(m.get("content")) for m in messages if m.get("role") == "user"]
    system = " ".join(content_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer")).lower()
    last = users[-1] if users else (content_text(messages[-1].get("content")) if messages else "")
    text = last.lower()
    total = sum(len(content_text(m.get("content"))) for m in messages)
    code = _count(text, _CODE) + len(_CODE_RE.findall(last))
    reason = _count(text, _REASON)
    creative = _count(text, _CREATIVE)
    info = _count(text, _INFO)
    dev_system = _count(system, _DEV_SYSTEM) > 0
    signals = []
    if code >= 2 or (code >= 1 and not (reason or creative or info)) or (dev_system and code >= 1) or \
            (dev_system and not (creative or info)):
        cat = "code"
        signals.append(f"code signals={code}{' dev-system' if dev_system else ''}")
    elif reason >= 2 or (reason >= 1 and not (creative or info)):
        cat = "reasoning"
        signals.append(f"reasoning signals={reason}")
    elif creative >= 1:
        cat = "creative"
        signals.append(f"creative signals={creative}")
    elif tools:
        cat = "tool_call"
        signals.append("tools given")
    elif info >= 1:
        cat = "info"
        signals.append(f"info signals={info}")
    else:
        cat = "chat"
    deep = _count(text, _DEEP)
    if deep or len(last) > 500 or len(messages) > 10:
        cx = "deep"
    elif len(last) < 60 and len(messages) <= 2:
        cx = "quick"
    else:
        cx = "moderate"
    return Classification(cat, cx, bool(tools), total, tuple(signals))
