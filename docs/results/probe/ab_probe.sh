#!/bin/bash
# interleaved: old probe vs new probe, halo placement with the CLI's re-plan default (8); equal and one node for reference
cd /work/main && source .venv/bin/activate
for rep in 1 2 3; do
  for v in old new; do
    if [ $v = old ]; then PP=/tmp/s11/old/src; else PP=/work/main/src; fi
    VER=$v PYTHONPATH=$PP REPLAN=8 timeout 900 python /tmp/s11/hubgap.py /tmp/q/q8.toml /tmp/m1024 halo 2>/tmp/s11/err.$v.$rep | sed "s/^{/{\"version\": \"$v\", /" >> /tmp/s11/probe_ab.jsonl
  done
  if [ $rep -le 2 ]; then
    REPLAN=8 timeout 900 python /tmp/s11/hubgap.py /tmp/q/q8.toml /tmp/m1024 equal 2>/dev/null | sed 's/^{/{"version": "new", /' >> /tmp/s11/probe_ab.jsonl
    timeout 600 python /tmp/s11/one.py /tmp/q/q8.toml /tmp/m1024 >> /tmp/s11/probe_ab.jsonl
  fi
done
echo finished >> /tmp/s11/probe_ab.jsonl
