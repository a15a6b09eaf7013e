"""The coordinator's messaging cost per synchronisation round, alone (a developer's probe).

N echo workers (separate processes, real UdpEndpoints and link keys on loopback) answer
each activation with a partial of the same size; the coordinator sends an activation of
`--dim` values (`--wire`, default bf16) to all of them and gathers the N partials, as a
relaxed round does, with no model compute: in a bare loop, or with `--rounds-code` through
the runtime's own `Rounds.run`. Prints the coordinator's CPU time (user + system) and wall
time per round, medians over `--rounds` after a warm-up. Run it at two commits,
interleaved, to compare (docs/results/hotpath.md):

    .venv/bin/python scripts/bench_messaging.py --workers 7 --mtu 1500 [--rounds-code]
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
    ap.add_argument("--rounds-code", action="store_true",
                    help="run each round through the runtime's Rounds.run (deciding, "
                         "stats, control-plane drains) instead of a bare send/receive loop")
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
    if args.rounds_code:
        cpu, wall = _through_rounds(ep, targets, wire, x, args.rounds)
    else:
        cpu, wall = _bare(ep, targets, wire, x, args.rounds, n)
    skip = min(500, args.rounds // 5)
    cpu, wall = sorted(cpu[skip:]), sorted(wall[skip:])
    print(f"workers={n} mtu={args.mtu or 'path'} wire={args.wire} rounds_code="
          f"{args.rounds_code} pid={os.getpid()}: coordinator CPU per round "
          f"{1e6 * cpu[len(cpu) // 2]:.0f} us (median), wall {1e6 * wall[len(wall) // 2]:.0f} "
          f"us (median), {ep.counters['datagrams_sent'] / args.rounds:.1f} datagrams sent "
          "per round")


def _through_rounds(ep: UdpEndpoint, targets: list, wire: int, x: torch.Tensor,
                    rounds: int) -> tuple[list[float], list[float]]:
    """Rounds.run with no own share, over links that need no join (a Links with no
    addresses, given WorkerLinks holding this bench's channels)."""
    from halollm.runtime.deadline import DeadlineEstimator
    from halollm.runtime.handshake import LinkChannels
    from halollm.runtime.keys import cluster_key
    from halollm.runtime.links import Links, WorkerLink
    from halollm.runtime.options import LinkOptions
    from halollm.runtime.rounds import Rounds, UdpTransport
    from halollm.runtime.stats import SyncStats

    stats = SyncStats(mode="relaxed")
    links = Links([], cluster_key("bench"), 1, "", ep.port, LinkOptions(), stats, print)
    workers = []
    for i, (addr, channel) in enumerate(targets, start=1):
        link = WorkerLink(i, *addr, alive=True, last_seen=time.monotonic())
        link.channels = LinkChannels(channel, channel)
        workers.append(link)
    ep.channel_for = lambda s, _n: workers[s - 1].data if 1 <= s <= len(workers) else None
    run = Rounds(UdpTransport(ep, links), links, 1, wire, x.shape[1], DeadlineEstimator(),
                 stats, lambda *a: {t.index for t in a[3]},
                 lambda *a: torch.zeros_like(x))  # a late partial: counted, not computed
    cpu, wall = [], []
    for r in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        run.run(r % 16, "mlp" if r % 2 else "attn", x, r, (), workers)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if stats.lost or stats.retries:
        print(f"late or lost partials: {stats.lost}, retries: {stats.retries}")
    return cpu, wall


def _bare(ep: UdpEndpoint, targets: list, wire: int, x: torch.Tensor, rounds: int, n: int
          ) -> tuple[list[float], list[float]]:
    cpu, wall = [], []
    for r in range(rounds):
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
                    got.append(decode_body(m.body, m.wire, 1, x.shape[1])[1])
        torch.stack(got).float().sum(0)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return cpu, wall

if __name__ == "__main__":
    main()
