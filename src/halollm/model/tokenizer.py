"""Tokenizer and chat template, built from the model itself (GGUF metadata or tokenizer.json).

GGUF files carry their vocabulary in metadata. Two kinds exist:

* ``gpt2``: byte-level BPE (vocab + merges). The pre-tokenizer (how text is split before
  BPE) is named by ``tokenizer.ggml.pre``; we map the names llama.cpp uses to the splitting
  rules of the original Hugging Face tokenizers.
* ``llama``: SentencePiece BPE (vocab + scores, byte fallback). SentencePiece merges the
  adjacent pair whose merged piece has the highest score, which is BPE with merges ranked by
  that score; we derive the merge list from the scores.

Both are run by the ``tokenizers`` library.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from halollm.errors import ModelLoadError

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1, 2, 3, 4, 5, 6)

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp pre-tokenizer names whose HF tokenizers split digits one by one before byte-level BPE.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone"}


def _byte_level_pre_tokenizer(pre: str) -> tuple[Any, bool]:
    """(pre-tokenizer, ignore_merges) for a GGUF ``tokenizer.ggml.pre`` name."""
    from tokenizers import Regex, pre_tokenizers

    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), False
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]), False
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False


def _add_special(tk: Any, tokens: Sequence[str], types: Sequence[int]) -> None:
    from tokenizers import AddedToken

    added = []
    for tok, typ in zip(tokens, types, strict=True):
        if typ in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN):
            added.append(AddedToken(tok, special=typ != TOKEN_USER_DEFINED, normalized=False))
    if added:
        tk.add_special_tokens(added)


def _check_gguf_vocab(meta: dict[str, Any]) -> None:
    """One clear error for a GGUF vocabulary that is missing or disagrees with itself."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelLoadError("model file lacks tokenizer.ggml.tokens (the vocabulary)")
    if not all(isinstance(t, str) for t in tokens):
        raise ModelLoadError("model file has non-text entries in tokenizer.ggml.tokens")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        value = meta.get(key)
        if value is not None and (not isinstance(value, list) or len(value) != len(tokens)):
            n = len(value) if isinstance(value, list) else type(value).__name__
            raise ModelLoadError(f"model file has {key} with {n} entries for "
                                 f"{len(tokens)} tokens")
    for key in ("bos_token_id", "eos_token_id", "eot_token_id", "unknown_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value < len(tokens)):
            raise ModelLoadError(f"model file has tokenizer.ggml.{key} = {value!r}, not a "
                                 f"token id (0..{len(tokens) - 1})")


def _gpt2_from_gguf(meta: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer, decoders, models

    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    pre, ignore_merges = _byte_level_pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False,
                              ignore_merges=ignore_merges))
    tk.pre_tokenizer = pre
    tk.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    _add_special(tk, tokens, types)
    return tk


def _spm_merges(tokens: Sequence[str], scores: Sequence[float],
                types: Sequence[int]) -> list[tuple[str, str]]:
    """Merge list equivalent to SentencePiece BPE: pairs ranked by the merged piece's score."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == TOKEN_NORMAL}
    ranked = []
    for piece, pid in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[pid], pid, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _spm_from_gguf(meta: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    tokens = list(meta["tokenizer.ggml.tokens"])
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    unk_id = int(meta.get("tokenizer.ggml.unknown_token_id", 0))
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab, _spm_merges(tokens, scores, types), unk_token=tokens[unk_id],
                              fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if prefix else []
    tk.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(dec)
    _add_special(tk, tokens, types)
    return tk


class Tokenizer:
    """Text <-> ids for one model, with its special tokens and chat template."""

    def __init__(self, backend: Any, *, bos_id: int | None, eos_ids: Iterable[int],
                 add_bos: bool, chat_template: str | None) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.add_bos = add_bos
        self.chat_template = chat_template

    # construction -----------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        _check_gguf_vocab(meta)
        kind = meta.get("tokenizer.ggml.model")
        if kind == "gpt2":
            backend = _gpt2_from_gguf(meta)
        elif kind == "llama":
            backend = _spm_from_gguf(meta)
        else:
            raise ModelLoadError(f"GGUF tokenizer type '{kind}' is not supported "
                                 "(supported: gpt2 byte-level BPE, llama SentencePiece)")
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eos_ids = {int(eos)} if eos is not None else set()
        eot = meta.get("tokenizer.ggml.eot_token_id")
        if eot is not None:
            eos_ids.add(int(eot))
        # Hugging Face's byte-level tokenizers add no BOS unless their post-processor says so;
        # SentencePiece (llama) tokenizers add one. GGUF's add_bos_token flag says the same.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        return cls(backend, bos_id=None if bos is None else int(bos), eos_ids=eos_ids,
                   add_bos=add_bos and bos is not None,
                   chat_template=meta.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_folder(cls, folder: Path) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder}: no tokenizer.json")
        backend = Backend.from_file(str(path))
        tcfg = _read_json(folder / "tokenizer_config.json")
        gcfg = _read_json(folder / "generation_config.json")
        mcfg = _read_json(folder / "config.json")

        def token_id(value: Any) -> int | None:
            if isinstance(value, dict):
                value = value.get("content")
            return None if value is None else backend.token_to_id(str(value))

        bos = token_id(tcfg.get("bos_token"))
        if bos is None:
            bos = gcfg.get("bos_token_id", mcfg.get("bos_token_id"))
        eos_ids: set[int] = set()
        for src in (gcfg.get("eos_token_id"), mcfg.get("eos_token_id"),
                    token_id(tcfg.get("eos_token"))):
            if isinstance(src, list):
                eos_ids.update(int(e) for e in src)
            elif src is not None:
                eos_ids.add(int(src))
        template = tcfg.get("chat_template")
        jinja = folder / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text()
        # tokenizer.json's post-processor already adds BOS where the model wants it.
        return cls(backend, bos_id=bos, eos_ids=eos_ids, add_bos=False, chat_template=template)

    # use ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of text; special-token strings in the text become their ids, except in
        a conversation from `render_chat`, where only the template's own special tokens do
        and whatever the messages contain is text."""
        if isinstance(text, ChatText) and text.defused is not None:
            ids = self._encode_defused(text)
        else:
            ids = list(self.backend.encode(text, add_special_tokens=True).ids)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special))

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def render_chat(self, messages: list[dict[str, str]], *,
                    add_generation_prompt: bool = True) -> ChatText:
        """The prompt text for a conversation, from the model's own chat template.

        Special-token strings typed inside a message (``<|im_start|>system``) must stay text,
        or a user could write a system turn. The result is the rendered text as a `ChatText`:
        when some message contains such a string it also carries a second rendering in which
        those strings are replaced by markers, so `encode` knows which special tokens the
        template wrote. Conversations without them tokenize exactly as before."""
        if not self.chat_template:
            raise ModelLoadError("this model has no chat template; run without --chat")
        context = {"add_generation_prompt": add_generation_prompt,
                   "bos_token": self._token_text(self.bos_id),
                   "eos_token": self._token_text(min(self.eos_ids, default=None))}
        text = render_template(self.chat_template, messages=messages, **context)
        pattern = self._special_pattern()
        contents = [m["content"] for m in messages if isinstance(m.get("content"), str)]
        if pattern is None or not any(pattern.search(c) for c in contents):
            return ChatText(text)
        marker = _unused_char([*contents, self.chat_template])
        found: list[str] = []

        def defuse(match: re.Match[str]) -> str:
            found.append(match.group(0))
            return f"{marker}{len(found) - 1}{marker}"

        safe = [{**m, "content": pattern.sub(defuse, m["content"])}
                if isinstance(m.get("content"), str) else m for m in messages]
        defused = render_template(self.chat_template, messages=safe, **context)
        return ChatText(text, defused, tuple(found), marker)

    def _special_pattern(self) -> re.Pattern[str] | None:
        """A regex matching this vocabulary's special (control) token strings, longest
        first (leftmost-longest, as the tokenizer matches them)."""
        if not hasattr(self, "_specials"):
            added = self.backend.get_added_tokens_decoder()
            self._special_ids = frozenset(i for i, t in added.items() if t.special)
            words = sorted({t.content for t in added.values() if t.special and t.content},
                           key=len, reverse=True)
            self._specials = re.compile("|".join(map(re.escape, words))) if words else None
        return self._specials

    def _encode_defused(self, chat: ChatText) -> list[int]:
        """Ids of a conversation whose messages held special-token strings: the special
        tokens found in the defused rendering are the template's own and become control
        tokens; the text between them, markers restored to the strings they replaced, is
        tokenized with special tokens treated as text. The pieces are split where the
        tokenizer itself splits (at special tokens), so everything else is unchanged."""
        from tokenizers import Encoding

        self._special_pattern()
        if getattr(self, "_as_text", None) is None:
            plain = type(self.backend).from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self._as_text = plain
        restore = re.compile(re.escape(chat.marker) + r"(\d+)" + re.escape(chat.marker))
        defused = chat.defused or ""
        parts: list[Any] = []

        def text(piece: str) -> None:
            if piece:
                piece = restore.sub(lambda m: chat.texts[int(m.group(1))], piece)
                parts.append(self._as_text.encode(piece, add_special_tokens=False))

        cursor = 0
        full = self.backend.encode(defused, add_special_tokens=False)
        for tid, (start, end) in zip(full.ids, full.offsets, strict=True):
            if tid in self._special_ids and end > start:
                text(defused[cursor:start])
                parts.append(self.backend.encode(defused[start:end], add_special_tokens=False))
                cursor = end
        text(defused[cursor:])
        if not parts:
            return []
        merged = Encoding.merge(parts, growing_offsets=True)
        return list(self.backend.post_process(merged, None, True).ids)

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self.backend.id_to_token(token_id) or ""


class ChatText(str):
    """A conversation rendered by the chat template (see `Tokenizer.render_chat`). As a
    string it is exactly the rendered prompt; `defused` is the same rendering with the
    special-token strings found inside messages replaced by `marker`-delimited indices into
    `texts` (None when there were none)."""

    defused: str | None
    texts: tuple[str, ...]
    marker: str

    def __new__(cls, text: str, defused: str | None = None, texts: tuple[str, ...] = (),
                marker: str = "") -> ChatText:
        obj = super().__new__(cls, text)
        obj.defused, obj.texts, obj.marker = defused, texts, marker
        return obj


def _unused_char(texts: Sequence[str]) -> str:
    """A private-use character that none of `texts` contains."""
    for code in range(0xF0000, 0xFFFFE):
        ch = chr(code)
        if not any(ch in t for t in texts):
            return ch
    raise ModelLoadError("cannot render this conversation safely")  # pragma: no cover


class TextStream:
    """Turns a growing list of ids into text deltas, never splitting a multi-byte character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            return ""
        delta = full[len(self.text):] if full.startswith(self.text) else full
        self.text = full
        return delta


def render_template(template: str, **context: Any) -> str:
    """Render a Hugging Face-style chat template with a sandboxed jinja2 environment."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ModelLoadError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False,
                                                                   indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(**context)
    except jinja2.TemplateError as exc:
        raise ModelLoadError(f"chat template error: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: unreadable ({exc})") from exc
    return data if isinstance(data, dict) else {}
