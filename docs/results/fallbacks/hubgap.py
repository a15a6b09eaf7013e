"""Where the coordinator's wall time goes at quarter core: CPU, run-queue wait, throttling.
Usage: python hubgap.py SPEC MODEL PLACEMENT  (env: HEAD, COALESCE, WIRE, REPLAN, PROF)"""
import json, os, sys, time
import torch
from halollm.generate import generate
from halollm.runtime.coordinator import Coordinator
from halollm.runtime.keys import cluster_key
from halollm.runtime.options import ClusterOptions
from halollm.sampling import SamplingParams
from halollm.testbed import cluster
from halollm.testbed.spec import load_spec

spec = load_spec(sys.argv[1]); model = sys.argv[2]; placement = sys.argv[3]
state = cluster.load_state(spec)
cg = cluster.hold_coordinator(spec)
torch.set_num_threads(1)
addrs = [(w["address"], int(w["port"])) for w in state["workers"]]
coord = Coordinator(model, None, addrs, cluster_key(state["key"]), ClusterOptions.build(
    placement=placement, mode="relaxed", replan_every=int(os.environ.get("REPLAN", "4")),
    wire=os.environ.get("WIRE"), head=os.environ.get("HEAD"),
    **({"coalesce_us": float(os.environ["COALESCE"])} if os.environ.get("COALESCE") else {})),
    quant="q4")

def snap():
    on, wait, n = map(int, open("/proc/self/schedstat").read().split())
    st = dict(l.split() for l in open(cg / "cpu.stat"))
    t = os.times()
    return time.perf_counter(), on, wait, int(st["throttled_time"]), int(st["nr_throttled"]), t.user, t.system

tok = coord.tokenizer
ids = tok.encode("Once upon a time")
a = snap()
import cProfile
prof = cProfile.Profile(time.process_time) if os.environ.get("PROF") else None
if prof: prof.enable()
res = generate(coord, tok, ids, max_tokens=64, sampling=SamplingParams(), ignore_eos=True)
if prof:
    prof.disable(); prof.dump_stats(os.environ.get("PROF_OUT", "/tmp/coord.prof"))
b = snap()
sync = coord.sync_json()
coord.close()
n = len(res.token_ids)
d = [y - x for x, y in zip(a, b)]
print(json.dumps({"placement": placement, "wire": os.environ.get("WIRE"), "head": sync.get("head"), "coalesce": os.environ.get("COALESCE"), "decode_ms": res.decode_ms_per_token,
    "per_token_ms": {"wall": 1e3 * d[0] / n, "on_cpu": d[1] / 1e6 / n, "runqueue_wait": d[2] / 1e6 / n,
                     "throttled": d[3] / 1e6 / n, "nr_throttled": d[4] / n, "user": 1e3 * d[5] / n, "system": 1e3 * d[6] / n},
    "groups": sync.get("placement", {}).get("groups_per_device"),
    "probe": sync.get("probe"), "hub_ms": sync.get("hub_ms"),
    "stage_ms": sync.get("stage_ms_per_round"), "hub_cpu": sync.get("hub_cpu"), "hub_ms_live": sync.get("hub_ms_per_worker"),
    "rounds": sync.get("rounds"), "fallbacks": [sync.get(k) for k in ("fallbacks", "fallback_builds", "fallbacks_prepared")], "replans": coord.planner.replans, "coord_profile": sync["placement"].get("coordinator"), "workers": [(w["groups"], w["profile"]) for w in sync["workers"]]}, indent=None))
