"""`halo bench crypto`: what encrypting the links costs, per synchronisation round and per
token, lossless and at 5% loss.

Two measurements, in one run: (1) sealing and opening one round's messages
(ChaCha20-Poly1305 with counters and the replay window, protocol.encode/decode) against the
keyed BLAKE2b MAC of the same datagrams that HALO used before (authenticated, in clear), for
the default model's activation size; (2) a real relaxed-mode cluster of local workers on
loopback, lossless and with 5% of datagrams dropped on arrival, counting the datagrams the
coordinator seals and opens per token: that count times the measured cost per datagram is
the coordinator's crypto time per token, set against its decode time."""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from halollm.bench.report import publish
from halollm.generate import generate
from halollm.model.loader import open_source, open_tokenizer
from halollm.runtime import protocol
from halollm.runtime.channel import channel_pair
from halollm.runtime.coordinator import Coordinator
from halollm.runtime.keys import cluster_key
from halollm.runtime.local import LocalWorkers
from halollm.runtime.options import ClusterOptions
from halollm.runtime.protocol import ACTIVATION, RoundTag
from halollm.runtime.tensor_codec import WIRE_FP16, encode_body
from halollm.sampling import SamplingParams

KEY = "bench-crypto"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crypto", help="the cost of encrypted links per round and per token",
                       description=__doc__)
    p.add_argument("--workers", type=int, default=2, help="local workers (default 2)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per run (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (default 3)")
    p.add_argument("--out", type=Path, default=Path("docs/results"),
                   help="output folder (default docs/results)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def _per_datagram_us(body: bytes, reps: int = 3000) -> dict[str, float]:
    """Microseconds to seal+open one message's datagrams, now and with the old MAC."""
    tag = RoundTag(1, 1, 1, 10, 1, 3, 1)
    send, recv = channel_pair(b"k" * 32)

    def sealed() -> None:
        for g in protocol.encode(ACTIVATION, 0, WIRE_FP16, tag, body, send):
            protocol.decode(g, lambda s, n: recv)

    key = b"k" * 32
    head = b"\0" * protocol.HEADER.size
    size = protocol.max_payload(protocol.DEFAULT_MTU)

    def maced() -> None:  # before: keyed BLAKE2b over header and payload, both ways
        for i in range(0, max(len(body), 1), size):
            data = head + body[i:i + size]
            gram = data + hashlib.blake2b(data, key=key, digest_size=16).digest()
            hashlib.blake2b(gram[:-16], key=key, digest_size=16).digest()

    out = {}
    for name, fn in (("sealed", sealed), ("mac", maced)):
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            runs.append(1e6 * (time.perf_counter() - t0) / reps)
        out[name] = statistics.median(runs)
    return out


def _datagrams(coord: Coordinator, tok: Any, ids: list[int], tokens: int) -> tuple[int, Any]:
    """(datagrams the coordinator sent and received, the result) of one generation."""
    c = coord.udp.counters
    before = c["datagrams_sent"] + c["datagrams_received"]
    r = generate(coord, tok, ids, max_tokens=tokens, sampling=SamplingParams(), ignore_eos=True)
    return c["datagrams_sent"] + c["datagrams_received"] - before, r


def _cluster(args: argparse.Namespace, loss: float, ids: list[int], tok: Any
             ) -> dict[str, Any]:
    with LocalWorkers(args.workers, KEY, threads=1, drop_rates=[loss] * args.workers) as lw:
        coord = Coordinator(None, "fp16", lw.addresses, cluster_key(KEY), ClusterOptions.build(
            mode="relaxed", predictor=None, drop_rates=[loss] * args.workers))
        try:
            generate(coord, tok, ids, max_tokens=4, sampling=SamplingParams())  # warm-up
            ms, grams = [], []
            for _ in range(args.repeats):
                prefill = _datagrams(coord, tok, ids, 1)[0]
                full, r = _datagrams(coord, tok, ids, args.tokens)
                ms.append(r.decode_ms_per_token)
                grams.append((full - prefill) / (args.tokens - 1))  # per decode step
            rounds = coord.sync_json()["rounds"]
        finally:
            coord.close()
    return {"loss": loss, "decode_ms_per_token": round(statistics.median(ms), 2),
            "datagrams_per_token": round(statistics.median(grams), 1), "rounds": rounds}


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    source = open_source(None)
    hidden, layers = source.config.hidden_size, source.config.n_layers
    tok = open_tokenizer(source)
    source.close()
    body = encode_body(torch.randn(1, hidden), WIRE_FP16)
    grams_per_msg = len(protocol.encode(ACTIVATION, 0, WIRE_FP16, RoundTag(1, 1, 1, 1, 1, 1, 1),
                                        body, channel_pair(b"k" * 32)[0]))
    per = _per_datagram_us(body)
    print(f"one {len(body)}-byte message ({grams_per_msg} datagram(s)) sealed+opened: "
          f"{per['sealed']:.1f} us (MAC only, before: {per['mac']:.1f} us)", file=sys.stderr)
    ids = tok.encode(tok.render_chat([{"role": "user", "content": PROMPT}]))
    rows = []
    for loss in (0.0, 0.05):
        row = _cluster(args, loss, ids, tok)
        # each datagram the coordinator handles is sealed or opened once on its side
        crypto_ms = row["datagrams_per_token"] * per["sealed"] / grams_per_msg / 2 / 1e3
        row["coordinator_crypto_ms_per_token"] = round(crypto_ms, 3)
        row["share_of_decode"] = round(crypto_ms / row["decode_ms_per_token"], 4)
        rows.append(row)
        print(f"loss {loss:.0%}: {row['decode_ms_per_token']} ms/token, "
              f"{row['datagrams_per_token']} datagrams/token, crypto {crypto_ms:.3f} ms/token "
              f"({row['share_of_decode']:.2%})", file=sys.stderr, flush=True)
    rounds_per_token = 2 * layers
    data = {"message_bytes": len(body), "datagrams_per_message": grams_per_msg,
            "seal_open_us": round(per["sealed"], 2), "mac_us": round(per["mac"], 2),
            "per_round_us": round(per["sealed"] * (1 + args.workers), 1),
            "rounds_per_token": rounds_per_token, "workers": args.workers,
            "tokens": args.tokens, "repeats": args.repeats, "cluster": rows}
    publish(args.out, "crypto", data, _lines(data), args.json)
    return 0


def _lines(d: dict[str, Any]) -> list[str]:
    lines = ["# The cost of encrypted links", "", "{header}",
             f"One activation of the default model ({d['message_bytes']} bytes, fp16 wire, "
             f"{d['datagrams_per_message']} datagram) sealed and opened with ChaCha20-Poly1305 "
             f"(counter, replay window): **{d['seal_open_us']} us**; the keyed BLAKE2b MAC "
             f"used before (authenticated, in clear): {d['mac_us']} us. A round with "
             f"{d['workers']} workers seals and opens {1 + d['workers']} such messages: about "
             f"{d['per_round_us']} us of CPU, spread over the devices; {d['rounds_per_token']} "
             "rounds per token.", "",
             "A relaxed-mode cluster on loopback (local workers, 1 thread each; loss: user-space "
             "drops on arrival at both ends): datagrams the coordinator sealed or opened per "
             "decode step, and what that costs it at the cost above (half a seal+open per "
             "datagram: it seals what it sends and opens what it receives).", "",
             "| loss | decode ms/token | datagrams/token | coordinator crypto ms/token | share |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for r in d["cluster"]:
        lines.append(f"| {r['loss']:.0%} | {r['decode_ms_per_token']} | "
                     f"{r['datagrams_per_token']} | {r['coordinator_crypto_ms_per_token']} | "
                     f"{r['share_of_decode']:.2%} |")
    lines.append("")
    return lines
