"""CPU per predicted token of distributed-llama's root and workers and of HALO's coordinator
and workers, 8 nodes on the kernel testbed (full speed: no quota), measured by difference:
each program runs at SHORT and LONG tokens, and (CPU at LONG - CPU at SHORT) / (LONG - SHORT)
is the per-token cost without start-up and loading. Root: getrusage of the finished child;
workers: utime+stime from /proc before and after. usage (root, from /work/main):
  .venv/bin/python docs/results/peer/cpu-s18/cpu_per_token.py MODEL DLLAMA_DIR DLLAMA_MODEL DLLAMA_TOK [REPEATS]
"""
import json
import os
import resource
import sys
import time
from pathlib import Path

from halollm.bench import peer_run as prun
from halollm.bench.peer import PROMPT, _spec
from halollm.testbed import cluster

SHORT, LONG = 16, int(os.environ.get("LONG", "112"))
model, dl, dl_model, dl_tok = sys.argv[1], Path(sys.argv[2]) / "dllama", Path(sys.argv[3]), \
    Path(sys.argv[4])
repeats = int(sys.argv[5]) if len(sys.argv) > 5 else 2
TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pids):
    t = 0.0
    for p in pids:
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        t += (int(f[11]) + int(f[12])) / TICK
    return t


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def dllama(spec, tokens):
    pool = prun.DllamaWorkers(dl, spec, 7, Path("/tmp"), False)
    try:
        w0, c0, t0 = proc_cpu([p.pid for p in pool.procs]), children_cpu(), time.monotonic()
        out = prun.dllama_root(dl, dl_model, dl_tok, pool.addresses, PROMPT, tokens, 600, None)
        c1, w1 = children_cpu(), proc_cpu([p.pid for p in pool.procs])
    finally:
        pool.close()
    return c1 - c0, (w1 - w0) / 7, time.monotonic() - t0


def halo(spec, state, tokens, placement):
    pids = [w["pid"] for w in state["workers"]]
    addrs = [f"{w['address']}:{w['port']}" for w in state["workers"]]
    w0, c0, t0 = proc_cpu(pids), children_cpu(), time.monotonic()
    prun.halo_cluster(model, "q4", addrs, state["key"], ("relaxed", placement), PROMPT, tokens,
                      600, None)
    c1, w1 = children_cpu(), proc_cpu(pids)
    return c1 - c0, (w1 - w0) / 7, time.monotonic() - t0


spec = _spec(7, None)
cluster.down(spec, quiet=True)
state = cluster.up(spec, model=model, log=lambda m: None)
before = prun.enable_forwarding(spec)
rows = []
try:
    for rep in range(repeats):
        for name, run in (("dllama", lambda n: dllama(spec, n)),
                          ("halo-workers", lambda n: halo(spec, state, n, "workers")),
                          ("halo-equal", lambda n: halo(spec, state, n, "equal"))
                          )[:int(os.environ.get("SYSTEMS", "3"))]:
            a, b = run(SHORT), run(LONG)
            row = {"repeat": rep + 1, "system": name,
                   "root_cpu_ms_per_token": round(1e3 * (b[0] - a[0]) / (LONG - SHORT), 2),
                   "worker_cpu_ms_per_token": round(1e3 * (b[1] - a[1]) / (LONG - SHORT), 2),
                   "wall_ms_per_token": round(1e3 * (b[2] - a[2]) / (LONG - SHORT), 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
finally:
    prun.restore_forwarding(before)
    cluster.down(spec, quiet=True)
