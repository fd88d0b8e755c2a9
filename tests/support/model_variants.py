"""Generated model variants for router tests: the bundled weights with different metadata
(capability tags, a tool-aware chat template), so routing must follow metadata, not names."""

from __future__ import annotations

from pathlib import Path

TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou can call these tools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_variant(dst: Path, tags: list[str], template: str | None = TOOLS_TEMPLATE) -> Path:
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    from mesh402.models.catalog import bundled_model_path

    if dst.exists():
        return dst
    reader = gguf.GGUFReader(str(bundled_model_path()), "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(str(dst) + ".tmp", arch=arch, endianess=reader.endianess)
    new = {"general.tags": MetadataDetails(gguf.GGUFValueType.ARRAY, list(tags), sub_type=gguf.GGUFValueType.STRING)}
    if template is not None:
        new[gguf.Keys.Tokenizer.CHAT_TEMPLATE] = MetadataDetails(gguf.GGUFValueType.STRING, template)
    copy_with_new_metadata(reader, writer, new, [])
    Path(str(dst) + ".tmp").rename(dst)
    return dst
