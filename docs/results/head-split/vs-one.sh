#!/bin/bash
# Session 15: one quarter-core node alone (docs/results/probe/one.py) vs the 8-node
# quarter-core testbed (examples/quarter.toml, workers placement, the head over the
# workers), model $1 (default /tmp/m1024) at q4, $2 interleaved pairs (default 2).
cd /work/main
for i in $(seq 1 ${2:-2}); do
  one=$(PYTHONPATH=${PP:-} .venv/bin/python docs/results/probe/one.py examples/quarter.toml ${1:-/tmp/m1024} 2>/dev/null | tail -1)
  echo "{\"run\": $i, \"arm\": \"one\", \"r\": $one}"
  out=$(PYTHONPATH=${PP:-} .venv/bin/python docs/results/fallbacks/hubgap.py examples/quarter.toml ${1:-/tmp/m1024} workers 2>/dev/null | tail -1)
  echo "{\"run\": $i, \"arm\": \"cluster\", \"r\": $out}"
done
