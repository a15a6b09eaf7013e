"""`halo bench placement`: equal, memory-proportional and HALO placement on a heterogeneous
testbed, all under relaxed synchronisation (so that placement alone differs), plus strict
synchronisation with the equal split (distributed-llama's configuration).

The testbed comes up from the spec (kernel packet loss, CPU quotas); every configuration
decodes the same greedy tokens after a warm-up (during which HALO measures the devices and
links and re-plans), then is teacher-forced over a fixed text for top-1 agreement and KL
against the lossless single-device model. Strict synchronisation is exact by construction
and by test, so its agreement is 1 without teacher forcing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from halollm.bench.loss import FIXED_TEXT, PROMPT
from halollm.bench.report import publish, require_testbed, stage_printer
from halollm.errors import HaloError
from halollm.eval.agree import accuracy
from halollm.generate import LocalDecoder, generate, teacher_forced
from halollm.model.loader import load_model
from halollm.runtime.coordinator import Coordinator
from halollm.runtime.keys import cluster_key
from halollm.runtime.options import ClusterOptions
from halollm.sampling import SamplingParams
from halollm.units import parse_bytes

CONFIGS = ("strict-equal", "equal", "memory", "halo")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("placement", help="equal vs memory vs HALO placement (testbed, root)",
                       description=__doc__)
    p.add_argument("--spec", required=True, metavar="FILE",
                   help="testbed spec (TOML), e.g. examples/hetero.toml")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"some of {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--tokens", type=int, default=24, help="decoded tokens measured (24)")
    p.add_argument("--warmup", type=int, default=24,
                   help="tokens decoded first, not measured: profiles fill, HALO re-plans (24)")
    p.add_argument("--predictor", default="auto", metavar="PATH",
                   help="predictor for every relaxed configuration (default: the one `halo "
                        "calibrate` saved; 'none' for none)")
    p.add_argument("--model", metavar="PATH",
                   help="model for the coordinator, the workers and the reference (default: "
                        "the default model); e.g. one from `halo make-model` for speed")
    p.add_argument("--forced-tokens", type=int, default=None, metavar="N",
                   help="teacher-force only the first N tokens of the fixed text (default: "
                        "all, ~210)")
    p.add_argument("--memory-budget", default="1G", metavar="SIZE",
                   help="the coordinator's memory budget (default 1G)")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--json", action="store_true",
                   help="print {placement: {decode_ms_per_token, agreement, …}} as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from halollm.testbed import cluster
    from halollm.testbed.spec import load_spec

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not configs or any(c not in CONFIGS for c in configs):
        raise HaloError(f"--configs takes some of {', '.join(CONFIGS)}")
    if args.tokens < 2 or args.warmup < 0:
        raise HaloError("--tokens must be at least 2 and --warmup at least 0")
    spec = load_spec(args.spec)
    require_testbed("placement")
    budget = parse_bytes(args.memory_budget)
    torch.set_num_threads(1)

    say = stage_printer("placement")

    say("reference: the lossless single-device model, teacher-forced over the fixed text…")
    ref_model = load_model(args.model, None)
    tok = ref_model.tokenizer
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": PROMPT}]))
    fixed = tok.encode(FIXED_TEXT)[: args.forced_tokens]
    ref_logits = teacher_forced(LocalDecoder(ref_model.transformer), fixed)
    del ref_model
    results: dict[str, dict[str, Any]] = {}
    say(f"testbed {spec.name} up ({len(spec.devices)} devices)…")
    state = cluster.up(spec, model=args.model, log=lambda m: None)
    addrs = [(w["address"], int(w["port"])) for w in state["workers"]]
    t0 = time.time()
    try:
        for k, name in enumerate(configs, start=1):
            say(f"[{k}/{len(configs)}] {name} ({time.time() - t0:.0f}s elapsed)")
            results[name] = _measure(name, addrs, state["key"], budget, args, tok, prompt,
                                     fixed, ref_logits)
            r = results[name]
            say(f"    {r['decode_ms_per_token']} ms/token, agreement {r['agreement']:.1%}, "
                f"groups per device {r['groups_per_device']}")
    finally:
        cluster.down(spec, quiet=True)
    _write(args, spec, results, len(fixed))
    return 0


def _measure(name: str, addrs: list[tuple[str, int]], key: str, budget: int,
             args: argparse.Namespace, tok: Any, prompt: list[int], fixed: list[int],
             ref_logits: torch.Tensor) -> dict[str, Any]:
    strict = name == "strict-equal"
    placement = "equal" if strict else name
    opts = ClusterOptions.build(mode="strict" if strict else "relaxed", placement=placement,
                          memory_budget=budget,
                          predictor=None if args.predictor == "none" else args.predictor)
    coord = Coordinator(args.model, None, addrs, cluster_key(key), opts, log=lambda m: None)
    try:
        if args.warmup:
            generate(coord, tok, prompt, max_tokens=args.warmup, sampling=SamplingParams(),
                     ignore_eos=True)
        res = generate(coord, tok, prompt, max_tokens=args.tokens, sampling=SamplingParams(),
                       ignore_eos=True)
        steps = [1e3 * s for s in res.step_s]
        sync = coord.sync_json()
        out: dict[str, Any] = {
            "mode": opts.sync.mode, "placement": placement,
            "decode_ms_per_token": round(statistics.median(steps), 2),
            "decode_ms_p95": round(sorted(steps)[int(0.95 * (len(steps) - 1))], 2),
            "groups_per_device": sync["placement"]["groups_per_device"],
            "replans": sync["placement"].get("replans", []),
            "coordinator": sync["placement"].get("coordinator"),
            "lost": sync["lost"], "expected": sync["expected"], "fallbacks": sync["fallbacks"],
            "deadline_ms": sync["deadline_ms"],
            "predictor": sync["predictor"]["path"] if sync["predictor"] else None,
            "profiles": {w["address"]: w["profile"] for w in sync["workers"]}}
        if strict:
            out.update(agreement=1.0, kl=0.0)
        else:
            forced: list[float] = []
            agree, kl = accuracy(teacher_forced(coord, fixed, forced), ref_logits)
            out.update(agreement=round(agree, 4), kl=round(kl, 5),
                       forced_ms_per_token=round(1e3 * statistics.median(forced[1:]), 2))
        return out
    finally:
        coord.close()


def _write(args: argparse.Namespace, spec: Any, results: dict[str, dict[str, Any]],
           n_forced: int) -> None:
    eq = results.get("equal")
    lines = ["# Placement on a heterogeneous testbed", "", "{header}",
             f"Spec: `{args.spec}` ({len(spec.devices)} devices: "
             + ", ".join(f"{d.name} (loss {d.loss_in:.0%}, cpu "
                         f"{'full' if d.cpu is None else f'{d.cpu:.0%}'}, memory "
                         f"{(d.memory_bytes or 0) / 2**20:.0f} MiB)" for d in spec.devices)
             + f"); model `{args.model or 'default (SmolLM2-135M-Instruct)'}`; coordinator "
             f"memory budget {args.memory_budget}. {args.warmup} warm-up "
             f"tokens, then {args.tokens} measured (median per-token decode time). Agreement: "
             f"teacher-forced over {n_forced} tokens of a fixed text against "
             "the lossless single-device model.", "",
             "| configuration | sync | ms/token | p95 | vs equal (relaxed) | agreement | KL | "
             "groups per device (coordinator first) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in results.items():
        ratio = (f"{eq['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x faster"
                 if eq else "")
        lines.append(f"| {name} | {r['mode']} | {r['decode_ms_per_token']} | "
                     f"{r['decode_ms_p95']} | {ratio} | {r['agreement']:.1%} | {r['kl']:.4f} | "
                     f"{r['groups_per_device']} |")
    lines.append("")
    data = {"spec": str(args.spec), "model": args.model or "default",
            "forced_tokens": n_forced, "results": results}
    publish(args.out, "placement", data, lines, args.json)
