"""The coordinator's messaging cost per synchronisation round, alone (a developer's probe).

N echo workers (separate processes, real UdpEndpoints and link keys on loopback) answer
each activation with a partial of the same size; the coordinator sends an activation (`--wire`, default bf16) of
`--dim` values to all of them and gathers the N partials, as a relaxed round does, with no
model compute. Prints the coordinator's CPU time (user + system) and wall time per round,
medians over `--rounds` after a warm-up. Run it at two commits, interleaved, to compare
(docs/results/hotpath.md):

    .venv/bin/python scripts/bench_messaging.py --workers 7 --mtu 1500
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import select
import time

import torch

from halollm.runtime.channel import COORDINATOR, WORKER, Channel
from halollm.runtime.protocol import ACTIVATION, PARTIAL, RoundTag
from halollm.runtime.tensor_codec import WIRE_NAMES, decode_body, encode_body
from halollm.runtime.transport import UdpEndpoint


def _key(i: int) -> bytes:
    return bytes([i + 1]) * 32


def _echo(i: int, dim: int, mtu: int | None, ports: mp.Queue, coordinator: mp.Queue) -> None:
    channel = Channel(_key(i), WORKER)
    ep = UdpEndpoint("127.0.0.1", 0, lambda s, _n: channel if s == 0 else None, mtu=mtu)
    ports.put((i, ep.port))
    addr = ("127.0.0.1", coordinator.get())
    while select.select([ep.sock], [], [], 5)[0]:
        for m in ep.receive():
            _, x = decode_body(m.body, m.wire, m.tag.ntok, dim)
            ep.send(PARTIAL, i + 1, m.wire, m.tag, encode_body(x, m.wire, (i,)),
                    [(addr, channel)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=7)
    ap.add_argument("--mtu", type=int, default=None, help="default: the path MTU")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3000)
    ap.add_argument("--wire", choices=list(WIRE_NAMES), default="bf16")
    args = ap.parse_args()
    wire = WIRE_NAMES[args.wire]
    torch.set_num_threads(1)
    n = args.workers
    ports, coordinator = mp.Queue(), mp.Queue()
    procs = [mp.Process(target=_echo, args=(i, args.dim, args.mtu, ports, coordinator),
                        daemon=True) for i in range(n)]
    for p in procs:
        p.start()
    port_of = dict(ports.get() for _ in range(n))
    channels = [Channel(_key(i), COORDINATOR) for i in range(n)]
    ep = UdpEndpoint("127.0.0.1", 0, lambda s, _n: channels[s - 1] if 1 <= s <= n else None,
                     mtu=args.mtu)
    for _ in range(n):
        coordinator.put(ep.port)
    targets = [(("127.0.0.1", port_of[i]), channels[i]) for i in range(n)]
    x = torch.randn(1, args.dim)
    cpu, wall = [], []
    for r in range(args.rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        tag = RoundTag(1, 0, 0, r, 1, r % 16, r % 2)
        ep.send(ACTIVATION, 0, wire, tag, encode_body(x, wire), targets)
        pending, got = set(range(1, n + 1)), []
        while pending:
            if not select.select([ep.sock], [], [], 1.0)[0]:
                raise SystemExit("an echo worker stopped answering")
            for m in ep.receive():
                if m.tag == tag and m.sender in pending:
                    pending.discard(m.sender)
                    got.append(decode_body(m.body, m.wire, 1, args.dim)[1])
        torch.stack(got).float().sum(0)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    skip = min(500, args.rounds // 5)
    cpu, wall = sorted(cpu[skip:]), sorted(wall[skip:])
    print(f"workers={n} mtu={args.mtu or 'path'} wire={args.wire} pid={os.getpid()}: coordinator CPU per round "
          f"{1e6 * cpu[len(cpu) // 2]:.0f} us (median), wall {1e6 * wall[len(wall) // 2]:.0f} "
          f"us (median), {ep.counters['datagrams_sent'] / args.rounds:.1f} datagrams sent "
          "per round")


if __name__ == "__main__":
    main()
