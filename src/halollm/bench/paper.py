"""`halo bench paper`: the paper's evaluation on the kernel testbed -- decode speed and
accuracy versus packet-loss rate for strict tensor parallelism, relaxed synchronisation with a
static placement, and full HALO, plus an ablation removing one mechanism at a time.

The testbed comes up once from the spec; for each loss rate the lossy devices' nftables rules
are replaced (`halo testbed loss`), then every configuration runs on a fresh coordinator:
greedy decoding after a warm-up (during which HALO measures devices and links and re-plans),
then, teacher-forced through the decode path under that loss: top-1 agreement and KL over a
fixed text against the lossless single-device model, perplexity on a WikiText-2 slice, and
PIQA accuracy on a subset. Strict synchronisation is exact by construction (and by test:
tests/test_runtime.py), so its accuracy is the single-device model's and only its speed is
measured under loss (teacher-forcing it at seconds per token would take hours).

Configurations (all on the same partition: the predictor's groups):
  strict             wait for every contribution over TCP, equal split (distributed-llama)
  relaxed            relaxed sync, the same equal split, no per-token criticality
  halo               relaxed + predictor (per-token criticality, missing critical groups
                     recomputed by the coordinator) + scheduler (--placement halo, measured
                     profiles, re-planning) + loader (devices stream a share beyond their
                     memory budget)
  halo-no-predictor  halo without per-token criticality
  halo-no-scheduler  halo on the equal split
  halo-no-loader     halo with every memory budget a hard limit (no streaming)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from halollm.bench import paper_report
from halollm.bench.loss import FIXED_TEXT, PROMPT
from halollm.bench.report import require_testbed, stage_printer
from halollm.errors import HaloError
from halollm.eval import data as eval_data
from halollm.eval.agree import accuracy
from halollm.eval.ppl import PerplexityTally, perplexity, sliding_windows
from halollm.eval.zeroshot import TaskTally, evaluate, scorer
from halollm.generate import Decoder, LocalDecoder, generate, teacher_forced
from halollm.model.loader import load_model
from halollm.runtime.coordinator import Coordinator
from halollm.runtime.keys import cluster_key
from halollm.runtime.options import ClusterOptions
from halollm.sampling import SamplingParams
from halollm.units import parse_bytes


@dataclass(frozen=True)
class Config:
    mode: str  # strict | relaxed
    placement: str
    critical_share: float | None  # None: the runtime's default (per-token criticality on)
    what: str
    streaming: bool = True  # halo placement may stream groups beyond a worker's memory


CONFIGS = {
    "strict": Config("strict", "equal", None, "strict sync, equal split (distributed-llama)"),
    "relaxed": Config("relaxed", "equal", 0.0, "relaxed sync, static equal split"),
    "halo": Config("relaxed", "halo", None, "predictor + scheduler + loader"),
    "halo-no-predictor": Config("relaxed", "halo", 0.0, "HALO without the predictor"),
    "halo-no-scheduler": Config("relaxed", "equal", None, "HALO without the scheduler"),
    "halo-no-loader": Config("relaxed", "halo", None, "HALO without the loader: memory "
                             "budgets are hard limits", streaming=False),
}
MAIN = ("strict", "relaxed", "halo")
ABLATIONS = ("halo-no-predictor", "halo-no-scheduler", "halo-no-loader")
DEFAULT_SPEC = Path("examples/paper.toml")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("paper", help="the paper's evaluation: speed and accuracy vs loss, "
                                     "baselines and ablations (testbed, root)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, metavar="DIR",
                   help="the evaluation data folder (wikitext-2/wiki.test.raw, "
                        "piqa/valid.jsonl + valid-labels.lst), e.g. ../shared/data")
    p.add_argument("--spec", type=Path, default=DEFAULT_SPEC, metavar="FILE",
                   help=f"testbed spec (default {DEFAULT_SPEC}: 8 nodes, 4 on lossy Wi-Fi)")
    p.add_argument("--lossy", default=None, metavar="NAMES",
                   help="devices whose loss is swept, comma-separated (default: those with "
                        "a loss in the spec)")
    p.add_argument("--rates", default="0,0.02,0.05,0.1",
                   help="packet-loss rates per direction (default 0,0.02,0.05,0.1)")
    p.add_argument("--configs", default=",".join(MAIN),
                   help=f"configurations at every rate, some of {', '.join(CONFIGS)} "
                        f"(default {','.join(MAIN)})")
    p.add_argument("--ablations", default=",".join(ABLATIONS),
                   help="configurations run only at --headline-rate (default "
                        f"{','.join(ABLATIONS)}; '' for none)")
    p.add_argument("--headline-rate", type=float, default=0.05, metavar="P",
                   help="the loss rate of the headline comparison and of the ablation "
                        "(default 0.05, the paper's)")
    p.add_argument("--memory-budget", default="64MiB", metavar="SIZE",
                   help="the coordinator's memory budget (default 64MiB, like the spec's "
                        "devices: no node holds the whole model)")
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens measured (16)")
    p.add_argument("--warmup", type=int, default=16,
                   help="tokens decoded first, not measured (HALO measures and re-plans) (16)")
    p.add_argument("--strict-tokens", type=int, default=6,
                   help="tokens measured for strict sync, seconds each under loss (6)")
    p.add_argument("--forced-tokens", type=int, default=None, metavar="N",
                   help="agreement over the first N tokens of the fixed text (default all)")
    p.add_argument("--ppl-tokens", type=int, default=256, metavar="N",
                   help="perplexity on the first N tokens of WikiText-2 test, one window "
                        "(default 256)")
    p.add_argument("--piqa-items", type=int, default=12, metavar="N",
                   help="PIQA validation items scored (default 12; 0 for none)")
    p.add_argument("--model", metavar="PATH", help="model (default: the default model)")
    p.add_argument("--predictor", default="auto", metavar="PATH",
                   help="predictor file (default: the one `halo calibrate` saved for the "
                        "model)")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--name", default="paper", help="result file names (default paper)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def _names(text: str, what: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        raise HaloError(f"{what}: unknown configuration {bad[0]!r} (choose from "
                        f"{', '.join(CONFIGS)})")
    return names


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise HaloError(f"--rates must be numbers separated by commas (got {text!r})") from None
    if not rates or any(not 0 <= r < 1 for r in rates):
        raise HaloError("--rates must be loss rates in [0, 1)")
    return rates


@dataclass
class Workload:
    """What every configuration is measured on, and the lossless single device's answers."""

    tok: Any
    prompt: list[int]
    fixed: list[int]
    wiki: list[int]
    piqa: list[Any]
    ref_logits: torch.Tensor
    reference: dict[str, Any]


def run(args: argparse.Namespace) -> int:
    from halollm.testbed import cluster

    configs, ablations, rates, spec, lossy = _check(args)
    require_testbed("paper")
    torch.set_num_threads(1)
    say = stage_printer("paper")
    args.predictor = _predictor_path(args.model, args.predictor)
    with cluster.coordinator_share(spec) as share:  # the coordinator is a device too
        if share is not None:
            say(f"the coordinator (this process) is held to {share:g} of a core")
        return _sweep(args, configs, ablations, rates, spec, lossy, say, share)


def _sweep(args: argparse.Namespace, configs: list[str], ablations: list[str],
           rates: list[float], spec: Any, lossy: list[str], say: Any, share: float | None
           ) -> int:
    from halollm.testbed import cluster

    budget = parse_bytes(args.memory_budget)
    say("reference: the lossless single-device model…")
    work = _reference(args)
    work.reference["coordinator_cpu"] = share
    say(f"    perplexity {work.reference['ppl']:.4f} on {work.reference['ppl_tokens']} "
        f"tokens, PIQA {work.reference['piqa_acc']} on {len(work.piqa)} items; alone "
        f"{work.reference['single_device_ms_per_token']} ms/token")
    plan = [(r, c) for r in rates for c in configs + (ablations if r == args.headline_rate
                                                      else [])]
    rows: list[dict[str, Any]] = []
    say(f"testbed {spec.name} up ({len(spec.devices)} workers; loss swept on "
        f"{', '.join(lossy)})…")
    state = cluster.up(spec, model=args.model, log=lambda m: None)
    addrs = [(w["address"], int(w["port"])) for w in state["workers"]]
    t0 = time.time()
    current: float | None = None
    partial = False
    try:
        for k, (rate, name) in enumerate(plan, start=1):
            if rate != current:
                for d in lossy:
                    cluster.set_loss(spec, d, rate, rate)
                current = rate
            say(f"[{k}/{len(plan)}] loss {rate:.0%}: {name} ({time.time() - t0:.0f}s elapsed)")
            rows.append(_measured_row(rate, name, addrs, state["key"], budget, args, work, say))
    except KeyboardInterrupt:
        partial = True
        say(f"interrupted: writing the {len(rows)} configurations measured so far")
    finally:
        cluster.down(spec, quiet=True)
    paper_report.write(args, spec, lossy, work.reference, rows,
                       {n: c.what for n, c in CONFIGS.items()}, partial)
    return 130 if partial else 0


def _check(args: argparse.Namespace) -> tuple[list[str], list[str], list[float], Any,
                                             list[str]]:
    """(configurations, ablations, rates, spec, lossy devices) from the arguments, every
    one checked before anything starts."""
    from halollm.testbed.spec import load_spec

    configs = _names(args.configs, "--configs")
    ablations = _names(args.ablations, "--ablations")
    rates = _rates(args.rates)
    if not configs:
        raise HaloError("--configs names no configuration")
    if args.headline_rate not in rates:
        raise HaloError(f"--headline-rate {args.headline_rate} is not one of --rates "
                        f"{args.rates}")
    if min(args.tokens, args.strict_tokens) < 2 or args.warmup < 0 or args.ppl_tokens < 2 \
            or args.piqa_items < 0:
        raise HaloError("--tokens and --strict-tokens must be at least 2, --ppl-tokens at "
                        "least 2, --warmup and --piqa-items at least 0")
    if not args.spec.is_file():
        raise HaloError(f"--spec {args.spec}: no such file (the default is relative to the "
                        "repository's root)")
    spec = load_spec(args.spec)
    lossy = ([n.strip() for n in args.lossy.split(",") if n.strip()] if args.lossy else
             [d.name for d in spec.devices if d.loss_in or d.loss_out])
    unknown = set(lossy) - {d.name for d in spec.devices}
    if unknown or not lossy:
        why = f"no device {sorted(unknown)[0]!r}" if unknown else "no device is lossy"
        raise HaloError(f"--lossy: {why} (devices: "
                        f"{', '.join(d.name for d in spec.devices)})")
    for path in _data_paths(args).values():
        if not path.is_file():
            raise HaloError(f"--data {args.data}: no {path.relative_to(args.data)} in it "
                            "(the layout of ../shared/data)")
    return configs, ablations, rates, spec, lossy


def _data_paths(args: argparse.Namespace) -> dict[str, Path]:
    """The evaluation files the run reads (PIQA only when items are scored)."""
    paths = {"wiki": args.data / "wikitext-2" / "wiki.test.raw"}
    if args.piqa_items:
        paths["piqa"] = args.data / "piqa" / "valid.jsonl"
    return paths


def _measured_row(rate: float, name: str, addrs: list[tuple[str, int]], key: str, budget: int,
                  args: argparse.Namespace, work: Workload, say: Callable[[str], None]
                  ) -> dict[str, Any]:
    """One configuration at one rate, as a row of the report (its error if it cannot run
    here: that is a result too)."""
    row: dict[str, Any] = {"loss": rate, "config": name}
    try:
        row.update(_measure(CONFIGS[name], addrs, key, budget, args, work))
    except HaloError as exc:
        row["error"] = str(exc)
        say(f"    failed: {exc}")
        return row
    acc = (f", agreement {row['agreement']:.1%}, ppl {row['ppl']:.3f}, PIQA "
           f"{row['piqa_acc']}" if "agreement" in row else "")
    say(f"    {row['decode_ms_per_token']} ms/token{acc}, groups per device "
        f"{row['groups_per_device']}")
    return row


def _predictor_path(model: str | None, predictor: str) -> str:
    """The predictor every HALO configuration uses, checked now (not after the testbed)."""
    from halollm.model.loader import content_hash, open_source
    from halollm.predictor import store

    source = open_source(model)
    try:
        path = Path(source.path)
        return str(store.load_for(path, content_hash(path),
                                  None if predictor == "auto" else predictor).path)
    finally:
        source.close()


def _reference(args: argparse.Namespace) -> Workload:
    paths = _data_paths(args)
    model = load_model(args.model, None)
    tok = model.tokenizer
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": PROMPT}]))
    fixed = tok.encode(FIXED_TEXT)[:args.forced_tokens]
    # one window: at most the model's context
    wiki = tok.encode(eval_data.read_text(paths["wiki"]))[:min(args.ppl_tokens,
                                                               model.config.max_position)]
    piqa = eval_data.piqa(paths["piqa"], args.piqa_items) if args.piqa_items else []
    local = LocalDecoder(model.transformer)
    alone = _decode_ms(local, tok, prompt, args)  # one such device, the whole model
    ref_logits = teacher_forced(local, fixed)
    ppl, piqa_tally = _accuracy(local, tok, model.config.max_position, wiki, piqa)
    del model
    reference = {"ppl": ppl.ppl, "ppl_tokens": ppl.tokens, "fixed_tokens": len(fixed),
                 "single_device_ms_per_token": round(alone, 2),
                 **_piqa_json(piqa_tally), "piqa_correct": piqa_tally.correct}
    return Workload(tok, prompt, fixed, wiki, piqa, ref_logits, reference)


def _decode_ms(decoder: Decoder, tok: Any, prompt: list[int], args: argparse.Namespace
               ) -> float:
    """Median decode ms/token of the lossless single device, measured as the cluster's
    configurations are (greedy, after the warm-up tokens)."""
    greedy = SamplingParams(temperature=0.0)
    generate(decoder, tok, prompt, max_tokens=max(1, args.warmup), sampling=greedy)
    result = generate(decoder, tok, prompt, max_tokens=args.tokens, sampling=greedy,
                      ignore_eos=True)
    return statistics.median(result.step_s) * 1e3


def _accuracy(decoder: Decoder, tok: Any, max_position: int, wiki: list[int],
              piqa: list[Any]) -> tuple[PerplexityTally, TaskTally]:
    """Perplexity of the WikiText slice (one window) and PIQA, both through the decode path
    (one token at a time: what runs under loss on a cluster)."""
    def logits(ids: Any) -> torch.Tensor:
        return teacher_forced(decoder, ids)

    ppl = perplexity(logits, wiki, sliding_windows(len(wiki), len(wiki), len(wiki)))
    tally = TaskTally("piqa", "choice", len(piqa))
    if piqa:
        evaluate(piqa, scorer(logits, tok.encode, max_position), tally)
    return ppl, tally


def _piqa_json(tally: TaskTally) -> dict[str, Any]:
    j = tally.to_json()
    return {"piqa_acc": j["acc"], "piqa_acc_norm": j.get("acc_norm"), "piqa_items": j["items"]}


def _measure(cfg: Config, addrs: list[tuple[str, int]], key: str, budget: int,
             args: argparse.Namespace, work: Workload) -> dict[str, Any]:
    opts = ClusterOptions.build(mode=cfg.mode, placement=cfg.placement, memory_budget=budget,
                          predictor=args.predictor, streaming=cfg.streaming)
    if cfg.critical_share is not None:
        opts.sync.critical_share = cfg.critical_share
    coord = Coordinator(args.model, None, addrs, cluster_key(key), opts, log=lambda m: None)
    try:
        strict = cfg.mode == "strict"
        warmup = 1 if strict else args.warmup
        if warmup:
            generate(coord, work.tok, work.prompt, max_tokens=warmup,
                     sampling=SamplingParams(), ignore_eos=True)
        res = generate(coord, work.tok, work.prompt,
                       max_tokens=args.strict_tokens if strict else args.tokens,
                       sampling=SamplingParams(), ignore_eos=True)
        steps = [1e3 * s for s in res.step_s]
        out: dict[str, Any] = {
            "mode": cfg.mode, "placement": cfg.placement,
            "critical_share": opts.sync.critical_share,
            "decode_ms_per_token": round(statistics.median(steps), 2),
            "decode_ms_p95": round(sorted(steps)[int(0.95 * (len(steps) - 1))], 2),
            "prefill_ms": round(1e3 * res.prefill_s, 1)}
        if not strict:
            forced: list[float] = []
            agree, kl = accuracy(teacher_forced(coord, work.fixed, forced), work.ref_logits)
            ppl, piqa = _accuracy(coord, work.tok, coord.config.max_position, work.wiki,
                                  work.piqa)
            same = sum(a == b for a, b in zip(piqa.correct, work.reference["piqa_correct"],
                                              strict=True))
            out.update(agreement=round(agree, 4), kl=round(kl, 5), ppl=round(ppl.ppl, 4),
                       forced_ms_per_token=round(1e3 * statistics.median(forced[1:]), 2),
                       **_piqa_json(piqa), piqa_same_as_reference=same)
        sync = coord.sync_json()
        out.update(groups_per_device=sync["placement"]["groups_per_device"],
                   replans=len(sync["placement"].get("replans", [])),
                   lost=sync["lost"], expected=sync["expected"], fallbacks=sync["fallbacks"],
                   streamed={w["address"]: (w.get("reported") or {}).get("loader")
                             for w in sync["workers"]
                             if (w.get("reported") or {}).get("loader")})
        return out
    finally:
        coord.close()
