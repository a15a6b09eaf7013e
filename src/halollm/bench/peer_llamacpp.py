"""`halo bench peer --llama-cpp`: llama.cpp's llama-bench on one device against `halo
generate` on the same GGUF (docs/peer.md); and the commits every peer result records."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path
from typing import Any

from halollm.bench import peer_report as rep
from halollm.bench import peer_run as prun
from halollm.bench.report import write_results
from halollm.errors import HaloError

PROMPT = "The capital of France is"


def halo_row(j: dict[str, Any]) -> dict[str, Any]:
    return {
        "ms_per_token": j["decode_ms_per_token"],
        "median_ms_per_token": j.get("decode_ms_median_per_token"),
        "pred_tokens": len(j.get("token_ids", [])) or None
    }


def _commit(folder: Path | None) -> str | None:
    """A peer's commit: its PEER_COMMIT file (written when it was checked out from an
    archive, docs/peer.md), else git's HEAD."""
    if folder is None:
        return None
    f = folder / "PEER_COMMIT"
    if f.is_file():
        return f.read_text().strip()
    proc = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=False)
    return proc.stdout.strip() or "unknown"


def commits(args: argparse.Namespace) -> dict[str, Any]:
    here = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False,
                           cwd=Path(__file__).parent).stdout.strip()
    return {
        "halo": here + (" (with uncommitted changes)" if dirty else ""),
        "distributed-llama": _commit(args.dllama),
        "llama.cpp": _commit(args.llama_cpp)
    }


def check(args: argparse.Namespace) -> tuple[Path, Path]:
    from halollm.model.loader import default_model_path

    bench = args.llama_cpp / "build" / "bin" / "llama-bench"
    if not bench.is_file():
        raise HaloError(f"--llama-cpp {args.llama_cpp}: no build/bin/llama-bench (build it "
                        "with cmake, docs/peer.md)")
    gguf = args.llama_cpp_model or default_model_path()
    if not Path(gguf).is_file():
        raise HaloError(f"--llama-cpp-model {gguf}: no such file")
    return bench, Path(gguf)


def sweep(args: argparse.Namespace, tools: tuple[Path, Path], say: Any) -> int:
    bench, gguf = tools
    cg = prun.root_cgroup(args.cpu)
    runs = [(r, t, s) for r in range(1, args.repeats + 1) for t in (1, 2)
            for s in ("llama.cpp", "halo-generate")]
    results, partial = [], False
    try:
        for k, (r, t, s) in enumerate(runs, start=1):
            row: dict[str, Any] = {"repeat": r, "threads": t, "system": s}
            try:
                if s == "llama.cpp":
                    out = prun.run_limited([
                        str(bench), "-m",
                        str(gguf), "-p", "0", "-n",
                        str(args.tokens), "-t",
                        str(t), "-r", "1", "-o", "json"
                    ], args.timeout, cg)
                    row.update(rep.parse_llama_bench(out)[0])
                else:
                    row.update(
                        halo_row(
                            prun.halo_single(str(gguf), None, PROMPT, args.tokens, t, args.timeout,
                                             cg)))
            except HaloError as exc:
                row["error"] = str(exc)
            results.append(row)
            say(f"[{k}/{len(runs)}] repeat {r}, -t {t}, {s}: " +
                (f"{row['ms_per_token']:.1f} ms/token" if "error" not in
                 row else f"failed: {row['error']}"))
    except KeyboardInterrupt:
        partial = True
    _write_llamacpp(args, gguf, results, partial)
    return 130 if partial else 0


def _write_llamacpp(args: argparse.Namespace, gguf: Path, results: list[dict[str, Any]],
                    partial: bool) -> None:
    rows = rep.medians(results, by=("threads", "system"))
    done = commits(args)
    lines = [
        "# HALO vs llama.cpp on one device", "", "{header}",
        f"Commits: HALO {done['halo']}, llama.cpp {done['llama.cpp']}.\n",
        f"Model `{gguf}` in its own format on both. llama.cpp: `llama-bench -p 0 -n "
        f"{args.tokens} -t T -r 1` (tg{args.tokens}: generation from an empty "
        f"context, after its warm-up run; ms/token = 1000 / avg_ts). HALO: `halo "
        f"generate --max-tokens {args.tokens} --ignore-eos` with OMP_NUM_THREADS=T "
        "(decode_ms_per_token, the mean over the decode steps after the prompt). "
        f"Median of {args.repeats} interleaved repeats" +
        (f"; both held to {args.cpu:g} of a core" if args.cpu else "") + "." +
        (" **Interrupted: partial.**" if partial else ""), "", *rep.llamacpp_table(rows), ""
    ]
    data = {
        "commits": done,
        "partial": partial,
        "model": str(gguf),
        "tokens": args.tokens,
        "repeats": args.repeats,
        "cpu_share": args.cpu,
        "rows": rows,
        "runs": results
    }
    md = write_results(args.out, "llamacpp", data, "\n".join(lines))
    print("\n".join(lines[3:]))
    print(f"written: {md}", flush=True)
