"""`halo bench …`: measurements that write result files (never timed assertions in tests)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks that write results under docs/results/",
                       description="Benchmarks. Each writes a JSON and a markdown file with the "
                                   "machine and the command.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    from halollm.bench import (
        crypto,
        engine,
        loader,
        loss,
        paper,
        peer,
        placement,
        predictor,
        runtime,
    )

    engine.register(bsub)
    runtime.register(bsub)
    loss.register(bsub)
    predictor.register(bsub)
    placement.register(bsub)
    loader.register(bsub)
    paper.register(bsub)
    crypto.register(bsub)
    peer.register(bsub)
