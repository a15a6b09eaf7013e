"""Readers for the evaluation data files (paths are always arguments; nothing is downloaded).

Formats (see docs/eval.md):

* text: any UTF-8 file (WikiText-2 raw `wiki.test.raw`), read as one string.
* PIQA: JSONL of {"goal", "sol1", "sol2"} with the labels (0/1 per line) in
  `<name>-labels.lst` next to `<name>.jsonl` (the original release), or a "label" field in
  each record (Hugging Face's export).
* LAMBADA (OpenAI): JSONL of {"text"}; the last space-separated word is the target.
* ARC: JSONL in llm-foundry's form {"query": "Question: …", "choices": [...], "gold": i}, in
  Hugging Face's {"question", "choices": {"text", "label"}, "answerKey"}, or in AI2's
  {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from halollm.errors import HaloError
from halollm.eval.zeroshot import Cloze, MultipleChoice

Item = MultipleChoice | Cloze


def read_text(path: str | Path) -> str:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HaloError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise HaloError(f"{p}: is a directory, not a text file") from None
    except UnicodeDecodeError as exc:
        raise HaloError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise HaloError(f"{p}: cannot read ({exc.strerror})") from None


def read_jsonl(path: str | Path, limit: int | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for the first `limit` non-blank lines, each a JSON object."""
    out: list[tuple[int, dict[str, Any]]] = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HaloError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})"
                            ) from None
        if not isinstance(rec, dict):
            raise HaloError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        out.append((n, rec))
    if not out:
        raise HaloError(f"{path}: no records")
    return out


def _field(rec: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str
           ) -> Any:
    if key not in rec:
        raise HaloError(f"{where}: missing field '{key}'")
    value = rec[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise HaloError(f"{where}: field '{key}' has the wrong type ({type(value).__name__})")
    return value


def _gold(value: Any, n: int, where: str) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise HaloError(f"{where}: answer {value!r} is not a choice index below {n}")
    return value


def piqa(path: str | Path, limit: int | None = None) -> list[MultipleChoice]:
    recs = read_jsonl(path, limit)
    labels: list[str] | None = None
    if "label" not in recs[0][1]:
        p = Path(path)
        lpath = p.with_name(p.name.removesuffix(".jsonl") + "-labels.lst")
        if not lpath.is_file():
            raise HaloError(f"{path}: records have no 'label' and there is no {lpath.name} "
                            "next to it (PIQA's labels file)")
        labels = read_text(lpath).split()
    items = []
    for i, (n, rec) in enumerate(recs):
        where = f"{path}:{n}"
        if labels is None:
            label = rec.get("label")
        elif i < len(labels):
            label = labels[i]
        else:
            raise HaloError(f"{path}: the labels file has fewer labels than records")
        choices = (_field(rec, "sol1", where), _field(rec, "sol2", where))
        items.append(MultipleChoice(f"Question: {_field(rec, 'goal', where)}\nAnswer:",
                                    choices, _gold(label, 2, where)))
    return items


def lambada(path: str | Path, limit: int | None = None) -> list[Cloze]:
    items = []
    for n, rec in read_jsonl(path, limit):
        text = _field(rec, "text", f"{path}:{n}")
        context, _, word = text.rpartition(" ")
        if not word:
            raise HaloError(f"{path}:{n}: the text ends with a space: no last word")
        items.append(Cloze(context, " " + word))
    return items


def arc(path: str | Path, limit: int | None = None) -> list[MultipleChoice]:
    items = []
    for n, rec in read_jsonl(path, limit):
        where = f"{path}:{n}"
        if "query" in rec:  # llm-foundry
            question = _field(rec, "query", where).removeprefix("Question: ")
            choices = _field(rec, "choices", where, list)
            gold = rec.get("gold")
        else:
            q = rec.get("question")
            if isinstance(q, dict):  # AI2 original
                question = _field(q, "stem", where)
                raw = _field(q, "choices", where, list)
                texts = [_field(c, "text", where) for c in raw if isinstance(c, dict)]
                keys = [str(c.get("label")) for c in raw if isinstance(c, dict)]
            else:  # Hugging Face
                question = _field(rec, "question", where)
                ch = _field(rec, "choices", where, dict)
                texts, keys = list(ch.get("text", [])), [str(k) for k in ch.get("label", [])]
            key = str(rec.get("answerKey"))
            if key not in keys:
                raise HaloError(f"{where}: answerKey {key!r} is not one of {keys}")
            choices, gold = texts, keys.index(key)
        if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise HaloError(f"{where}: 'choices' must be at least two strings")
        items.append(MultipleChoice(f"Question: {question}\nAnswer:", tuple(choices),
                                    _gold(gold, len(choices), where)))
    return items


READERS: dict[str, Callable[[str | Path, int | None], Sequence[Item]]] = {
    "piqa": piqa, "lambada": lambada, "arc_easy": arc}
