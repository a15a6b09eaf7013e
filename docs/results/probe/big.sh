#!/bin/bash
cd /work/main && source .venv/bin/activate
M=${M:-/tmp/m2048}
for rep in ${REPS:-1}; do
  timeout 1200 python /tmp/s11/one.py /tmp/q/q8.toml $M >> /tmp/s11/big.jsonl
  for p in equal halo; do
    REPLAN=8 timeout 1800 python /tmp/s11/hubgap.py /tmp/q/q8.toml $M $p 2>/tmp/s11/big.err.$p >> /tmp/s11/big.jsonl
  done
done
echo finished-$REPS >> /tmp/s11/big.jsonl
