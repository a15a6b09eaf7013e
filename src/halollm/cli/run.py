"""`halo run`: the coordinator, over remote workers or local worker processes."""

from __future__ import annotations

import argparse
import json
import sys
import time

from halollm.cli.options import add_generation_options, checked_request, prompt_ids
from halollm.errors import HaloError
from halollm.generate import generate
from halollm.model.loader import dtype_name
from halollm.runtime.keys import ENV, key_bytes, key_text
from halollm.runtime.transport import parse_address


def add_cluster_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    where = p.add_mutually_exclusive_group(required=required)
    where.add_argument("--workers", metavar="H:P,H:P,…",
                       help="comma-separated addresses of running `halo worker`s")
    where.add_argument("--local", type=int, metavar="N",
                       help="start N worker processes on this machine (stopped on exit)")
    where.add_argument("--testbed", metavar="SPEC",
                       help="use the workers of a running `halo testbed up SPEC`")
    p.add_argument("--sync", choices=["relaxed", "strict"], default="relaxed",
                   help="relaxed (default): wait for critical groups, the rest until a "
                        "deadline, over UDP; strict: wait for everything, over TCP (the "
                        "distributed-llama baseline)")
    p.add_argument("--deadline-ms", type=float, default=None, metavar="MS",
                   help="fix the relaxed-mode deadline (default: derived online from measured "
                        "worker latency)")
    p.add_argument("--coordinator-share", type=float, default=0.8, metavar="S",
                   help="static plan: per layer half, the groups carrying this share of the "
                        "calibrated significance stay on the coordinator (default 0.8)")
    p.add_argument("--critical-share", type=float, default=0.98, metavar="S",
                   help="with a predictor, per token and layer half: the groups carrying this "
                        "share of the predicted significance must arrive; a missing one is "
                        "computed by the coordinator (default 0.98; 1 = all, exact under loss; "
                        "0 = none)")
    p.add_argument("--predictor", default="auto", metavar="PATH",
                   help="predictor file; 'auto' (default): the one `halo calibrate` saved for "
                        "the model, if any; 'none': criticality from the static plan only")
    p.add_argument("--placement", choices=["static", "equal", "memory", "halo"],
                   default="static",
                   help="static (default): critical groups on the coordinator, the rest spread "
                        "over the workers; equal: every layer's groups dealt out equally over "
                        "all devices, the coordinator included (distributed-llama's split); "
                        "memory: in proportion to each device's memory budget (exo, "
                        "llama.cpp); halo: the load-balancing scheduler, from measured compute "
                        "speed, memory and link loss/round trip, re-planned as they drift "
                        "(docs/scheduler.md)")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="memory the coordinator offers for weights, e.g. 2G (default: 80%% "
                        "of the available RAM); used by --placement memory|halo")
    p.add_argument("--no-streaming", dest="streaming", action="store_false",
                   help="with --placement halo: treat every worker's memory budget as a hard "
                        "limit (by default the scheduler may give a worker more groups than "
                        "its budget holds when streaming the rest from its model file every "
                        "token, at its measured loading speed, is faster than the alternatives)")
    p.add_argument("--replan-every", type=int, default=8, metavar="N",
                   help="with --placement halo: check every N tokens whether a new plan is "
                        "at least --hysteresis faster (default 8)")
    p.add_argument("--hysteresis", type=float, default=0.15, metavar="H",
                   help="adopt a new plan only if predicted at least this share faster "
                        "(default 0.15)")
    p.add_argument("--attn-groups", type=int, default=1, metavar="N",
                   help="attention groups per layer, at most the KV heads (default 1: all "
                        "attention is one critical group on the coordinator)")
    p.add_argument("--mlp-groups", type=int, default=16, metavar="N",
                   help="MLP groups per layer (default 16)")
    p.add_argument("--wire", choices=["fp32", "fp16", "bf16", "int8"], default=None,
                   help="activation format on the wire (default: the compute dtype)")
    p.add_argument("--key", metavar="TEXT",
                   help=f"cluster key (default: ${ENV}; with --local a fresh one)")
    p.add_argument("--mtu", type=int, default=1500, help="path MTU for datagrams (default 1500)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate with a cluster of workers",
                       description="Run the coordinator (device 0) over workers and generate "
                                   "from PROMPT. --json adds a `sync` object with per-token "
                                   "synchronisation statistics.")
    add_generation_options(p)
    add_cluster_options(p)
    p.set_defaults(func=run)


def cluster_options(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from halollm.runtime.coordinator import ClusterOptions
    from halollm.runtime.profile import parse_bytes

    return ClusterOptions(mode=args.sync, wire=args.wire, deadline_ms=args.deadline_ms,
                          critical_share=args.critical_share, mlp_groups=args.mlp_groups,
                          coordinator_share=args.coordinator_share,
                          placement=args.placement,
                          memory_budget=parse_bytes(args.memory_budget)
                          if args.memory_budget else None,
                          replan_every=args.replan_every, hysteresis=args.hysteresis,
                          streaming=args.streaming,
                          predictor=None if args.predictor == "none" else args.predictor,
                          attn_groups=args.attn_groups,
                          mtu=args.mtu)


def check_cluster_options(args: argparse.Namespace) -> None:
    """The cluster options' own checks, before any worker starts."""
    cluster_options(args).validate()


def open_cluster(args: argparse.Namespace, quiet: bool):  # type: ignore[no-untyped-def]
    """(coordinator, local workers or None) from --workers / --local / --testbed; the caller
    closes both."""
    from halollm.runtime.coordinator import Coordinator
    from halollm.runtime.local import LocalWorkers

    local = None
    if args.local is not None:
        key, _ = key_text(args.key)
        if not quiet:
            print(f"starting {args.local} local workers…", file=sys.stderr, flush=True)
        local = LocalWorkers(args.local, key, args.model)
        addresses = local.addresses
    elif args.testbed is not None:
        from halollm.testbed.cluster import load_state
        from halollm.testbed.spec import load_spec

        state = load_state(load_spec(args.testbed))
        key = state["key"]
        addresses = [(w["address"], int(w["port"])) for w in state["workers"]]
    else:
        key, generated = key_text(args.key)
        if generated:
            raise HaloError(f"no cluster key: pass --key (the one each worker printed) or set "
                            f"{ENV}")
        addresses = [parse_address(a.strip()) for a in args.workers.split(",") if a.strip()]
        if not addresses:
            raise HaloError("--workers lists no address")
    try:
        t0 = time.perf_counter()
        coord = Coordinator(args.model, args.dtype, addresses, key_bytes(key),
                            cluster_options(args))
    except BaseException:
        if local is not None:
            local.stop()
        raise
    if not quiet:
        print(f"cluster ready in {time.perf_counter() - t0:.1f}s: {len(addresses)} workers, "
              f"{args.sync} sync, placement {coord.placement.summary()['groups_per_device']}"
              " groups per device", file=sys.stderr, flush=True)
    return coord, local


def run(args: argparse.Namespace) -> int:
    sampling, text = checked_request(args)  # before the slow model load
    check_cluster_options(args)
    quiet = args.json
    coord = local = None
    try:
        coord, local = open_cluster(args, quiet)
        ids = prompt_ids(coord.tokenizer, args, text)

        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        result = generate(coord, coord.tokenizer, ids, max_tokens=args.max_tokens,
                          sampling=sampling, stop=args.stop,
                          max_position=coord.config.max_position,
                          on_text=None if quiet else show, ignore_eos=args.ignore_eos)
        sync = coord.sync_json()
    finally:
        if coord is not None:
            coord.close()
        if local is not None:
            local.stop()
    if quiet:
        out = result.to_json()
        out.update(model=str(coord.source.path), dtype=dtype_name(coord.dtype), mode=args.sync,
                   sync=sync)
        print(json.dumps(out))
    else:
        print()
        print(f"[{len(result.token_ids)} tokens, {result.decode_ms_per_token:.1f} ms/token, "
              f"{args.sync}: {sync['received']}/{sync['expected']} contributions received, "
              f"{sync['lost']} lost, {sync['late']} late, waited {sync['waited_ms_per_token']:.2f}"
              f" ms/token]", file=sys.stderr)
    return 0
