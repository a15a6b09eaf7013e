"""Coordinator CPU per token and ms/token, 7 local workers, workers placement, relaxed.
usage: ab_cpu.py MODEL TOKENS  (the tree: PYTHONPATH)"""
import sys, time, secrets, json, os
import torch
import halollm
from halollm.generate import generate
from halollm.runtime.coordinator import Coordinator
from halollm.runtime.keys import cluster_key
from halollm.runtime.local import LocalWorkers
from halollm.runtime.options import ClusterOptions
from halollm.sampling import SamplingParams
torch.set_num_threads(1)
model, n = sys.argv[1], int(sys.argv[2])
key = secrets.token_hex(16)
def wcpu(procs):
    t = 0.0
    for p in procs:
        f = open(f"/proc/{p.pid}/stat").read().split(")")[1].split()
        t += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return t
with LocalWorkers(7, key, model) as lw:
    coord = Coordinator(model, None, lw.addresses, cluster_key(key), ClusterOptions.build(placement="workers", mode="relaxed"), quant="q4")
    ids = coord.tokenizer.encode("Once upon a time")
    generate(coord, coord.tokenizer, ids, max_tokens=8, sampling=SamplingParams(), ignore_eos=True)
    c0, w0 = time.process_time(), wcpu(lw.procs)
    res = generate(coord, coord.tokenizer, ids, max_tokens=n, sampling=SamplingParams(), ignore_eos=True)
    c1, w1 = time.process_time(), wcpu(lw.procs)
    s = coord.sync_json()
    coord.close()
print(json.dumps({"tree": os.path.dirname(halollm.__file__), "ms_per_token": round(res.decode_ms_per_token, 1), "coord_cpu_ms_per_token": round(1e3*(c1-c0)/n, 2),
                  "worker_cpu_ms_per_token": round(1e3*(w1-w0)/n/7, 2), "hub_cpu": s["hub_cpu"]}))
