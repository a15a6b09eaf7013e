#!/bin/bash
cd /work/main && source .venv/bin/activate
for rep in 1 2 3; do
  REPLAN=8 timeout 1800 python /tmp/s11/hubgap.py /tmp/q/q8.toml /tmp/m2048 halo 2>/tmp/s11/bighalo.err.$rep >> /tmp/s11/big_halo.jsonl
done
echo finished >> /tmp/s11/big_halo.jsonl
