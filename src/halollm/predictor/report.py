"""The predictor's quality report: ranking quality on held-out signals and the end-to-end
cost of dropping groups chosen by the predictor, the oracle, the static ranking and chance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from halollm.groups import KINDS, Kind
from halollm.predictor import ablation
from halollm.predictor.signals import GroupedModel, collect
from halollm.predictor.store import Predictor

FRACTIONS = (0.05, 0.1, 0.2, 0.3)
METHODS = ("predicted", "oracle", "static", "random")


def quality(gm: GroupedModel, predictor: Predictor, chunks: Sequence[list[int]],
            fractions: Sequence[float] = FRACTIONS, kinds: Sequence[Kind] = ("mlp",),
            progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """{"ranking": {kind: …}, "full": {ppl}, "results": {fraction: {method: {kl, agreement,
    ppl, dropped_per_layer}}}, "gap_closed": {fraction: share}, "tokens": N}."""
    held = collect(gm, chunks)
    n_layers = len(gm.layers)
    ranking = {kind: ablation.ranking_quality(predictor.nets[kind], held, kind, n_layers)
               for kind in KINDS if gm.partition.count(0, kind) > 1}
    rankers = {"predicted": ablation.predicted(predictor.nets), "oracle": ablation.oracle(),
               "static": ablation.static(predictor.static), "random": ablation.random(0)}
    table = ablation.ablate(gm, chunks, rankers, fractions, kinds, progress)
    full = table.pop("full")["model"]
    return {"tokens": sum(len(c) for c in chunks), "kinds": list(kinds), "ranking": ranking,
            "full": {"ppl": full["ppl"]}, "results": table,
            "gap_closed": {frac: gap_closed(row) for frac, row in table.items()}}


def gap_closed(row: dict[str, dict]) -> float | None:
    """Share of the static-vs-oracle KL gap the predictor closes (1 = as good as the oracle)."""
    gap = row["static"]["kl"] - row["oracle"]["kl"]
    if gap <= 0:
        return None
    return round((row["static"]["kl"] - row["predicted"]["kl"]) / gap, 3)


def format_report(report: dict[str, Any]) -> str:
    lines = [f"held-out tokens: {report['tokens']}; full model perplexity "
             f"{report['full']['ppl']}"]
    for kind, q in report["ranking"].items():
        lines.append(f"{kind}: recall of the true top {q['top_fraction']:.0%} groups "
                     f"{q['recall_top']:.1%}, Spearman {q['spearman']:.3f}, significance share "
                     f"in predicted top {q['share_in_predicted_top']:.1%} (oracle "
                     f"{q['share_in_true_top']:.1%})")
    lines.append(f"dropping the lowest-ranked groups of every layer ({', '.join(report['kinds'])})"
                 ": KL to the full model / top-1 agreement / perplexity")
    lines.append(f"{'drop':>6} {'per layer':>9} " + " ".join(f"{m:>24}" for m in METHODS)
                 + "  gap closed")
    for frac, row in report["results"].items():
        per = "+".join(str(v) for v in row["predicted"]["dropped_per_layer"].values())
        cells = " ".join(f"{row[m]['kl']:>8.4f} {row[m]['agreement']:>6.1%} {row[m]['ppl']:>8.2f}"
                         for m in METHODS)
        closed = gap_closed(row)
        lines.append(f"{float(frac):>6.0%} {per:>9} {cells}  "
                     f"{'-' if closed is None else f'{closed:.0%}'}")
    return "\n".join(lines)
