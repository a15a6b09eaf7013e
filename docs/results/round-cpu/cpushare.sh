#!/bin/bash
# usage: cpushare.sh MODEL [extra halo run args]; prints per-process CPU share over a 10 s window mid-run
cd /work/main
M=$1; shift
.venv/bin/halo run --model $M --quant q4 --local 7 --placement workers --sync relaxed --ignore-eos --max-tokens 300 --json "$@" "Once upon a time" > /tmp/prof/run.json 2>/tmp/prof/run.err &
RP=$!
sleep 12
python3 - $RP <<'PY'
import os, time, subprocess, sys
root = sys.argv[1]
kids = subprocess.check_output(f"pgrep -P {root} || true", shell=True).split()
pids = [root] + [p for p in os.listdir('/proc') if p.isdigit() and b'halollm.cli.main\x00worker' in open(f'/proc/{p}/cmdline','rb').read()]
def cpu(p):
    f = open(f"/proc/{int(p)}/stat").read().split(")")[1].split()
    return (int(f[11]) / os.sysconf("SC_CLK_TCK"), int(f[12]) / os.sysconf("SC_CLK_TCK"))
a = {p: cpu(p) for p in pids}; t = time.time(); time.sleep(8); b = {p: cpu(p) for p in pids}; dt = time.time()-t
print("cpu share:", " ".join(f"{(b[p][0]-a[p][0])/dt*100:.0f}%u+{(b[p][1]-a[p][1])/dt*100:.0f}%s" for p in pids))
PY
wait $RP
python3 -c "import json; d=json.load(open('/tmp/prof/run.json')); print('ms/token', d['decode_ms_per_token'], d['sync']['hub_cpu'])"
