"""`halo demo`: strict vs relaxed synchronisation side by side on a lossy network."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from halollm.errors import HaloError

PROMPT = "Explain in a few sentences why the sky is blue."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="strict vs relaxed on an emulated lossy network (the README's first command)",
        description="Start four local workers (two behind reliable links, two behind links "
                    "losing --loss of their packets), generate with strict synchronisation "
                    "(TCP, wait for everything: the distributed-llama baseline) and with HALO's "
                    "relaxed synchronisation, and compare speed and agreement with the lossless "
                    "single-device model. As root it uses the kernel testbed (network "
                    "namespaces, nftables loss); otherwise it drops datagrams in user space. "
                    "If no predictor is saved for the model yet, it first calibrates one on "
                    "the book shipped with HALO (once; `halo calibrate` does the same). It also "
                    "times the same generation on this machine alone, in one process.")
    p.add_argument("prompt", nargs="?", default=PROMPT, help=f"prompt (default: {PROMPT!r})")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per mode (default 24)")
    p.add_argument("--loss", type=float, default=0.05,
                   help="packet loss on the two lossy links, each direction (default 0.05)")
    p.add_argument("--network", choices=["auto", "testbed", "userspace"], default="auto",
                   help="auto (default): the kernel testbed when root, else user space")
    p.add_argument("--calibrate-tokens", type=int, default=16384, metavar="N",
                   help="when no predictor is saved for the model: calibrate one on N tokens "
                        "of the shipped book first (default 16384, as `halo calibrate`)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def demo_spec(loss: float):  # type: ignore[no-untyped-def]
    from halollm.testbed.spec import parse_spec

    return parse_spec({"name": "demo", "subnet": "10.79", "port": 7000, "device": [
        {"name": "pi1"}, {"name": "pi2"}, {"name": "pi3", "loss": loss},
        {"name": "pi4", "loss": loss}]})


def agreement(model: Any, prompt: list[int], tokens: list[int]) -> float:
    """Share of generated tokens that the lossless model, given the same prefix, also picks
    (teacher-forced top-1 agreement)."""
    if not tokens:
        return 1.0
    logits = model.transformer.forward(prompt + tokens[:-1], 0)[len(prompt) - 1:]
    return float((logits.argmax(-1) == torch.tensor(tokens)).float().mean())


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from halollm.model.loader import load_model

    if not 0 <= args.loss < 1:
        raise HaloError(f"--loss must be in [0, 1) (got {args.loss})")
    if args.max_tokens < 1:
        raise HaloError(f"--max-tokens must be at least 1 (got {args.max_tokens})")
    if args.calibrate_tokens < 64:
        raise HaloError(f"--calibrate-tokens must be at least 64 (got {args.calibrate_tokens})")
    network = _network(args.network)
    _ensure_predictor(args.calibrate_tokens)  # all cores: nothing else runs yet
    torch.set_num_threads(1)
    results = _generate_both(args, network)
    _say("checking agreement with the lossless single-device model…")
    model = load_model(None, None)
    prompt = results["strict"]["_prompt"]
    for mode in results:
        r = results[mode]
        r["agreement"] = round(agreement(model, r.pop("_prompt"), r["token_ids"]), 4)
    single = _single_device(model, prompt, args.max_tokens)
    strict, relaxed = results["strict"], results["relaxed"]
    speedup = strict["decode_ms_per_token"] / max(relaxed["decode_ms_per_token"], 1e-9)
    out = {"network": network, "loss": args.loss, "workers": 4, "lossy_workers": 2,
           "strict": strict, "relaxed": relaxed, "single_device": single,
           "speedup": round(speedup, 2), "agreement": relaxed["agreement"]}
    if args.json:
        print(json.dumps(out))
        return 0
    _print_summary(results, network, args.loss, speedup)
    _print_single(single, strict, relaxed)
    return 0


def _ensure_predictor(tokens: int) -> None:
    """Calibrate the predictor `--predictor auto` finds, once, if the model has none."""
    from halollm.cli.progress import Bars
    from halollm.predictor.calibrate import CalibrationOptions, ensure_predictor

    bars = Bars()
    try:
        # no held-out quality report here: `halo calibrate` and `halo eval predictor` give it
        ensure_predictor(None, bars, _say, CalibrationOptions(
            max_tokens=tokens, context=min(256, max(tokens // 2, 8)), holdout_tokens=0))
    finally:
        bars.close()


def _single_device(model: Any, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """The same greedy generation on this machine alone: one process, one thread, the
    whole model (what `halo generate --ignore-eos` measures)."""
    from halollm.generate import LocalDecoder, generate
    from halollm.model.loader import dtype_name
    from halollm.sampling import SamplingParams

    _say(f"single device: generating {max_tokens} tokens in this process…")
    res = generate(LocalDecoder(model.transformer), model.tokenizer, prompt,
                   max_tokens=max_tokens, sampling=SamplingParams(), ignore_eos=True)
    return {"decode_ms_per_token": round(res.decode_ms_per_token, 3),
            "decode_tokens_per_s": res.to_json()["decode_tokens_per_s"],
            "completion_tokens": len(res.token_ids), "dtype": dtype_name(model.dtype),
            "threads": torch.get_num_threads()}


def _network(choice: str) -> str:
    """The network the demo runs on: the kernel testbed when it can, else user space."""
    from halollm.testbed.system import unavailable

    why = unavailable()
    if choice == "auto":
        if why:
            _say(f"kernel testbed unavailable ({why}): dropping datagrams in user space instead")
        return "userspace" if why else "testbed"
    if choice == "testbed" and why:
        raise HaloError(f"--network testbed: {why}")
    return choice


def _generate_both(args: argparse.Namespace, network: str) -> dict[str, dict[str, Any]]:
    """Per mode (strict, relaxed): the generation's result, timing and sync counters, on
    four workers of which links 3 and 4 lose packets."""
    from halollm.generate import generate
    from halollm.runtime.coordinator import Coordinator
    from halollm.runtime.keys import cluster_key, key_text
    from halollm.runtime.local import LocalWorkers
    from halollm.runtime.options import ClusterOptions
    from halollm.sampling import SamplingParams
    from halollm.testbed import cluster

    rates = [0.0, 0.0, args.loss, args.loss]
    key, _ = key_text(None)
    spec = demo_spec(args.loss)
    local = None
    _say(f"network: {network}; 4 workers, links 3 and 4 lose {args.loss:.0%} of packets "
        "each way")
    try:
        if network == "testbed":
            state = cluster.up(spec, key=key, log=_say)
            addresses = [(w["address"], int(w["port"])) for w in state["workers"]]
            drop: list[float] = []
        else:
            local = LocalWorkers(4, key, threads=1, drop_rates=rates)
            addresses, drop = local.addresses, rates
        results: dict[str, Any] = {}
        for mode in ("strict", "relaxed"):
            _say(f"{mode}: generating {args.max_tokens} tokens…")
            coord = Coordinator(None, None, addresses, cluster_key(key),
                                ClusterOptions.build(mode=mode, drop_rates=drop))
            try:
                tok = coord.tokenizer
                prompt = tok.encode(tok.render_chat([{"role": "user", "content": args.prompt}]))
                t0 = time.perf_counter()
                # the same number of tokens in both modes: speeds compare like with like
                res = generate(coord, tok, prompt, max_tokens=args.max_tokens,
                               sampling=SamplingParams(), ignore_eos=True)
                wall = time.perf_counter() - t0
                results[mode] = {**res.to_json(), "wall_s": round(wall, 2),
                                 "sync": coord.sync_json(), "_prompt": prompt}
            finally:
                coord.close()
            _say(f"{mode}: {results[mode]['decode_ms_per_token']:.1f} ms/token")
    finally:
        if local is not None:
            local.stop()
        if network == "testbed":
            cluster.down(spec, quiet=True)
    return results


def _print_summary(results: dict[str, dict[str, Any]], network: str, loss: float,
                   speedup: float) -> None:
    for mode in ("strict", "relaxed"):
        r = results[mode]
        s = r["sync"]
        title = {"strict": "STRICT (TCP, wait for every contribution)",
                 "relaxed": "RELAXED (HALO: UDP, critical contributions + deadline)"}[mode]
        print(f"\n== {title} ==")
        print(r["text"].strip())
        print(f"-- {r['decode_ms_per_token']:.1f} ms/token ({r['decode_tokens_per_s']:.1f} "
              f"tokens/s); contributions lost {s['lost']}/{s['expected']}; computed by the "
              f"coordinator when missing {s['fallbacks']}; agreement with the lossless model "
              f"{r['agreement']:.1%}")
    relaxed = results["relaxed"]
    pred = relaxed["sync"].get("predictor")
    print("\npredictor: " + (f"{pred['path']} (critical share {pred['critical_share']})" if pred
                             else "none (not found or not usable: see the log above)"))
    print(f"network: {network} ({loss:.0%} loss on 2 of 4 links). Relaxed is "
          f"{speedup:.1f}x faster than strict, agreeing with the lossless model on "
          f"{relaxed['agreement']:.1%} of tokens.")


def _print_single(single: dict[str, Any], strict: dict[str, Any],
                  relaxed: dict[str, Any]) -> None:
    ms = single["decode_ms_per_token"]
    print(f"single device (this machine, one process, {single['threads']} thread, the whole "
          f"model): {ms:.1f} ms/token. The 4-worker cluster costs "
          f"{strict['decode_ms_per_token'] / max(ms, 1e-9):.1f}x that strict, "
          f"{relaxed['decode_ms_per_token'] / max(ms, 1e-9):.1f}x relaxed: on one machine the "
          "cluster only adds network rounds; it pays where the model does not fit one "
          "device (see `halo generate --memory-budget`, docs/runtime.md).")
