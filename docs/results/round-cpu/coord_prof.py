"""cProfile (CPU time) of the coordinator with 7 local workers. usage: coord_prof.py MODEL TOKENS"""
import cProfile, pstats, sys, time, os, secrets
import torch
from halollm.generate import generate
from halollm.runtime.coordinator import Coordinator
from halollm.runtime.keys import cluster_key
from halollm.runtime.local import LocalWorkers
from halollm.runtime.options import ClusterOptions
from halollm.sampling import SamplingParams
torch.set_num_threads(1)
model, n = sys.argv[1], int(sys.argv[2])
key = secrets.token_hex(16)
with LocalWorkers(7, key, model) as lw:
    coord = Coordinator(model, None, lw.addresses, cluster_key(key), ClusterOptions.build(placement="workers", mode="relaxed"), quant="q4")
    ids = coord.tokenizer.encode("Once upon a time")
    generate(coord, coord.tokenizer, ids, max_tokens=8, sampling=SamplingParams(), ignore_eos=True)
    prof = cProfile.Profile(time.process_time)
    c0 = time.process_time()
    prof.enable()
    res = generate(coord, coord.tokenizer, ids, max_tokens=n, sampling=SamplingParams(), ignore_eos=True)
    prof.disable()
    c1 = time.process_time()
    print("ms/token", res.decode_ms_per_token, "coord cpu ms/token", 1e3*(c1-c0)/n)
    coord.close()
    pstats.Stats(prof).sort_stats(os.environ.get("SORT","tottime")).print_stats(int(os.environ.get("N","28")))
