"""Entry point of the `halo` command."""

from __future__ import annotations

import argparse
import sys

from halollm import __version__
from halollm.errors import HaloError


def build_parser() -> argparse.ArgumentParser:
    from halollm.cli import (
        bench,
        calibrate,
        demo,
        evaluate,
        generate,
        make_model,
        run,
        serve,
        testbed,
        worker,
    )

    parser = argparse.ArgumentParser(
        prog="halo",
        description="HALO: run one LLaMA-family model across several small devices joined by "
                    "a lossy network. Every subcommand has --help.")
    parser.add_argument("--version", action="version", version=f"halo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo.register(sub)
    generate.register(sub)
    run.register(sub)
    worker.register(sub)
    testbed.register(sub)
    bench.register(sub)
    serve.register(sub)
    calibrate.register(sub)
    evaluate.register(sub)
    make_model.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HaloError as exc:
        print(f"halo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nhalo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
