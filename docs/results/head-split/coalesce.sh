#!/bin/bash
# Session 15: --coalesce-us 0 vs $2 (default 300) on the quarter-core testbed
# examples/quarter.toml, model $1 (default /tmp/m1024) at q4, the workers placement, $3
# interleaved pairs (default 3), 64 tokens each (docs/results/fallbacks/hubgap.py). This
# tree's coordinator. See ../head-split.md.
cd /work/main
for i in $(seq 1 ${3:-3}); do
  for us in 0 ${2:-300}; do
    out=$(COALESCE=$us PYTHONPATH=${PP:-} .venv/bin/python docs/results/fallbacks/hubgap.py examples/quarter.toml ${1:-/tmp/m1024} workers 2>/dev/null | tail -1)
    echo "{\"run\": $i, \"coalesce_us\": $us, \"r\": $out}"
  done
done
