"""`halo worker`: serve neuron groups to a coordinator."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from halollm.errors import HaloError
from halollm.runtime.keys import ENV, cluster_key, key_text
from halollm.runtime.transport import parse_address
from halollm.units import parse_bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker", help="run a worker on this device",
        description="Serve the neuron groups a coordinator assigns to this device. Listens on "
                    "HOST:PORT for both TCP (control plane; strict-mode data) and UDP (relaxed "
                    "data plane). Serves one coordinator at a time; a new one replaces the old.")
    p.add_argument("--listen", default="0.0.0.0:7000", metavar="HOST:PORT",
                   help="address to listen on (default 0.0.0.0:7000; port 0 picks a free one)")
    p.add_argument("--model", metavar="PATH",
                   help="this device's copy of the model (default: the default model); must "
                        "be the same file as the coordinator's")
    p.add_argument("--key", metavar="TEXT",
                   help=f"cluster key shared by all devices (default: ${ENV}, else a new "
                        "random key is generated and printed)")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads (default: PyTorch's choice)")
    p.add_argument("--drop-rate", type=float, default=0.0, metavar="P",
                   help="emulate packet loss in user space: drop this share of arriving "
                        "datagrams (for machines without the kernel testbed; default 0)")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="memory this device offers for model weights, e.g. 512M or 2G "
                        "(default: 80%% of the RAM available at start); the scheduler never "
                        "places more groups here")
    p.add_argument("--no-announce", action="store_true",
                   help="do not announce this worker on the local network (mDNS/DNS-SD, for "
                        "`halo run --discover`); a worker listening on a loopback address "
                        "is never announced. The announcement holds no key material")
    p.add_argument("--spin-us", type=float, default=0.0, metavar="US",
                   help="after each round, poll for the next activation without sleeping for "
                        "up to this many microseconds (saves a wake-up per round on a device "
                        "with a core to itself; on shared cores it takes CPU from the others; "
                        "default 0)")
    p.add_argument("--status-file", metavar="PATH",
                   help="keep this device's profile and counters in PATH as JSON (what "
                        "`halo testbed status` shows)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from halollm.runtime.worker import Worker

    if args.threads:
        torch.set_num_threads(args.threads)
    host, port = parse_address(args.listen, default_host="0.0.0.0")
    text, generated = key_text(args.key)
    if generated:
        print(f"halo worker: no --key given; generated cluster key {text} (start the "
              f"coordinator with --key {text} or {ENV}={text})", file=sys.stderr, flush=True)
    if not 0.0 <= args.drop_rate < 1.0:
        raise HaloError(f"--drop-rate must be in [0, 1) (got {args.drop_rate})")
    if not 0.0 <= args.spin_us <= 1e6:
        raise HaloError(f"--spin-us must be between 0 and 1000000 (got {args.spin_us})")
    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    worker = Worker(host, port, cluster_key(text), args.model, drop_rate=args.drop_rate,
                    memory_budget=budget, spin_s=args.spin_us / 1e6,
                    status_file=Path(args.status_file) if args.status_file else None)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"halo worker listening on {host}:{worker.port} (model {worker.source.path.name}, "
          f"{worker.model_hash[:12]})", flush=True)
    announcer = None
    try:
        if not args.no_announce and not host.startswith("127.") and host != "localhost":
            announcer = _announce(host, worker)
        worker.serve()
    except KeyboardInterrupt:
        pass
    finally:
        if announcer is not None:
            announcer.close()
        worker.close()
    return 0


def _announce(host: str, worker: Any) -> Any:
    """Start announcing the worker on the network (a failure is a warning, not fatal)."""
    from halollm.runtime.discovery import Announcer

    try:
        return Announcer(host, worker.port, worker.source.path.name, worker.model_hash,
                         worker.memory_bytes, worker.log)
    except Exception as exc:  # noqa: BLE001 -- announcing is a convenience, never fatal
        worker.log(f"not announcing this worker on the network: {exc}")
        return None
