#!/bin/bash
# interleaved: equal/halo x bf16/int8, REPLAN held
cd /work/main && source .venv/bin/activate
for rep in 1 2; do for p in equal halo; do for w in bf16 int8; do
  WIRE=$w REPLAN=100000 timeout 600 python docs/results/fallbacks/hubgap.py /tmp/q/q8.toml /tmp/m1024 $p 2>/dev/null >> /tmp/s11/wire.jsonl
done; done; done
