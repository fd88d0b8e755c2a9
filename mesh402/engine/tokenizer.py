"""Tokenizer built from GGUF metadata or a Hugging Face folder, on the `tokenizers` library.

Encoding goes through `tokenizers` (same pre-tokenizers/BPE as transformers, so ids match).
Decoding is done here from a per-token byte table: `decode()` and the streaming
`IncrementalDecoder` then share one definition and agree byte for byte.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

log = logging.getLogger(__name__)

# llama.cpp token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regexes of well-known byte-level vocabularies; these are the published patterns.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRES = {"default", "gpt2", "gpt-2"}
_DIGIT_PRES = {"smollm", "starcoder", "refact"}  # GPT-2 split after isolating each digit
_LLAMA3_PRES = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx"}
_QWEN2_PRES = {"qwen2", "deepseek-r1-qwen"}

# Control tokens that end a turn; llama.cpp treats these as end-of-generation as well.
_END_MARKERS = frozenset(
    {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
     "<EOT>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|return|>"}
)
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-char table used by byte-level BPE vocabularies."""
    table = {b: chr(b) for b in [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_B2U = _byte_to_unicode()
_U2B = {c: b for b, c in _B2U.items()}


def _gguf_value(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar/str or list thereof."""
    field = reader.fields.get(key)
    if field is None:
        return default
    string = gguf.GGUFValueType.STRING
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        if field.types[-1] == string:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [field.parts[i][0].item() for i in field.data]
    if field.types[0] == string:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return field.parts[field.data[0]][0].item()


def _byte_level_pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """(pre-tokenizer, ignore_merges) for a `tokenizer.ggml.pre` name."""
    no_prefix = dict(add_prefix_space=False)
    if pre in _DIGIT_PRES:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(**no_prefix)]
        ), False
    if pre in _LLAMA3_PRES or pre in _QWEN2_PRES:
        split = _LLAMA3_SPLIT if pre in _LLAMA3_PRES else _QWEN2_SPLIT
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(use_regex=False, **no_prefix),
            ]
        ), pre in _LLAMA3_PRES  # llama3 looks whole words up before merging
    if pre not in _GPT2_PRES:
        warnings.warn(
            f"unknown tokenizer.ggml.pre {pre!r}; using the GPT-2 byte-level split "
            "(token ids may differ from the reference tokenizer)",
            stacklevel=3,
        )
    return pre_tokenizers.ByteLevel(**no_prefix), False


def _merges_from_scores(tokens: Sequence[str], types: Sequence[int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE as BPE merges: merging into a piece ranks by that piece's score.

    This is what llama.cpp's SPM tokenizer does (highest-scoring bigram first).
    """
    mergeable = {NORMAL, USER_DEFINED, UNUSED, 0}
    index = {t: i for i, t in enumerate(tokens) if types[i] in mergeable}
    ranked: list[tuple[float, int, int, str, str]] = []
    for tok, i in index.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in index and right in index:
                ranked.append((-scores[i], i, -cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _eos_list(first: Iterable[int | None], tokens: Sequence[str], special: Iterable[int]) -> list[int]:
    ids = [i for i in first if i is not None]
    ids += [i for i in sorted(special) if tokens[i] in _END_MARKERS]
    return list(dict.fromkeys(ids))


class Tokenizer:
    """Text <-> ids for one model. Build with `from_gguf` or `from_hf_dir`."""

    def __init__(
        self,
        backend: _Backend,
        pieces: list[bytes],
        special_ids: Iterable[int],
        *,
        bos_id: int | None,
        eos_ids: list[int],
        add_bos: bool,
        add_eos: bool = False,
        chat_template: str | None = None,
        strip_leading_space: bool = False,
    ) -> None:
        self._backend = backend
        self._literal: _Backend | None = None  # lazily built copy that ignores specials in text
        self._pieces = pieces
        self._special = frozenset(special_ids)
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template
        # SentencePiece prepends "▁" to the text, so decoding drops one leading space.
        self._strip_leading_space = strip_leading_space

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, source: gguf.GGUFReader | str | Path) -> Tokenizer:
        reader = source if isinstance(source, gguf.GGUFReader) else gguf.GGUFReader(str(source))
        get = lambda key, default=None: _gguf_value(reader, f"tokenizer.{key}", default)  # noqa: E731
        kind = get("ggml.model")
        tokens: list[str] = get("ggml.tokens")
        if tokens is None:
            raise ValueError("GGUF has no tokenizer.ggml.tokens")
        types: list[int] = get("ggml.token_type") or [NORMAL] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in get("ggml.merges") or []]
        special = [i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)]
        strip = False
        if kind == "gpt2":
            backend, pieces = _byte_level_backend(tokens, types, merges, get("ggml.pre", "default"))
        elif kind == "llama":
            strip = bool(get("ggml.add_space_prefix", True))
            scores = get("ggml.scores") or [0.0] * len(tokens)
            backend, pieces = _spm_backend(tokens, types, scores, merges, strip, get("ggml.unknown_token_id"))
        else:
            raise ValueError(f"unsupported tokenizer.ggml.model {kind!r} (supported: 'gpt2', 'llama')")
        eos = get("ggml.eos_token_id")
        return cls(
            backend,
            pieces,
            special,
            bos_id=get("ggml.bos_token_id"),
            eos_ids=_eos_list([eos, get("ggml.eot_token_id"), get("ggml.eom_token_id")], tokens, special),
            # llama.cpp defaults: SentencePiece vocabularies add BOS unless told otherwise.
            add_bos=bool(get("ggml.add_bos_token", kind == "llama")),
            add_eos=bool(get("ggml.add_eos_token", False)),
            chat_template=get("chat_template"),
            strip_leading_space=strip,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        root = Path(path)
        backend = _Backend.from_file(str(root / "tokenizer.json"))
        cfg = _read_json(root / "tokenizer_config.json")
        gen = _read_json(root / "generation_config.json")
        size = backend.get_vocab_size(with_added_tokens=True)
        tokens = [backend.id_to_token(i) or "" for i in range(size)]
        added = backend.get_added_tokens_decoder()
        special = [i for i, t in added.items() if t.special]

        def token_id(value: Any) -> int | None:
            text = value.get("content") if isinstance(value, dict) else value
            return backend.token_to_id(text) if isinstance(text, str) else None

        bos_id = token_id(cfg.get("bos_token"))
        gen_eos = gen.get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        # Without an explicit flag, see whether the post-processor would add BOS/EOS.
        probe_on = backend.encode("a", add_special_tokens=True).ids
        probe_off = backend.encode("a", add_special_tokens=False).ids
        add_bos = cfg.get("add_bos_token", bos_id is not None and probe_on[:1] == [bos_id] != probe_off[:1])
        eos_id = token_id(cfg.get("eos_token"))
        add_eos = cfg.get("add_eos_token", eos_id is not None and probe_on[-1:] == [eos_id] != probe_off[-1:])
        pieces, strip = _hf_pieces(backend, tokens, set(added))
        return cls(
            backend,
            pieces,
            special,
            bos_id=bos_id,
            eos_ids=_eos_list([eos_id, *gen_eos], tokens, special),
            add_bos=bool(add_bos),
            add_eos=bool(add_eos),
            chat_template=_hf_chat_template(root, cfg),
            strip_leading_space=strip,
        )

    # ---- API ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self._backend.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return self._backend.id_to_token(self.eos_ids[0]) if self.eos_ids else None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special: bool = True, *, parse_special: bool = True) -> list[int]:
        """Ids for `text`. Special tokens written in the text become their ids unless
        `parse_special=False` (use that for untrusted text that must not inject turn markers)."""
        backend = self._backend if parse_special else self._literal_backend()
        ids = backend.encode(text, add_special_tokens=False).ids
        return self._add_bos_eos(ids) if add_special else ids

    def _add_bos_eos(self, ids: list[int]) -> list[int]:
        if self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if self.add_eos and self.eos_ids:
            ids.append(self.eos_ids[0])
        return ids

    def encode_chat(self, segments: Iterable[tuple[str, bool]], add_special: bool = False) -> list[int]:
        """Ids for a rendered chat cut into (text, written_by_template) segments (ChatTemplate.render_segments).

        Tokenize by segment: special tokens count only where the template wrote them; caller text that
        spells a role marker (`<|im_start|>system`) stays plain text. A chat whose fields hold no special
        token gets exactly the ids of `encode(full text)` (one pass, so BPE merges across segment
        boundaries are untouched); only a chat with an injected marker is tokenized piece by piece.
        """
        parts = [(str(t), bool(tmpl)) for t, tmpl in segments]
        text = "".join(t for t, _ in parts)
        enc = self._backend.encode(text, add_special_tokens=False)
        fields, pos = [], 0
        for t, tmpl in parts:
            if not tmpl and t:
                fields.append((pos, pos + len(t)))
            pos += len(t)
        injected = any(tid in self._special and any(a < fe and fs < b for fs, fe in fields)
                       for tid, (a, b) in zip(enc.ids, enc.offsets))
        if not injected:
            ids = list(enc.ids)
        else:
            ids = []
            for t, tmpl in _merge_runs(parts):
                ids += self.encode(t, add_special=False, parse_special=tmpl)
        return self._add_bos_eos(ids) if add_special else ids

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < len(self._pieces):
            raise ValueError(f"token id {token_id} out of range [0, {len(self._pieces)})")
        return self._pieces[token_id]

    def token_to_piece(self, token_id: int) -> str:
        """The text of one token (a lone partial UTF-8 byte shows as U+FFFD)."""
        return self.token_bytes(token_id).decode("utf-8", "replace")

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        data = b"".join(self.token_bytes(i) for i in ids if not (skip_special and i in self._special))
        if self._strip_leading_space and data[:1] == b" ":
            data = data[1:]
        return data.decode("utf-8", "replace")

    def incremental_decoder(self, skip_special: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special)

    def _literal_backend(self) -> _Backend:
        if self._literal is None:
            literal = _Backend.from_str(self._backend.to_str())
            literal.encode_special_tokens = True
            self._literal = literal
        return self._literal


class IncrementalDecoder:
    """Streams text token by token; `push` returns only complete characters.

    Pending bytes of a split UTF-8 character (byte-level BPE or `<0xNN>` fallback) are held
    back. After the last token call `flush()`: "".join(pushes) + flush() == decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._at_start = True

    def push(self, token_id: int) -> str:
        if self._skip_special and self._tok.is_special(token_id):
            return ""
        data = self._tok.token_bytes(token_id)
        if self._at_start and data:
            self._at_start = False
            if self._tok._strip_leading_space and data[:1] == b" ":
                data = data[1:]
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Text for any trailing incomplete sequence (as U+FFFD), resetting the buffer."""
        return self._utf8.decode(b"", final=True)


def _merge_runs(parts: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Adjacent segments of the same kind joined, so each run tokenizes in one pass."""
    out: list[tuple[str, bool]] = []
    for t, tmpl in parts:
        if out and out[-1][1] == tmpl:
            out[-1] = (out[-1][0] + t, tmpl)
        elif t:
            out.append((t, tmpl))
    return out


# ---- builders ---------------------------------------------------------------------------------
def _add_specials(backend: _Backend, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Control/unknown tokens are special, user-defined ones plain added tokens; both are
    matched whole in raw text, as llama.cpp does."""
    control = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == USER_DEFINED]
    before = backend.get_vocab_size(with_added_tokens=True)
    backend.add_special_tokens(control)
    backend.add_tokens(user)
    if backend.get_vocab_size(with_added_tokens=True) != before:
        log.warning("some special tokens were not in the vocabulary and got new ids")


def _unique_vocab(keys: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, key in enumerate(keys):
        if vocab.setdefault(key, i) != i:
            log.warning("duplicate token %r at id %d (keeping id %d for encoding)", key, i, vocab[key])
    return vocab


def _byte_level_backend(
    tokens: Sequence[str], types: Sequence[int], merges: list[tuple[str, ...]], pre: str
) -> tuple[_Backend, list[bytes]]:
    keys: list[str] = []
    pieces: list[bytes] = []
    for tok, kind in zip(tokens, types):
        if kind in (CONTROL, USER_DEFINED, UNKNOWN):  # stored as raw text
            keys.append(tok)
            pieces.append(tok.encode())
            continue
        # A few converters store raw text for normal tokens; respell it in the byte alphabet.
        key = tok if all(c in _U2B for c in tok) else "".join(_B2U[b] for b in tok.encode())
        keys.append(key)
        pieces.append(bytes(_U2B[c] for c in key))
    pre_tok, ignore_merges = _byte_level_pre_tokenizer(pre)
    backend = _Backend(models.BPE(vocab=_unique_vocab(keys), merges=merges, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tok
    backend.decoder = decoders.ByteLevel()
    _add_specials(backend, tokens, types)
    return backend, pieces


def _spm_backend(
    tokens: Sequence[str],
    types: Sequence[int],
    scores: Sequence[float],
    merges: list[tuple[str, ...]],
    add_space_prefix: bool,
    unk_id: int | None,
) -> tuple[_Backend, list[bytes]]:
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    byte_fallback = BYTE in types
    bpe = models.BPE(
        vocab=_unique_vocab(tokens),
        merges=merges or _merges_from_scores(tokens, types, scores),
        unk_token=None if unk_id is None else tokens[unk_id],
        fuse_unk=True,
        byte_fallback=byte_fallback,
    )
    backend = _Backend(bpe)
    # SentencePiece: spaces become "▁" and one is prepended to the text (not after specials).
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_space_prefix else []))
    _add_specials(backend, tokens, types)
    pieces = [_spm_piece(tok, kind) for tok, kind in zip(tokens, types)]
    return backend, pieces


def _spm_piece(tok: str, kind: int) -> bytes:
    if kind == BYTE and (m := _BYTE_TOKEN.match(tok)):
        return bytes([int(m.group(1), 16)])
    if kind in (CONTROL, UNKNOWN):
        return tok.encode()
    return tok.replace("▁", " ").encode()


def _hf_pieces(backend: _Backend, tokens: list[str], added: set[int]) -> tuple[list[bytes], bool]:
    """Per-token bytes for a tokenizer.json, keyed off its decoder; plus 'strip one leading space'."""
    spec = json.loads(backend.to_str())
    decoder = json.dumps(spec.get("decoder"))
    if '"ByteLevel"' in decoder:
        return [tok.encode() if i in added else bytes(_U2B.get(c, 0x3F) for c in tok) for i, tok in enumerate(tokens)], False
    if '"ByteFallback"' in decoder or '"Metaspace"' in decoder or "\u2581" in decoder or "\\u2581" in decoder:
        strip = '"Strip"' in decoder or ('"Metaspace"' in decoder and '"never"' not in decoder)
        kinds = [CONTROL if i in added else BYTE if _BYTE_TOKEN.match(t) else NORMAL for i, t in enumerate(tokens)]
        return [_spm_piece(t, k) for t, k in zip(tokens, kinds)], strip
    # Other decoders (WordPiece, ...): per-token decode, approximate for joined words.
    return [backend.decode([i], skip_special_tokens=False).encode() for i in range(len(tokens))], False


def _hf_chat_template(root: Path, cfg: dict[str, Any]) -> str | None:
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}
