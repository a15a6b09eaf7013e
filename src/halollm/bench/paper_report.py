"""`halo bench paper`'s report: the headline, the table, the plots and the result files."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from halollm.bench.report import publish


def row(rows: list[dict[str, Any]], rate: float, config: str) -> dict[str, Any] | None:
    """The measured row of a configuration at a rate (None if absent or failed)."""
    return next((r for r in rows if r["loss"] == rate and r["config"] == config
                 and "error" not in r), None)


def headline(rows: list[dict[str, Any]], ref: dict[str, Any], rate: float
             ) -> dict[str, Any] | None:
    strict, halo = row(rows, rate, "strict"), row(rows, rate, "halo")
    if not strict or not halo:
        return None
    speedup = strict["decode_ms_per_token"] / halo["decode_ms_per_token"]
    ppl_delta = halo["ppl"] / ref["ppl"] - 1
    return {"loss": rate, "speedup": round(speedup, 2), "ppl_delta": round(ppl_delta, 5),
            "met": speedup >= 3.41 and abs(ppl_delta) <= 0.01}


def write(args: argparse.Namespace, spec: Any, lossy: list[str], ref: dict[str, Any],
          rows: list[dict[str, Any]], configs: Mapping[str, str], partial: bool = False
          ) -> None:
    """NAME.md, NAME.json and the two plots in args.out (`configs`: every configuration's
    description, in the order that fixes its colour)."""
    head = headline(rows, ref, args.headline_rate)
    lines = _intro(args, spec, lossy, ref)
    if head:
        lines += [f"**Headline, at {head['loss']:.0%} loss: HALO is {head['speedup']}x faster "
                  f"than strict, perplexity {head['ppl_delta']:+.2%} against the lossless "
                  f"single device** (aim: ≥ 3.41x and within 1%: "
                  f"{'met' if head['met'] else 'missed'}).", ""]
    lines += _table(rows, ref)
    lines += ["", "Configurations: " + "; ".join(f"`{n}`: {what}" for n, what in configs.items()
                                                 if any(r['config'] == n for r in rows)) + ".",
              "", f"Plots: `{args.name}_speed.png`, `{args.name}_accuracy.png`.", ""]
    if partial:
        lines[3:3] = ["**Interrupted: a partial result.**", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    _plot(args.out, args.name, [r for r in rows if "error" not in r], ref, list(configs))
    data = {"spec": str(args.spec), "lossy": lossy, "model": args.model or "default",
            "partial": partial,
            "coordinator_memory_budget": args.memory_budget, "reference": ref,
            "headline": head, "rows": rows}
    publish(args.out, args.name, data, lines, args.json)


def _intro(args: argparse.Namespace, spec: Any, lossy: list[str], ref: dict[str, Any]
           ) -> list[str]:
    devices = ", ".join(
        f"{d.name} (cpu {'full' if d.cpu is None else f'{d.cpu:.0%}'}, memory "
        f"{(d.memory_bytes or 0) / 2**20:.0f} MiB{', lossy' if d.name in lossy else ''})"
        for d in spec.devices)
    return ["# The paper's evaluation: speed and accuracy versus packet loss", "", "{header}",
            f"Spec: `{args.spec}`: the coordinator (this machine, memory budget "
            f"{args.memory_budget}) and {len(spec.devices)} workers: {devices}. Loss: "
            "kernel packet loss (nftables, random drop on arrival at both ends) on the lossy "
            "links, the same rate each way. Model: "
            f"`{args.model or 'default (SmolLM2-135M-Instruct)'}`.", "",
            f"Speed: median decode time over {args.tokens} greedy tokens after "
            f"{args.warmup} warm-up tokens ({args.strict_tokens} for strict). Accuracy, "
            "teacher-forced through the decode path under the same loss: top-1 agreement "
            f"and KL against the lossless single-device model over {ref['fixed_tokens']} "
            f"tokens of a fixed text; perplexity on the first {ref['ppl_tokens'] + 1} tokens "
            f"of WikiText-2 test (one window); PIQA acc on the first {ref['piqa_items']} "
            "validation items (`same`: items whose outcome equals the single device's). "
            "Strict is exact by construction and by test, so its accuracy is the single "
            "device's.", "",
            f"Lossless single device: perplexity **{ref['ppl']:.4f}**, PIQA acc "
            f"{ref['piqa_acc']}.", "", _alone(ref), ""]


def _alone(ref: dict[str, Any]) -> str:
    """The row every cluster is compared with: one such device holding the whole model."""
    ms = ref.get("single_device_ms_per_token")
    if ms is None:
        return ""
    share = ref.get("coordinator_cpu")
    regime = (f"held to {share:g} of a core, as the spec's `[coordinator] cpu` holds the "
              "coordinator" if share is not None else "at this machine's full speed (the "
              "spec gives the coordinator no `cpu`)")
    return (f"**One such device alone** (the whole model in one process, lossless, {regime}): "
            f"**{ms} ms/token**; the `vs one device` column is its time over each "
            "configuration's (above 1: the cluster is faster than one device).")


def _table(rows: list[dict[str, Any]], ref: dict[str, Any]) -> list[str]:
    lines = ["| loss | configuration | ms/token | p95 | speedup vs strict | vs one device | "
             "agreement | KL | perplexity (Δ) | PIQA acc (same) | lost / expected | groups per "
             "device (coordinator first) | re-plans |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- "
             "| ---: |"]
    alone = ref.get("single_device_ms_per_token")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['loss']:.0%} | {r['config']} | failed: {r['error']} |"
                         + " |" * 11)
            continue
        strict = row(rows, r["loss"], "strict")
        speed = (f"{strict['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x"
                 if strict else "")
        if "agreement" in r:
            acc = (f"{r['agreement']:.1%} | {r['kl']:.4f} | {r['ppl']:.3f} "
                   f"({r['ppl'] / ref['ppl'] - 1:+.2%}) | {r['piqa_acc']} "
                   f"({r['piqa_same_as_reference']}/{r['piqa_items']})")
        else:
            acc = "exact | 0 | = single device | = single device"
        vs_one = f"{alone / r['decode_ms_per_token']:.2f}x" if alone else ""
        lines.append(f"| {r['loss']:.0%} | {r['config']} | {r['decode_ms_per_token']} | "
                     f"{r['decode_ms_p95']} | {speed} | {vs_one} | {acc} | {r['lost']} / "
                     f"{r['expected']} | {r['groups_per_device']} | {r['replans']} |")
    return lines


def _plot(out: Path, name: str, rows: list[dict[str, Any]], ref: dict[str, Any],
          order: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    style = {"strict": "--", "relaxed": ":"}
    color = {cfg: f"C{k}" for k, cfg in enumerate(order)}  # the same in every figure

    def series(metric: str, cfg: str) -> tuple[list[float], list[float]]:
        pts = sorted((r["loss"], r[metric]) for r in rows if r["config"] == cfg and metric in r)
        return [100 * p[0] for p in pts], [p[1] for p in pts]

    def draw(ax: Any, metric: str, ylabel: str, skip: tuple[str, ...] = ()) -> None:
        for cfg in configs:
            if cfg not in skip:
                x, y = series(metric, cfg)
                ax.plot(x, y, marker="o", linestyle=style.get(cfg, "-"), color=color[cfg],
                        label=cfg)
        ax.set_xlabel("packet loss per direction on the lossy links (%)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)

    def save(fig: Any, axes: tuple[Any, ...], suffix: str) -> None:
        for ax in axes:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{name}_{suffix}.png", dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax, "decode_ms_per_token", "decode ms/token (median, log scale)")
    ax.set_yscale("log")
    save(fig, (ax,), "speed")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    a1.axhline(ref["ppl"], color="k", linewidth=0.8, label="single device (= strict)")
    a2.axhline(1.0, color="k", linewidth=0.8, label="single device (= strict)")
    draw(a1, "ppl", "WikiText-2 slice perplexity", skip=("strict",))
    draw(a2, "agreement", "top-1 agreement with the single device", skip=("strict",))
    save(fig, (a1, a2), "accuracy")
