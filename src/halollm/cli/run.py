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
from halollm.runtime.options import ClusterOptions, add_flags
from halollm.runtime.transport import parse_address


def add_cluster_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    where = p.add_mutually_exclusive_group(required=required)
    where.add_argument("--workers", metavar="H:P,H:P,…",
                       help="comma-separated addresses of running `halo worker`s")
    where.add_argument("--local", type=int, metavar="N",
                       help="start N worker processes on this machine (stopped on exit)")
    where.add_argument("--testbed", metavar="SPEC",
                       help="use the workers of a running `halo testbed up SPEC`")
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


def cluster_options(args: argparse.Namespace) -> ClusterOptions:
    return ClusterOptions.from_args(args)


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
        out.update(model=str(coord.source.path), dtype=dtype_name(coord.dtype), mode=args.mode,
                   sync=sync)
        print(json.dumps(out))
    else:
        print()
        print(f"[{len(result.token_ids)} tokens, {result.decode_ms_per_token:.1f} ms/token, "
              f"{args.mode}: {sync['received']}/{sync['expected']} contributions received, "
              f"{sync['lost']} lost, {sync['late']} late, waited {sync['waited_ms_per_token']:.2f}"
              f" ms/token]", file=sys.stderr)
    return 0
