"""`halo testbed up|down|status SPEC`: a lossy edge network on this machine (root)."""

from __future__ import annotations

import argparse
import json
import sys

from halollm.errors import HaloError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "testbed", help="emulated lossy network of devices on this machine (root)",
        description="One network namespace per device, veth links to this (the "
                    "coordinator's) namespace, random packet loss by nftables where packets "
                    "arrive, bandwidth by tc tbf, CPU share by cgroup quota, a worker in each "
                    "namespace. The spec file is TOML; see docs/testbed.md and examples/.")
    p.add_argument("action", choices=["up", "down", "status", "loss"],
                   help="up, down, status, or loss: change one device's packet loss while "
                        "the testbed runs (--device, --rate)")
    p.add_argument("spec", metavar="SPEC", help="cluster spec file (TOML)")
    p.add_argument("--device", metavar="NAME", help="with loss: the device")
    p.add_argument("--rate", type=float, metavar="P",
                   help="with loss: the new loss rate, each direction")
    p.add_argument("--model", metavar="PATH", help="model for the workers (default model)")
    p.add_argument("--key", metavar="TEXT", help="cluster key (default: a new random one, "
                                                  "kept in /run/halo/NAME/state.json)")
    p.add_argument("--threads", type=int, default=1, help="compute threads per worker (1)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from halollm.testbed import cluster
    from halollm.testbed.spec import load_spec

    spec = load_spec(args.spec)
    if args.action == "up":
        state = cluster.up(spec, model=args.model, key=args.key, threads=args.threads)
        workers = ",".join(f"{w['address']}:{w['port']}" for w in state["workers"])
        if args.json:
            print(json.dumps({k: v for k, v in state.items() if k != "key"}))
        else:
            print(f"testbed {spec.name} is up. Generate with:\n  halo run \"Hello\" --testbed "
                  f"{args.spec}\nor: HALO_KEY=$(sudo jq -r .key /run/halo/{spec.name}/"
                  f"state.json) halo run \"Hello\" --workers {workers}")
    elif args.action == "loss":
        if args.device is None or args.rate is None:
            raise HaloError("halo testbed loss needs --device NAME and --rate P")
        cluster.set_loss(spec, args.device, args.rate, args.rate)
        if not args.json:
            print(f"{args.device}: loss {args.rate:.1%} each direction")
    elif args.action == "down":
        removed = cluster.down(spec, quiet=args.json)
        if args.json:
            print(json.dumps({"removed": removed}))
    else:
        st = cluster.status(spec)
        if args.json:
            print(json.dumps(st))
        else:
            print(f"testbed {spec.name}: {'up' if st['up'] else 'down'}")
            for d in st["devices"]:
                print(f"  {d['device']:8} {d['address']:18} worker "
                      f"{'alive' if d['worker_alive'] else 'not running'}; loss in/out "
                      f"{d['loss_in']:.1%}/{d['loss_out']:.1%}; dropped packets "
                      f"{d['dropped_arriving_at_device']} in, "
                      f"{d['dropped_arriving_at_coordinator']} out", file=sys.stdout)
                prof = d.get("profile")
                if prof:
                    speed = prof.get("speed_neurons_per_ms")
                    print(f"  {'':8} measured: "
                          f"{'not yet' if speed is None else f'{speed:.0f} neurons/ms'}, "
                          f"memory budget {prof['memory_bytes'] / 2**20:.0f} MiB, "
                          f"{prof['rounds']} rounds computed, session "
                          f"{prof['session'] or 'none'}", file=sys.stdout)
    return 0
