"""`halo bench peer`, the pure part: reading the peers' output, the interleaved plan, the
medians and the tables (no processes, no network: tests/test_bench_peer.py runs it all).

distributed-llama's `dllama inference` (src/dllama.cpp) prints one line per predicted token,
`🔶 Pred   86 ms Sync    0 ms | Sent … kB Recv … kB | piece` (whole milliseconds, truncated,
of that token's compute and synchronisation), then a summary whose `Prediction` block reads
`tokens/s: 11.53 (86.71 ms/tok)`: the mean of compute + sync over the predicted tokens, in
float. That mean is the number compared here ("dllama ms/token"); HALO's is
`decode_ms_per_token`, also a mean over the decode steps. The medians of both are kept too.

llama.cpp's `llama-bench -o json` prints a JSON list, one object per test, with `n_gen`,
`n_threads`, `avg_ts` (tokens/s) and `samples_ts`; ms/token is 1000 / avg_ts.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from typing import Any

from halollm.errors import HaloError

_PRED = re.compile(r"Pred\s*(\d+)\s*ms\s+Sync\s*(\d+)\s*ms")
_SUMMARY = re.compile(r"^Prediction\s*\n\s*nTokens:\s*(\d+)\s*\n\s*tokens/s:\s*([\d.]+|inf|nan)"
                      r"\s*\(([\d.]+|inf|nan)\s*ms/tok\)", re.MULTILINE)
_EVAL_TOKENS = re.compile(r"^Evaluation\s*\n.*?\n\s*nTokens:\s*(\d+)", re.MULTILINE)


def parse_dllama(text: str) -> dict[str, Any]:
    """The timing of one `dllama inference` run from its stdout; HaloError when the summary
    is missing (the run died, or dllama's output format changed)."""
    m = _SUMMARY.search(text)
    if not m:
        tail = text.strip().splitlines()[-3:]
        raise HaloError("dllama printed no 'Prediction … ms/tok' summary (last lines: "
                        + " | ".join(tail) + ")")
    per_token = [int(p) + int(s) for p, s in _PRED.findall(text)]
    ev = _EVAL_TOKENS.search(text)
    return {"pred_tokens": int(m.group(1)), "tokens_per_s": float(m.group(2)),
            "ms_per_token": float(m.group(3)),
            "median_ms_per_token": statistics.median(per_token) if per_token else None,
            "eval_tokens": int(ev.group(1)) if ev else None,
            "per_token_ms": per_token}


def parse_llama_bench(text: str) -> list[dict[str, Any]]:
    """The text-generation tests of one `llama-bench -o json` run: n_gen, threads,
    tokens/s and ms/token."""
    start = text.find("[")
    try:
        tests = json.loads(text[start:]) if start >= 0 else None
    except ValueError:
        tests = None
    if not isinstance(tests, list):
        raise HaloError("llama-bench printed no JSON list (was it run with -o json?)")
    out = []
    for t in tests:
        if int(t.get("n_gen", 0)) <= 0 or int(t.get("n_prompt", 0)) != 0:
            continue  # a prompt-processing test
        ts = float(t["avg_ts"])
        out.append({"n_gen": int(t["n_gen"]), "threads": int(t["n_threads"]),
                    "tokens_per_s": ts, "ms_per_token": 1e3 / ts if ts > 0 else None,
                    "model_type": t.get("model_type"), "build_commit": t.get("build_commit"),
                    "cpu_info": t.get("cpu_info")})
    if not out:
        raise HaloError("llama-bench's JSON has no text-generation (n_gen > 0, n_prompt 0) "
                        "test")
    return out


@dataclass(frozen=True)
class Run:
    """One measurement of the plan: `system` (dllama, or a HALO mode) on `nodes` nodes at
    `loss` ('0', '0.05', 'mixed', or '-' for one node), repeat `repeat`."""
    repeat: int
    nodes: int
    loss: str
    system: str


def plan(nodes: list[int], losses: list[str], modes: list[str], repeats: int) -> list[Run]:
    """Interleaved: for each repeat, each configuration (nodes x loss), dllama first, then
    each HALO mode; one node is a single configuration (no link, so no loss): dllama alone
    and `halo generate`."""
    runs = []
    for r in range(1, repeats + 1):
        for n in nodes:
            if n == 1:
                runs += [Run(r, 1, "-", "dllama"), Run(r, 1, "-", "halo-generate")]
                continue
            for loss in losses:
                runs += [Run(r, n, loss, s) for s in ["dllama", *modes]]
    return runs


def lossy_workers(workers: int, loss: str) -> int:
    """How many of `workers` links lose packets: all of them at a numeric rate > 0; 'mixed'
    is 3 of the 7 worker links of 8 nodes at 5%, scaled to smaller clusters (round(3/7 of
    the workers), at least one: 1 of 1, 1 of 3, 3 of 7)."""
    if loss == "mixed":
        return max(1, round(3 * workers / 7))
    return workers if float(loss) > 0 else 0


def loss_rate(loss: str) -> float:
    return 0.05 if loss == "mixed" else float(loss)


def medians(results: list[dict[str, Any]], by: tuple[str, ...] = ("nodes", "loss", "system"),
            key: str = "ms_per_token") -> list[dict[str, Any]]:
    """One row per distinct `by` in first-seen order: the median of `key` over the repeats
    that succeeded, with how many did and the first error."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    rows = []
    for ident, rs in groups.items():
        ok = [r[key] for r in rs if r.get(key) is not None and "error" not in r]
        errors = [r["error"] for r in rs if "error" in r]
        rows.append({**dict(zip(by, ident, strict=True)),
                     key: round(statistics.median(ok), 2) if ok else None,
                     "runs": len(ok), "of": len(rs), "values": [round(v, 2) for v in ok],
                     **({"error": errors[0]} if errors else {})})
    return rows


def _cell(row: dict[str, Any] | None, key: str = "ms_per_token") -> str:
    if row is None:
        return "–"
    if row.get(key) is None:
        return "failed"
    n = "" if row["runs"] == row["of"] else f" ({row['runs']}/{row['of']})"
    return f"{row[key]:.1f}{n}"


def dllama_table(rows: list[dict[str, Any]], modes: list[str]) -> list[str]:
    """Markdown: one line per (nodes, loss), ms/token of dllama and each HALO mode, and
    dllama / best HALO."""
    head = ["nodes", "loss", "dllama"] + [f"HALO {m}" for m in modes] + \
        ["dllama / best HALO"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    by = {(r["nodes"], r["loss"], r["system"]): r for r in rows}
    seen: list[tuple[int, str]] = []
    for r in rows:
        if (r["nodes"], r["loss"]) not in seen:
            seen.append((r["nodes"], r["loss"]))
    for nodes, loss in seen:
        systems = ["halo-generate"] if nodes == 1 else modes
        halo = [by.get((nodes, loss, s)) for s in systems]
        cells = [_cell(h) for h in halo] + ["–"] * (len(modes) - len(halo))
        best = [h["ms_per_token"] for h in halo if h and h.get("ms_per_token")]
        d = by.get((nodes, loss, "dllama"))
        ratio = (f"{d['ms_per_token'] / min(best):.2f}x" if best and d and d.get(
            "ms_per_token") else "–")
        lines.append(f"| {nodes} | {loss} | {_cell(d)} | " + " | ".join(cells)
                     + f" | {ratio} |")
    return lines


def llamacpp_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: one line per thread count, llama-bench tg and `halo generate` ms/token."""
    lines = ["| threads | llama.cpp llama-bench | HALO generate | HALO / llama.cpp |",
             "| --- | --- | --- | --- |"]
    by = {(r["threads"], r["system"]): r for r in rows}
    for t in sorted({r["threads"] for r in rows}):
        lc, h = by.get((t, "llama.cpp")), by.get((t, "halo-generate"))
        ratio = (f"{h['ms_per_token'] / lc['ms_per_token']:.2f}x" if lc and h and
                 lc.get("ms_per_token") and h.get("ms_per_token") else "–")
        lines.append(f"| {t} | {_cell(lc)} | {_cell(h)} | {ratio} |")
    return lines
