"""`halo serve`: an OpenAI-compatible HTTP API for one device or a HALO cluster."""

from __future__ import annotations

import argparse
import errno
import socket
import sys
from pathlib import Path

from halollm.cli.options import add_model_options
from halollm.cli.run import (
    add_cluster_options,
    check_cluster_options,
    open_cluster,
    wants_cluster,
)
from halollm.errors import HaloError
from halollm.serve.limits import DEFAULT_MAX_QUEUE
from halollm.units import parse_bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP API (chat, completions, streaming)",
        description="Serve POST /v1/chat/completions and /v1/completions (streaming or not), "
                    "GET /v1/models, /health and /metrics (Prometheus). Without --workers, "
                    "--local or --testbed the model runs on this device. Requests are served "
                    "one at a time in arrival order (the header x-halo-queue-ahead says how "
                    "many were ahead; at most --max-queue wait, more get 429); a client that "
                    "disconnects cancels its generation. Bodies over --max-body get 413.")
    add_model_options(p)
    add_cluster_options(p, required=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/ routes")
    p.add_argument("--model-id", metavar="NAME",
                   help="the id /v1/models lists (default: the model file's name)")
    p.add_argument("--max-body", metavar="SIZE", default="1M",
                   help="largest request body accepted (e.g. 512K, 4M; default 1M); "
                        "larger bodies get 413")
    p.add_argument("--max-queue", metavar="N", type=int, default=DEFAULT_MAX_QUEUE,
                   help="most requests that may wait for the model (default "
                        f"{DEFAULT_MAX_QUEUE}); one more gets 429")
    p.set_defaults(func=run)


def parse_body_size(text: str) -> int:
    """'1M', '512K', '65536' -> bytes (binary multiples), at least 1 KiB."""
    try:
        size = parse_bytes(text)
    except HaloError as exc:
        raise HaloError(f"--max-body: {exc}") from None
    if size < 1024:
        raise HaloError(f"--max-body must be at least 1K (got {text!r})")
    return size


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise HaloError(f"port {port} on {host} is in use; choose another --port"
                                ) from exc
            raise HaloError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from halollm.generate import LocalDecoder
    from halollm.model.loader import load_model
    from halollm.serve.app import create_app
    from halollm.serve.engine import Engine

    check_cluster_options(args)
    max_body = parse_body_size(args.max_body)
    if args.max_queue < 1:
        raise HaloError(f"--max-queue must be at least 1 (got {args.max_queue})")
    _check_port(args.host, args.port)
    coord = local = None
    cluster = wants_cluster(args)
    try:
        if cluster:
            coord, local = open_cluster(args, quiet=False)
            decoder, tokenizer, config = coord, coord.tokenizer, coord.config
            path = Path(coord.source.path)
            stats = coord.sync_json
            device = coord.profile.to_json
        else:
            model = load_model(args.model, args.dtype)
            decoder, tokenizer = LocalDecoder(model.transformer), model.tokenizer
            config, path, stats = model.config, Path(model.path), None
            device = None
        model_id = args.model_id or path.name
        engine = Engine(decoder, tokenizer, config.max_position, max_queue=args.max_queue)
        app = create_app(engine, tokenizer, model_id, config.max_position, args.api_key,
                         stats, max_body=max_body, device=device)
        print(f"halo serve: {model_id} on http://{args.host}:{args.port}/v1 "
              f"({'cluster' if cluster else 'this device'}); web page: "
              f"http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
        # open status streams (the web page) must not hold a shutdown up for ever
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=3)
        engine.close()
    finally:
        if coord is not None:
            coord.close()
        if local is not None:
            local.stop()
    return 0
