"""`halo demo`: strict vs relaxed synchronisation side by side on a lossy network."""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
                    "namespaces, nftables loss); otherwise it drops datagrams in user space.")
    p.add_argument("prompt", nargs="?", default=PROMPT, help=f"prompt (default: {PROMPT!r})")
    p.add_argument("--max-tokens", type=int, default=24, help="tokens per mode (default 24)")
    p.add_argument("--loss", type=float, default=0.05,
                   help="packet loss on the two lossy links, each direction (default 0.05)")
    p.add_argument("--network", choices=["auto", "testbed", "userspace"], default="auto",
                   help="auto (default): the kernel testbed when root, else user space")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _can_use_testbed() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "not root"
    missing = [t for t in ("ip", "nft") if shutil.which(t) is None]
    if missing:
        return False, f"{', '.join(missing)} not installed"
    return True, ""


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


def run(args: argparse.Namespace) -> int:
    from halollm.generate import generate
    from halollm.model.loader import load_model
    from halollm.runtime.coordinator import Coordinator
    from halollm.runtime.keys import key_bytes, key_text
    from halollm.runtime.local import LocalWorkers
    from halollm.runtime.options import ClusterOptions
    from halollm.sampling import SamplingParams
    from halollm.testbed import cluster

    if not 0 <= args.loss < 1:
        raise HaloError(f"--loss must be in [0, 1) (got {args.loss})")
    def say(m: str) -> None:
        print(f"[demo] {m}", file=sys.stderr, flush=True)

    usable, why = _can_use_testbed()
    network = args.network
    if network == "auto":
        network = "testbed" if usable else "userspace"
        if not usable:
            say(f"kernel testbed unavailable ({why}): dropping datagrams in user space instead")
    elif network == "testbed" and not usable:
        raise HaloError(f"the kernel testbed needs root, ip and nft ({why})")
    torch.set_num_threads(1)
    rates = [0.0, 0.0, args.loss, args.loss]
    key, _ = key_text(None)
    spec = demo_spec(args.loss)
    local = None
    say(f"network: {network}; 4 workers, links 3 and 4 lose {args.loss:.0%} of packets "
        "each way")
    try:
        if network == "testbed":
            state = cluster.up(spec, key=key, log=say)
            addresses = [(w["address"], int(w["port"])) for w in state["workers"]]
            drop: list[float] = []
        else:
            local = LocalWorkers(4, key, threads=1, drop_rates=rates)
            addresses, drop = local.addresses, rates
        results: dict[str, Any] = {}
        for mode in ("strict", "relaxed"):
            say(f"{mode}: generating {args.max_tokens} tokens…")
            coord = Coordinator(None, None, addresses, key_bytes(key),
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
            say(f"{mode}: {results[mode]['decode_ms_per_token']:.1f} ms/token")
    finally:
        if local is not None:
            local.stop()
        if network == "testbed":
            cluster.down(spec, quiet=True)
    say("checking agreement with the lossless single-device model…")
    model = load_model(None, None)
    for mode in results:
        r = results[mode]
        r["agreement"] = round(agreement(model, r.pop("_prompt"), r["token_ids"]), 4)
    strict, relaxed = results["strict"], results["relaxed"]
    speedup = strict["decode_ms_per_token"] / max(relaxed["decode_ms_per_token"], 1e-9)
    out = {"network": network, "loss": args.loss, "workers": 4, "lossy_workers": 2,
           "strict": strict, "relaxed": relaxed, "speedup": round(speedup, 2),
           "agreement": relaxed["agreement"]}
    if args.json:
        print(json.dumps(out))
        return 0
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
    pred = relaxed["sync"].get("predictor")
    print("\npredictor: " + (f"{pred['path']} (critical share {pred['critical_share']})" if pred
                             else "none; run `halo calibrate --text FILE` to make one"))
    print(f"network: {network} ({args.loss:.0%} loss on 2 of 4 links). Relaxed is "
          f"{speedup:.1f}x faster than strict, agreeing with the lossless model on "
          f"{relaxed['agreement']:.1%} of tokens.")
    return 0
