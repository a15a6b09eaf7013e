"""Per-round CPU split on the coordinator: Rounds.run total vs the native exchange call vs the rest of the token."""
import sys, time, secrets, json
import torch
from halollm.generate import generate
from halollm.runtime.coordinator import Coordinator
from halollm.runtime.keys import cluster_key
from halollm.runtime.local import LocalWorkers
from halollm.runtime.options import ClusterOptions
from halollm.sampling import SamplingParams
from halollm.runtime import transport, rounds
torch.set_num_threads(1)
acc = {"exchange": 0.0, "run": 0.0, "n_ex": 0, "n_run": 0}
def wrap(cls, name, key):
    f = getattr(cls, name)
    def g(*a, **k):
        c = time.process_time()
        try: return f(*a, **k)
        finally:
            acc[key] += time.process_time() - c; acc["n_" + ("ex" if key == "exchange" else "run")] += 1
    setattr(cls, name, g)
wrap(transport.UdpEndpoint, "exchange", "exchange")
wrap(rounds.Rounds, "run", "run")
model, n = sys.argv[1], int(sys.argv[2])
key = secrets.token_hex(16)
with LocalWorkers(7, key, model) as lw:
    coord = Coordinator(model, None, lw.addresses, cluster_key(key), ClusterOptions.build(placement="workers", mode="relaxed"), quant="q4")
    ids = coord.tokenizer.encode("Once upon a time")
    generate(coord, coord.tokenizer, ids, max_tokens=8, sampling=SamplingParams(), ignore_eos=True)
    for k in acc: acc[k] = 0
    c0 = time.process_time()
    res = generate(coord, coord.tokenizer, ids, max_tokens=n, sampling=SamplingParams(), ignore_eos=True)
    c1 = time.process_time()
    coord.close()
tok = n
print(json.dumps({"ms_per_token": round(res.decode_ms_per_token, 1), "cpu_ms_per_token": round(1e3*(c1-c0)/tok, 2),
  "run_ms_per_token": round(1e3*acc["run"]/tok, 2), "exchange_ms_per_token": round(1e3*acc["exchange"]/tok, 2),
  "exchange_us_per_call": round(1e6*acc["exchange"]/max(1, acc["n_ex"]), 1), "run_us_per_call": round(1e6*acc["run"]/max(1, acc["n_run"]), 1), "calls": acc["n_ex"]}))
