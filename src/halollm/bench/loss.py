"""`halo bench loss`: strict vs relaxed synchronisation over real packet loss.

For each cluster size, layout and loss rate: a testbed comes up (kernel packet loss, or
user-space loss without root), every mode decodes the same greedy tokens, and the relaxed
modes are teacher-forced over a fixed text to measure top-1 agreement and KL against the
lossless single-device model (strict mode is exact by construction and by test). Modes:
``strict`` (wait for everything, TCP), ``relaxed`` (criticality from the static plan only) and
``halo`` (relaxed with the semantic-aware predictor: per token, the contributions carrying
the critical share of the predicted significance must arrive; the coordinator computes a
missing one itself). All modes use the same partition and placement.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from halollm.bench.report import publish, stage_printer
from halollm.errors import HaloError
from halollm.eval.agree import accuracy
from halollm.generate import LocalDecoder, generate, teacher_forced
from halollm.model.loader import load_model
from halollm.runtime.coordinator import Coordinator
from halollm.runtime.keys import cluster_key
from halollm.runtime.local import LocalWorkers
from halollm.runtime.options import ClusterOptions
from halollm.sampling import SamplingParams

PROMPT = "Explain in a few sentences why the sky is blue."
# A fixed text for teacher-forced accuracy (written for this project; not evaluation data,
# not calibration data), ~210 tokens: agreement is counted over ~210 positions.
FIXED_TEXT = (
    "The harbour was quiet in the early morning. Fishing boats rocked gently at their "
    "moorings while gulls circled above the market, waiting for the first catch of the day to "
    "be unloaded onto the stone quay. By seven the first crates arrived: mackerel, a few "
    "crabs, and a large cod that the youngest fisherman carried as proudly as a trophy. The "
    "harbour master checked the tide tables, drank his coffee standing up, and wrote the "
    "names of the boats still at sea on the blackboard by the door. A storm had been "
    "forecast for the afternoon, and everyone knew what that meant. Nets had to be mended "
    "before noon, the ferry to the island would probably be cancelled, and the café would be "
    "full of people complaining about the weather. In the library above the post office, a "
    "retired teacher was writing a history of the town. She had found letters from 1890 "
    "describing the same storms, the same arguments about the price of fish, and the same "
    "hope that next season would be better.")
MODES = ("strict", "relaxed", "halo")
KEY = "bench-loss"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("loss", help="strict vs relaxed over packet-loss rates",
                       description=__doc__)
    p.add_argument("--rates", default="0,0.01,0.02,0.05,0.1", help="loss rates (each way)")
    p.add_argument("--workers", default="4,8", help="cluster sizes (default 4,8)")
    p.add_argument("--layouts", default="half,all",
                   help="half: half the links lossy; all: every link lossy")
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens per run (16)")
    p.add_argument("--repeats", type=int, default=2, help="runs per mode (default 2)")
    p.add_argument("--network", choices=["auto", "testbed", "userspace"], default="auto")
    p.add_argument("--modes", default=",".join(MODES),
                   help="strict, relaxed (static plan only), halo (relaxed + predictor)")
    p.add_argument("--predictor", default="auto", metavar="PATH",
                   help="predictor for the halo mode (default: the one `halo calibrate` saved)")
    p.add_argument("--critical-share", type=float, default=None, metavar="S",
                   help="per-token critical share of the halo mode (default: the runtime's)")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _cluster(n: int, rates: list[float], network: str):  # type: ignore[no-untyped-def]
    """(addresses, key, coordinator-side drop rates, closer)."""
    if network == "testbed":
        from halollm.testbed import cluster
        from halollm.testbed.spec import parse_spec

        spec = parse_spec({"name": "bloss", "subnet": "10.83", "device": [
            {"name": f"d{i + 1}", "loss": r} for i, r in enumerate(rates)]})
        state = cluster.up(spec, key=KEY, log=lambda m: None)
        addrs = [(w["address"], int(w["port"])) for w in state["workers"]]
        return addrs, [], lambda: cluster.down(spec, quiet=True)
    lw = LocalWorkers(n, KEY, threads=1, drop_rates=rates)
    return lw.addresses, rates, lw.stop


@dataclass(frozen=True)
class _Workload:
    tok: Any
    prompt: list[int]
    fixed: list[int]
    ref_logits: torch.Tensor  # the lossless single device's, teacher-forced over `fixed`


def run(args: argparse.Namespace) -> int:
    from halollm.testbed.system import unavailable

    torch.set_num_threads(1)
    network = args.network
    if network == "auto":
        network = "userspace" if unavailable() else "testbed"
    say = stage_printer("loss")

    ref_model = load_model(None, None)
    tok = ref_model.tokenizer
    fixed = tok.encode(FIXED_TEXT)
    work = _Workload(tok, tok.encode(tok.render_chat([{"role": "user", "content": PROMPT}])),
                     fixed, teacher_forced(LocalDecoder(ref_model.transformer), fixed))
    rates = [float(r) for r in args.rates.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise HaloError(f"--modes takes some of {', '.join(MODES)}")
    sizes = [int(n) for n in args.workers.split(",")]
    layouts = [s.strip() for s in args.layouts.split(",")]
    configs = [(n, lay, r) for n in sizes for lay in layouts for r in rates
               if not (r == 0 and lay != layouts[0])]
    rows: list[dict[str, Any]] = []
    t_start = time.time()
    for k, (n, layout, rate) in enumerate(configs, start=1):
        link_rates = [rate if (layout == "all" or i >= n // 2) else 0.0 for i in range(n)]
        say(f"[{k}/{len(configs)}] {n} workers, {layout} lossy, loss {rate:.0%} "
            f"({time.time() - t_start:.0f}s elapsed)")
        addrs, drop, close = _cluster(n, link_rates, network)
        try:
            for mode in modes:
                row = {"workers": n, "layout": layout, "loss": rate, "mode": mode,
                       **_measure(mode, addrs, drop, args, work)}
                rows.append(row)
                say(f"    {mode}: {row['decode_ms_median']} ms/token (p95 "
                    f"{row['decode_ms_p95']}), agreement {row['agreement']:.1%}")
        finally:
            close()
    _write(args, network, rows)
    return 0


def _measure(mode: str, addrs: list[tuple[str, int]], drop: list[float],
             args: argparse.Namespace, work: _Workload) -> dict[str, Any]:
    """Speed and accuracy of one mode on one cluster. Every mode gets the same partition
    and placement (the predictor's, when there is one): only what is waited for differs."""
    opts = ClusterOptions.build(mode="strict" if mode == "strict" else "relaxed",
                                drop_rates=drop, predictor=args.predictor)
    if mode == "relaxed":
        opts.sync.critical_share = 0.0  # no per-token criticality
    elif args.critical_share is not None:
        opts.sync.critical_share = args.critical_share
    coord = Coordinator(None, None, addrs, cluster_key(KEY), opts)
    try:
        if mode == "halo" and coord.predictor is None:
            raise HaloError("the halo mode needs a predictor: run `halo calibrate "
                            "--text FILE` first (or pass --predictor)")
        steps: list[float] = []
        for _ in range(args.repeats):
            res = generate(coord, work.tok, work.prompt, max_tokens=args.tokens,
                           sampling=SamplingParams(), ignore_eos=True)
            steps += [1e3 * s for s in res.step_s]
        row: dict[str, Any] = {
            "decode_ms_median": round(statistics.median(steps), 2),
            "decode_ms_p95": round(sorted(steps)[int(0.95 * (len(steps) - 1))], 2),
            "tokens_per_s": round(1e3 / statistics.median(steps), 2)}
        sync = coord.sync_json()
        row.update(lost=sync["lost"], expected=sync["expected"], fallbacks=sync["fallbacks"],
                   predict_ms_per_token=sync["predict_ms_per_token"])
        if mode != "strict":
            forced: list[float] = []
            agree, kl = accuracy(teacher_forced(coord, work.fixed, forced), work.ref_logits)
            row.update(agreement=round(agree, 4), kl=round(kl, 5),
                       forced_ms_median=round(1e3 * statistics.median(forced[1:]), 2))
        else:
            row.update(agreement=1.0, kl=0.0)
        return row
    finally:
        coord.close()


def _speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per relaxed-family row: its speed against strict (same cluster, layout and
    loss) and against its own mode without loss."""
    out = []
    for r in rows:
        if r["mode"] == "strict":
            continue
        strict = next((s for s in rows if s["mode"] == "strict" and s["workers"] == r["workers"]
                       and s["layout"] == r["layout"] and s["loss"] == r["loss"]), None)
        lossless = next((s for s in rows if s["mode"] == r["mode"] and s["loss"] == 0
                         and s["workers"] == r["workers"]), None)
        ms = r["decode_ms_median"]
        out.append({**{k: r.get(k) for k in ("workers", "layout", "loss", "mode", "agreement",
                                             "kl", "forced_ms_median")},
                    "strict_ms": strict["decode_ms_median"] if strict else None, "ms": ms,
                    "speedup": round(strict["decode_ms_median"] / ms, 2) if strict else None,
                    "vs_lossless": round(ms / lossless["decode_ms_median"], 2)
                    if lossless else None})
    return out


def _write(args: argparse.Namespace, network: str, rows: list[dict[str, Any]]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    summary = _speedups(rows)
    with (args.out / "loss.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    _plot(args.out, rows)
    how = ("kernel packet loss by nftables in network namespaces" if network == "testbed"
           else "datagrams dropped in user space")
    lines = ["# Strict vs relaxed under packet loss", "", "{header}",
             f"Network: **{network}** ({how}). Loss is per "
             f"direction on each lossy link; `half`: half the workers behind lossy links, "
             f"`all`: every worker. {args.tokens} greedy tokens × {args.repeats} runs per mode; "
             "median and p95 of per-token decode time. Accuracy: relaxed modes teacher-forced "
             f"over a fixed {len(FIXED_TEXT.split())}-word text, top-1 agreement and KL against "
             "the lossless single-device model (strict is exact). Placement (the same for every "
             "mode): attention and the groups carrying the critical share of each layer's MLP "
             "significance on the coordinator. `relaxed`: nothing on a worker is critical; "
             "`halo`: the predictor marks, per token, the worker contributions that must "
             "arrive (computed by the coordinator when missing at the deadline).", "",
             "| workers | layout | loss | mode | strict ms/token | ms/token | speedup vs strict |"
             " vs same mode lossless | agreement | KL | teacher-forced ms/token |",
             "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in summary:
        lines.append(f"| {s['workers']} | {s['layout']} | {s['loss']:.0%} | {s['mode']} | "
                     f"{s['strict_ms']} | {s['ms']} | {s['speedup']}x | {s['vs_lossless']}x | "
                     f"{s['agreement']:.1%} | {s['kl']:.4f} | {s['forced_ms_median']} |")
    lines += ["", "Plots: `loss_latency.png`, `loss_agreement.png`. Raw rows: `loss.csv`, "
              "`loss.json`.", ""]
    data = {"network": network, "rows": rows, "summary": summary}
    publish(args.out, "loss", data, lines, args.json)


def _plot(out: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["workers"], r["layout"]) for r in rows})
    for metric, fname, ylabel in (("decode_ms_median", "loss_latency.png", "ms/token (median)"),
                                  ("agreement", "loss_agreement.png", "top-1 agreement")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for n, layout in groups:
            for mode in MODES:
                if metric == "agreement" and mode == "strict":
                    continue
                pts = sorted((r["loss"], r[metric]) for r in rows if r["workers"] == n and
                             r["mode"] == mode and (r["layout"] == layout or r["loss"] == 0))
                if pts:
                    ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o",
                            linestyle={"strict": "--", "relaxed": ":"}.get(mode, "-"),
                            label=f"{mode}, {n} workers, {layout} lossy")
        ax.set_xlabel("packet loss per direction on lossy links (%)")
        ax.set_ylabel(ylabel)
        if metric == "decode_ms_median":
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
