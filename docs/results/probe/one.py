"""One quarter-core node alone: halo's generate held to the coordinator's cgroup."""
import json, sys, time, torch
from halollm.generate import generate
from halollm.model.loader import load_model
from halollm.sampling import SamplingParams
from halollm.testbed import cluster
from halollm.testbed.spec import load_spec
spec = load_spec(sys.argv[1]); cg = cluster.hold_coordinator(spec)
torch.set_num_threads(1)
m = load_model(sys.argv[2], None, quant="q4")
ids = m.tokenizer.encode("Once upon a time")
c0 = time.process_time()
from halollm.generate import LocalDecoder
res = generate(LocalDecoder(m.transformer), m.tokenizer, ids, max_tokens=64, sampling=SamplingParams(), ignore_eos=True)
print(json.dumps({"placement": "one", "decode_ms": res.decode_ms_per_token,
                  "cpu_ms_per_token": 1e3 * (time.process_time() - c0) / len(res.token_ids)}))
