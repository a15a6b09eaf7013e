"""`halo bench peer`: HALO side by side with two peers built from their own source outside
this repository (docs/peer.md): distributed-llama (tensor parallelism over TCP, its own q40
weights with q80 synchronisation) on the same kernel testbed as HALO's workers, and
llama.cpp's llama-bench on one device.

--dllama: the testbed comes up once with one device per worker of the largest cluster
(namespaces, veth links, nftables loss, optional cgroup CPU share; HALO's `halo worker`s
started by the testbed itself), then, interleaved for each repeat and each configuration
(nodes x loss): distributed-llama (its root `dllama inference` here, in the host namespace,
its `dllama worker`s inside the first nodes-1 device namespaces) and then each HALO mode
(`halo run --quant q4` over the same devices' workers). One node: `dllama inference`
without workers against `halo generate --quant q4`. Both use 4-bit weights and one thread
per node. Numbers: mean ms per predicted token as each program reports it (dllama's
`Prediction … ms/tok`, HALO's decode_ms_per_token), median over the repeats.

--llama-cpp: llama-bench tg (text generation from an empty context) with -t 1 and -t 2 on
one GGUF (default: the default model) against `halo generate` on the same file in its
default format with the same number of torch threads, interleaved, median of the repeats.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from halollm.bench import peer_llamacpp
from halollm.bench import peer_report as rep
from halollm.bench import peer_run as prun
from halollm.bench.report import command_line, require_testbed, stage_printer, write_results
from halollm.errors import HaloError

MODES = {
    "strict": ("strict", "equal"),
    "relaxed": ("relaxed", "equal"),
    "workers": ("relaxed", "workers"),
    "halo": ("relaxed", "halo")
}
PROMPT = peer_llamacpp.PROMPT
TIMEOUT = 900.0  # seconds for any one peer or HALO process


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "peer", help="HALO side by side with distributed-llama (testbed, root) "
        "and llama.cpp, built from source elsewhere", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dllama", type=Path, metavar="DIR",
                   help="a built distributed-llama folder (with the `dllama` binary)")
    p.add_argument("--dllama-model", type=Path, metavar="FILE",
                   help="the model converted by its converter/convert-hf.py (q40)")
    p.add_argument("--dllama-tokenizer", type=Path, metavar="FILE",
                   help="the tokenizer converted by converter/convert-tokenizer-hf.py")
    p.add_argument(
        "--model", metavar="PATH",
        help="HALO's copy of the same weights: the Hugging Face folder the dllama "
        "model was converted from, or a Q4_0 GGUF of it")
    p.add_argument(
        "--dllama-net-turbo", type=int, choices=(0, 1), default=0,
        help="dllama's --net-turbo for its root and workers (default 0: blocking sockets; 1, "
        "dllama's own default, spins on non-blocking sockets, which on a testbed whose nodes "
        "share a few cores takes the CPU the other nodes compute on)")
    p.add_argument(
        "--halo-quant", default="q4", choices=("q4", "auto"),
        help="HALO's --quant: q4 (default; pack the folder's fp16 weights to "
        "int4) or auto (a Q4_0 GGUF's blocks kept as they are, as dllama's "
        "q40)")
    p.add_argument(
        "--nodes", default="1,2,4,8",
        help="cluster sizes, root included, powers of two (dllama's rule; default 1,2,4,8)")
    p.add_argument(
        "--loss", default="0,0.05,mixed",
        help="per link and direction; 'mixed': 3 of 7 worker links at 5%% (default 0,0.05,mixed)")
    p.add_argument(
        "--cpu", type=float, metavar="SHARE",
        help="hold every node, the root/coordinator included, to this fraction "
        "of a core (cgroup quota), e.g. 0.25")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    p.add_argument("--tokens", type=int, default=64, help="predicted tokens per run (64)")
    p.add_argument(
        "--halo-modes", default="strict,relaxed,halo",
        help="strict: --sync strict --placement equal; relaxed: --sync relaxed "
        "--placement equal; halo: --sync relaxed --placement halo")
    p.add_argument("--llama-cpp", type=Path, metavar="DIR",
                   help="a built llama.cpp folder (build/bin/llama-bench)")
    p.add_argument("--llama-cpp-model", type=Path, metavar="GGUF",
                   help="the GGUF for the llama.cpp comparison (default: the default model)")
    p.add_argument("--timeout", type=float, default=TIMEOUT, metavar="S",
                   help=f"seconds before any one process is killed (default {TIMEOUT:.0f})")
    p.add_argument("--out", type=Path, default=Path("docs/results/peer"))
    p.set_defaults(func=run)


def _split(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise HaloError(f"{what} is empty")
    return items


def _need_file(path: Path | None, what: str, hint: str) -> Path:
    if path is None:
        raise HaloError(f"{what} is required with --dllama ({hint})")
    if not path.is_file():
        raise HaloError(f"{what} {path}: no such file ({hint})")
    return path


def _check_dllama(args: argparse.Namespace) -> tuple[Path, list[int], list[str], list[str]]:
    binary = args.dllama / "dllama"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise HaloError(f"--dllama {args.dllama}: no executable dllama in it (build it there "
                        "with `make dllama`, docs/peer.md)")
    _need_file(args.dllama_model, "--dllama-model", "converter/convert-hf.py MODEL q40 NAME")
    _need_file(args.dllama_tokenizer, "--dllama-tokenizer",
               "converter/convert-tokenizer-hf.py MODEL NAME")
    if not args.model or not Path(args.model).exists():
        raise HaloError("--model must be HALO's copy of the dllama model's weights: the "
                        "Hugging Face folder it was converted from, or a Q4_0 GGUF of it")
    try:
        nodes = [int(n) for n in _split(args.nodes, "--nodes")]
    except ValueError:
        raise HaloError(f"--nodes must be integers (got {args.nodes!r})") from None
    bad = [n for n in nodes if n < 1 or n & (n - 1)]
    if bad:
        raise HaloError(
            f"--nodes: {bad[0]} is not a power of two (distributed-llama needs 1, 2, 4, 8, …)")
    losses = _split(args.loss, "--loss")
    for loss in losses:
        if loss != "mixed" and not (loss.replace(".", "", 1).isdigit() and 0 <= float(loss) < 1):
            raise HaloError(f"--loss: {loss!r} is neither a rate in [0, 1) nor 'mixed'")
    modes = _split(args.halo_modes, "--halo-modes")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise HaloError(f"--halo-modes: unknown {unknown[0]!r} (choose from {', '.join(MODES)})")
    return binary, nodes, losses, modes


def run(args: argparse.Namespace) -> int:
    if not args.dllama and not args.llama_cpp:
        raise HaloError("give --dllama DIR (with --dllama-model, --dllama-tokenizer, --model) "
                        "and/or --llama-cpp DIR")
    if args.repeats < 1 or args.tokens < 2:
        raise HaloError("--repeats must be at least 1 and --tokens at least 2")
    if args.cpu is not None and not 0.01 <= args.cpu <= 64:
        raise HaloError("--cpu must be a share of a core in [0.01, 64]")
    say = stage_printer("peer")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up as Ctrl-C does
    checked = _check_dllama(args) if args.dllama else None
    bench = peer_llamacpp.check(args) if args.llama_cpp else None
    code = 0
    try:
        if checked:
            require_testbed("peer")
            code = _dllama_sweep(args, *checked, say)
        if bench and code == 0:
            code = peer_llamacpp.sweep(args, bench, say)
    finally:
        prun.remove_root_cgroup()
    return code


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _spec(workers: int, share: float | None) -> Any:
    from halollm.testbed.spec import parse_spec

    dev: dict[str, Any] = {"cpu": share} if share is not None else {}
    data: dict[str, Any] = {
        "name": "peer",
        "subnet": "10.83",
        "port": 7000,
        "device": [{
            "name": f"w{i}",
            **dev
        } for i in range(1,
                         max(1, workers) + 1)]
    }
    if share is not None:
        data["coordinator"] = {"cpu": share}
    return parse_spec(data)


def _dllama_sweep(args: argparse.Namespace, binary: Path, nodes: list[int], losses: list[str],
                  modes: list[str], say: Any) -> int:
    from halollm.testbed import cluster

    spec = _spec(max(nodes) - 1, args.cpu)
    runs = rep.plan(nodes, losses, modes, args.repeats)
    cg = prun.root_cgroup(args.cpu)
    say(f"{len(runs)} runs; testbed {spec.name}: {len(spec.devices)} devices" +
        (f", every node at {args.cpu:g} of a core" if args.cpu else ""))
    results: list[dict[str, Any]] = []
    partial, before = False, None
    logs = Path(tempfile.mkdtemp(prefix="halo-peer-"))
    try:
        state = cluster.up(spec, model=args.model, log=lambda m: None)
        before = prun.enable_forwarding(spec)
        for k, r in enumerate(runs, start=1):
            _set_loss(spec, r)
            res = _one(args, binary, spec, state, r, modes, cg, logs)
            results.append(res)
            say(f"[{k}/{len(runs)}] repeat {r.repeat}, {r.nodes} node(s), loss {r.loss}, "
                f"{r.system}: " + (f"{res['ms_per_token']:.1f} ms/token" if "error" not in
                                   res else f"failed: {res['error']}"))
    except KeyboardInterrupt:
        partial = True
        say(f"interrupted: writing the {len(results)} runs measured so far")
    finally:
        if before is not None:
            prun.restore_forwarding(before)
        cluster.down(spec, quiet=True)
        shutil.rmtree(logs, ignore_errors=True)
    _write_dllama(args, spec, modes, results, partial)
    return 130 if partial else 0


def _set_loss(spec: Any, r: rep.Run) -> None:
    from halollm.testbed import cluster

    if r.nodes == 1:
        return
    workers = r.nodes - 1
    lossy = rep.lossy_workers(workers, r.loss)
    for i, d in enumerate(spec.devices):
        rate = rep.loss_rate(r.loss) if i < workers and i >= workers - lossy else 0.0
        cluster.set_loss(spec, d.name, rate, rate)


def _one(args: argparse.Namespace, binary: Path, spec: Any, state: dict[str, Any], r: rep.Run,
         modes: list[str], cg: Path | None, logs: Path) -> dict[str, Any]:
    """One run of the plan as a result row (its error, if it failed: a result too)."""
    row: dict[str, Any] = {"repeat": r.repeat, "nodes": r.nodes, "loss": r.loss, "system": r.system}
    workers = r.nodes - 1
    try:
        if r.system == "dllama":
            row.update(_dllama_once(args, binary, spec, workers, cg, logs))
        elif r.system == "halo-generate":
            j = prun.halo_single(args.model, args.halo_quant, PROMPT, args.tokens, 1, args.timeout,
                                 cg)
            row.update(peer_llamacpp.halo_row(j))
        else:
            addrs = [f"{w['address']}:{w['port']}" for w in state["workers"][:workers]]
            j = prun.halo_cluster(args.model, args.halo_quant, addrs, state["key"], MODES[r.system],
                                  PROMPT, args.tokens, args.timeout, cg)
            row.update(peer_llamacpp.halo_row(j))
            sync = j.get("sync") or {}
            row.update(
                {k: sync.get(k)
                 for k in ("expected", "lost", "late", "fallbacks") if k in sync})
    except HaloError as exc:
        row["error"] = str(exc)
    return row


def _dllama_once(args: argparse.Namespace, binary: Path, spec: Any, workers: int, cg: Path | None,
                 logs: Path) -> dict[str, Any]:
    pool = prun.DllamaWorkers(binary, spec, workers, logs, args.dllama_net_turbo) \
        if workers else None
    try:
        out = prun.dllama_root(binary, args.dllama_model, args.dllama_tokenizer,
                               pool.addresses if pool else [], PROMPT, args.tokens, args.timeout,
                               cg, args.dllama_net_turbo)
    finally:
        if pool:
            pool.close()
    parsed = rep.parse_dllama(out)
    parsed.pop("per_token_ms")
    return parsed


def _write_dllama(args: argparse.Namespace, spec: Any, modes: list[str],
                  results: list[dict[str, Any]], partial: bool) -> None:
    rows = rep.medians(results)
    share = (f"every node (the root/coordinator too) held to {args.cpu:g} of a core"
             if args.cpu else "no CPU quota: every process shares this machine's cores")
    lines = [
        "# HALO vs distributed-llama on the kernel testbed", "", "{header}",
        f"Model `{args.model}`: HALO `--quant {args.halo_quant}` (PyTorch int4 kernels), dllama "
        f"`{args.dllama_model.name}` (q40 weights, q80 sync buffers, --net-turbo "
             f"{args.dllama_net_turbo}). One thread per "
        f"node; {share}. ms per predicted token (mean over {args.tokens} tokens as "
        "each program reports it), median of "
        f"{args.repeats} interleaved repeats; 1 node: `dllama inference` alone vs "
        f"`halo generate --quant {args.halo_quant}`. Modes: " +
        "; ".join(f"{m} = --sync {MODES[m][0]} --placement {MODES[m][1]}"
                  for m in modes) + "." + _mixed_note(rows) +
        (" **Interrupted: partial.**" if partial else ""), "", *rep.dllama_table(rows, modes), ""
    ]
    errs = [
        f"* {r['nodes']} node(s), loss {r['loss']}, {r['system']}: {r['error']}" for r in rows
        if "error" in r
    ]
    lines += ["Failures:", "", *errs, ""] if errs else []
    data = {
        "commits": peer_llamacpp.commits(args),
        "partial": partial,
        "cpu_share": args.cpu,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "prompt": PROMPT,
        "spec": {
            "name": spec.name,
            "subnet": spec.subnet,
            "devices": len(spec.devices)
        },
        "rows": rows,
        "runs": results,
        "command_line": command_line()
    }
    lines.insert(
        3, f"Commits: HALO {data['commits']['halo']}, distributed-llama "
        f"{data['commits']['distributed-llama']}.\n")
    md = write_results(args.out, "dllama", data, "\n".join(lines))
    print("\n".join(lines[4:]))
    print(f"written: {md}", flush=True)


def _mixed_note(rows: list[dict[str, Any]]) -> str:
    sizes = sorted({r["nodes"] for r in rows if r["loss"] == "mixed"})
    if not sizes:
        return ""
    return (" 'mixed': " + ", ".join(f"{rep.lossy_workers(n - 1, 'mixed')} of {n - 1}"
                                     for n in sizes) + " worker links at 5% each way.")
