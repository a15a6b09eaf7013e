#!/bin/bash
cd /work/main && source .venv/bin/activate
for w in bf16 int8; do
  WIRE=$w REPLAN=100000 timeout 1200 python /tmp/s11/hubgap.py /tmp/q/q8.toml /tmp/m2048 equal 2>/dev/null >> /tmp/s11/wire_big.jsonl
done
echo finished >> /tmp/s11/wire_big.jsonl
