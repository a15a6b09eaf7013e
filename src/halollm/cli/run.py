"""`halo run`: the coordinator, over remote workers or local worker processes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from halollm.cli.options import add_generation_options, checked_request, prompt_ids, set_threads
from halollm.errors import HaloError
from halollm.generate import generate
from halollm.loader.streamed import peak_rss_bytes
from halollm.model.loader import dtype_name
from halollm.runtime.discovery import DEFAULT_WAIT_S
from halollm.runtime.discovery_records import merge
from halollm.runtime.keys import ENV, cluster_key, key_text
from halollm.runtime.options import ClusterOptions, add_flags
from halollm.runtime.transport import Address, parse_address


def add_cluster_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The cluster's flags; `required`: one of --workers/--local/--testbed/--discover must
    be given (checked by check_cluster_options)."""
    p.set_defaults(cluster_required=required)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", metavar="H:P,H:P,…",
                       help="comma-separated addresses of running `halo worker`s")
    where.add_argument("--local", type=int, metavar="N",
                       help="start N worker processes on this machine (stopped on exit)")
    where.add_argument("--testbed", metavar="SPEC",
                       help="use the workers of a running `halo testbed up SPEC`")
    p.add_argument("--discover", action="store_true",
                   help="also use the workers that announce themselves on the local network "
                        "(mDNS) and accept this cluster's --key; alone or with --workers")
    p.add_argument("--discover-wait", type=float, default=DEFAULT_WAIT_S, metavar="S",
                   help=f"with --discover: listen this many seconds (default {DEFAULT_WAIT_S:g})")
    p.add_argument("--discover-on", metavar="ADDR,…",
                   help="with --discover: only on the network interfaces with these local "
                        "IPv4 addresses (default: every interface)")
    add_flags(p)
    p.add_argument("--key", metavar="TEXT",
                   help=f"cluster key (default: ${ENV}; with --local a fresh one)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate with a cluster of workers",
                       description="Run the coordinator (device 0) over workers and generate "
                                   "from PROMPT. --json adds a `sync` object with per-token "
                                   "synchronisation statistics.")
    add_generation_options(p)
    add_cluster_options(p)
    p.set_defaults(func=run)


def set_coordinator_threads(args: argparse.Namespace, cpu: float | None = None) -> None:
    """--threads, or (unless OMP_NUM_THREADS says) with --local N the cores the workers leave,
    and for a coordinator held to `cpu` of a core (a testbed's) that share's whole cores.
    Oversubscribed cores cost every round: a send on loopback then wakes the worker on the
    sender's core (docs/results/hotpath.md); two threads on a quarter-core quota took m1024
    from 135 to 192 ms per token (docs/results/hub-only.md)."""
    threads = getattr(args, "threads", None)
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        if args.local is not None:
            threads = max(1, (os.cpu_count() or 1) - args.local)
        elif cpu is not None:
            threads = max(1, int(cpu))
    set_threads(threads)


def cluster_options(args: argparse.Namespace) -> ClusterOptions:
    return ClusterOptions.from_args(args)


def wants_cluster(args: argparse.Namespace) -> bool:
    return args.discover or any(v is not None for v in (args.workers, args.local,
                                                        args.testbed))


def check_cluster_options(args: argparse.Namespace) -> None:
    """The cluster options' own checks, before any worker starts."""
    if args.cluster_required and not wants_cluster(args):
        raise HaloError("say where the workers are: --workers, --local, --testbed or "
                        "--discover")
    if args.discover and (args.local is not None or args.testbed is not None):
        raise HaloError("--discover goes with --workers or alone, not with --local or "
                        "--testbed")
    if not 0 < args.discover_wait <= 60:
        raise HaloError(f"--discover-wait must be in (0, 60] seconds (got {args.discover_wait})")
    cluster_options(args).validate()


def discovered(args: argparse.Namespace, given: list[Address], key: Any,
               quiet: bool) -> list[Address]:
    """--discover: the given addresses plus the workers of this cluster that answer on the
    network (printed with those skipped, and why)."""
    from halollm.model.loader import content_hash, open_source
    from halollm.runtime.discovery import discover

    source = open_source(args.model)
    try:
        model_hash = content_hash(Path(source.path))
    finally:
        source.close()
    if not quiet:
        print(f"discovery: listening {args.discover_wait:g}s for workers on the local "
              "network…", file=sys.stderr, flush=True)
    on = [a.strip() for a in (args.discover_on or "").split(",") if a.strip()] or None
    try:
        found = discover(key, model_hash, args.discover_wait, on)
    except OSError as exc:  # no multicast-capable interface, an address not of this machine
        raise HaloError(f"discovery could not listen on the network: {exc}") from exc
    for line in found.report():
        print(line, file=sys.stderr, flush=True)
    addresses = merge(given, found.used)
    if not addresses:
        raise HaloError("discovery found no worker of this cluster (is `halo worker` running "
                        "with the same --key and model on this network?)")
    return addresses


def open_cluster(args: argparse.Namespace, quiet: bool):  # type: ignore[no-untyped-def]
    """(coordinator, local workers or None) from --workers / --local / --testbed; the caller
    closes both."""
    from halollm.runtime.coordinator import Coordinator
    from halollm.runtime.local import LocalWorkers
    from halollm.testbed.spec import load_spec

    local = None
    spec = load_spec(args.testbed) if args.testbed is not None else None
    set_coordinator_threads(args, None if spec is None else spec.coordinator_cpu)
    if args.local is not None:
        key, _ = key_text(args.key)
        if not quiet:
            print(f"starting {args.local} local workers…", file=sys.stderr, flush=True)
        spin = ["--spin-us", str(args.spin_us)] if args.spin_us else []  # theirs as ours
        local = LocalWorkers(args.local, key, args.model, extra_args=spin)
        addresses = local.addresses
    elif spec is not None:
        from halollm.testbed.cluster import hold_coordinator, load_state

        state = load_state(spec)
        if spec.coordinator_cpu is not None:  # the coordinator is a device of the spec too
            hold_coordinator(spec)
        key = state["key"]
        addresses = [(w["address"], int(w["port"])) for w in state["workers"]]
    else:
        key, generated = key_text(args.key)
        if generated:
            raise HaloError(f"no cluster key: pass --key (the one each worker printed) or set "
                            f"{ENV}")
        addresses = [parse_address(a.strip()) for a in (args.workers or "").split(",")
                     if a.strip()]
        if not addresses and not args.discover:
            raise HaloError("--workers lists no address")
        if args.discover:
            addresses = discovered(args, addresses, cluster_key(key), quiet)
    try:
        t0 = time.perf_counter()
        coord = Coordinator(args.model, args.dtype, addresses, cluster_key(key),
                            cluster_options(args), quant=getattr(args, "quant", None))
    except BaseException:
        if local is not None:
            local.stop()
        raise
    if not quiet:
        print(f"cluster ready in {time.perf_counter() - t0:.1f}s: {len(addresses)} workers, "
              f"{args.mode} sync, placement {coord.placement.summary()['groups_per_device']}"
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
        out.update(model=str(coord.source.path), dtype=dtype_name(coord.dtype),
                   weights=coord.format.name, weight_bytes=coord.model.weight_bytes(),
                   peak_rss_bytes=peak_rss_bytes(), mode=args.mode,
                   threads=torch.get_num_threads(),
                   sync=sync)
        print(json.dumps(out))
    else:
        print()
        print(f"[{len(result.token_ids)} tokens, {result.speed_text()}, "
              f"{args.mode}: {sync['received']}/{sync['expected']} contributions received, "
              f"{sync['lost']} lost, {sync['late']} late, waited {sync['waited_ms_per_token']:.2f}"
              f" ms/token]", file=sys.stderr)
    return 0
