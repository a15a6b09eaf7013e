"""The coordinator's CPU per token by function (process time), 7 local workers, m1024-style
run: usage split_token.py MODEL TOKENS. ms per token, and µs per call."""
import sys, time, secrets, json
import torch
from halollm.generate import generate
from halollm.runtime.coordinator import Coordinator
from halollm.runtime.keys import cluster_key
from halollm.runtime.local import LocalWorkers
from halollm.runtime.options import ClusterOptions
from halollm.sampling import SamplingParams
from halollm.runtime import rounds, coordinator, head_split, history, transport
from halollm.model import llama
torch.set_num_threads(1)
acc, calls = {}, {}
def wrap(cls, name):
    f = getattr(cls, name); key = f"{cls.__name__}.{name}"; acc[key] = 0.0; calls[key] = 0
    def g(*a, **k):
        c = time.process_time()
        try: return f(*a, **k)
        finally: acc[key] += time.process_time() - c; calls[key] += 1
    setattr(cls, name, g)
for cls, name in [(coordinator.Coordinator, "forward_last"), (llama.Transformer, "hidden"), (rounds.Rounds, "run"), (rounds.Rounds, "head"),
                  (head_split.HeadSplit, "logits"), (coordinator.Coordinator, "_between_tokens"), (history.History, "record"), (llama.Layer, "attn_input"), (llama.Layer, "mlp_input"), (llama.Transformer, "refine"),
                  (transport.UdpEndpoint, "_send_native"), (transport.UdpEndpoint, "receive")]:
    wrap(cls, name)
model, n = sys.argv[1], int(sys.argv[2])
key = secrets.token_hex(16)
with LocalWorkers(7, key, model) as lw:
    coord = Coordinator(model, None, lw.addresses, cluster_key(key), ClusterOptions.build(placement="workers", mode="relaxed"), quant="q4")
    ids = coord.tokenizer.encode("Once upon a time")
    generate(coord, coord.tokenizer, ids, max_tokens=8, sampling=SamplingParams(), ignore_eos=True)
    for k in acc: acc[k] = 0; calls[k] = 0
    c0 = time.process_time()
    res = generate(coord, coord.tokenizer, ids, max_tokens=n, sampling=SamplingParams(), ignore_eos=True)
    c1 = time.process_time()
    coord.close()
print(json.dumps({"ms_per_token": round(res.decode_ms_per_token, 1), "cpu_ms_per_token": round(1e3*(c1-c0)/n, 2), **{k: round(1e3*v/n, 2) for k, v in acc.items()},
                  "us_per_call": {k: round(1e6*v/max(1, calls[k]), 1) for k, v in acc.items()}}, indent=0))
