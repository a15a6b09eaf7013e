"""`halo bench runtime`: decode ms/token on one device vs strict vs relaxed with 1-4 local
workers on loopback, and the cost of one synchronisation round."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from halollm.bench.report import publish
from halollm.generate import LocalDecoder, generate
from halollm.groups import GroupId, Partition
from halollm.model.loader import load_model
from halollm.runtime.coordinator import Coordinator
from halollm.runtime.keys import cluster_key
from halollm.runtime.local import LocalWorkers
from halollm.runtime.options import ClusterOptions
from halollm.sampling import SamplingParams
from halollm.scheduler.placement import Placement

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
KEY = "bench-runtime"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runtime", help="single device vs strict vs relaxed on loopback",
                       description=__doc__)
    p.add_argument("--workers", default="1,2,3,4", help="worker counts (default 1,2,3,4)")
    p.add_argument("--tokens", type=int, default=48, help="tokens per run (default 48)")
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration (default 2)")
    p.add_argument("--dtype", default="fp16", help="compute dtype (default fp16)")
    p.add_argument("--out", type=Path, default=Path("docs/results"),
                   help="output folder (default docs/results)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def _decode_ms(decoder: Any, tok: Any, ids: list[int], tokens: int, repeats: int) -> float:
    greedy = SamplingParams()
    generate(decoder, tok, ids, max_tokens=4, sampling=greedy)  # warm-up
    runs = [generate(decoder, tok, ids, max_tokens=tokens, sampling=greedy,
                     ignore_eos=True).decode_ms_per_token for _ in range(repeats)]
    return statistics.median(runs)


def echo_plan(partition: Partition, _ranking: dict) -> Placement:
    """Everything on the coordinator except one single-neuron MLP group per layer on worker 1:
    each token then costs the single-device compute plus one round trip per layer."""
    owner = {gid: 0 for gid in partition.groups()}
    for layer in range(len(partition.layers)):
        owner[GroupId(layer, "mlp", 0)] = 1
    return Placement(partition, owner, frozenset(), 2)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # the coordinator shares 2 cores with its local workers
    counts = [int(c) for c in args.workers.split(",") if c.strip()]
    model = load_model(None, args.dtype)
    tok = model.tokenizer
    ids = tok.encode(tok.render_chat([{"role": "user", "content": PROMPT}]))
    rows: list[dict[str, Any]] = []
    single = _decode_ms(LocalDecoder(model.transformer), tok, ids, args.tokens, args.repeats)
    rows.append({"config": "single device (1 thread)", "workers": 0, "mode": "-",
                 "decode_ms_per_token": round(single, 2)})
    print(f"single device: {single:.2f} ms/token", file=sys.stderr, flush=True)
    del model
    rows += _round_costs(args, tok, ids)
    for n in counts:
        with LocalWorkers(n, KEY, threads=1) as lw:
            for mode in ("strict", "relaxed"):
                coord = Coordinator(None, args.dtype, lw.addresses, cluster_key(KEY),
                                    ClusterOptions.build(mode=mode, predictor=None))
                try:
                    ms = _decode_ms(coord, tok, ids, args.tokens, args.repeats)
                    sync = coord.sync_json()
                finally:
                    coord.close()
                rows.append({"config": f"{n} local workers", "workers": n, "mode": mode,
                             "decode_ms_per_token": round(ms, 2),
                             "waited_ms_per_token": sync["waited_ms_per_token"],
                             "lost": sync["lost"], "expected": sync["expected"],
                             "groups_per_device": sync["placement"]["groups_per_device"]})
                print(f"{n} workers {mode}: {ms:.2f} ms/token", file=sys.stderr, flush=True)
    data = {"results": rows, "tokens": args.tokens, "repeats": args.repeats,
            "dtype": args.dtype}
    publish(args.out, "runtime", data, _lines(args, rows), args.json)
    return 0


def _round_costs(args: argparse.Namespace, tok: Any, ids: list[int]) -> list[dict[str, Any]]:
    """The cost of a synchronisation round, per mode: 30 rounds/token, each with a 1-neuron
    group on one worker."""
    rows = []
    with LocalWorkers(1, KEY, threads=1) as lw:
        for mode in ("relaxed", "strict"):
            opts = ClusterOptions.build(mode=mode, mlp_groups=1536, custom_plan=echo_plan,
                                        predictor=None,
                                        deadline_ms=50.0 if mode == "relaxed" else None)
            coord = Coordinator(None, args.dtype, lw.addresses, cluster_key(KEY), opts)
            try:
                ms = _decode_ms(coord, tok, ids, args.tokens, args.repeats)
                local = _decode_ms(LocalDecoder(coord.model), tok, ids, args.tokens, 1)
            finally:
                coord.close()
            per_round = (ms - local) / 30
            rows.append({"config": f"round cost ({mode})", "workers": 1, "mode": mode,
                         "decode_ms_per_token": round(ms, 2),
                         "same_compute_local_ms_per_token": round(local, 2),
                         "sync_round_ms": round(per_round, 3)})
            print(f"{mode} round cost: {per_round:.3f} ms/round", file=sys.stderr, flush=True)
    return rows


def _lines(args: argparse.Namespace, rows: list[dict[str, Any]]) -> list[str]:
    lines = ["# Distributed runtime on loopback", "", "{header}",
             "All processes share this machine's 2 cores (coordinator and workers 1 torch "
             "thread each), so more workers means more contention, not more compute: these "
             "numbers measure overhead, not the speedup of real devices. Decode: median over "
             f"runs of {args.tokens} greedy tokens after a chat prompt. Round cost: a plan "
             "that puts one single-neuron MLP group per layer on one worker, so each token is "
             "the single-device compute plus 30 synchronisation rounds; the cost is (decode "
             "time - the same coordinator's compute alone) / 30.", "",
             "| configuration | mode | decode ms/token | notes |", "| --- | --- | ---: | --- |"]
    for r in rows:
        note = ""
        if "sync_round_ms" in r:
            note = (f"**{r['sync_round_ms']:.3f} ms per round** (compute alone "
                    f"{r['same_compute_local_ms_per_token']} ms/token)")
        elif "waited_ms_per_token" in r:
            note = (f"waited {r['waited_ms_per_token']} ms/token; lost {r['lost']}/"
                    f"{r['expected']}; groups per device {r['groups_per_device']}")
        lines.append(f"| {r['config']} | {r['mode']} | {r['decode_ms_per_token']} | {note} |")
    lines.append("")
    return lines
