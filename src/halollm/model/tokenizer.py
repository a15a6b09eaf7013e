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
        """Token ids of text; special-token strings in the text become their ids."""
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
                    add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, from the model's own chat template."""
        if not self.chat_template:
            raise ModelLoadError("this model has no chat template; run without --chat")
        return render_template(self.chat_template, messages=messages,
                               add_generation_prompt=add_generation_prompt,
                               bos_token=self._token_text(self.bos_id),
                               eos_token=self._token_text(min(self.eos_ids, default=None)))

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self.backend.id_to_token(token_id) or ""


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
