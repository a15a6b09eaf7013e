#!/bin/bash
# Session 15: the LM head on the coordinator vs its rows over the workers (--head), the
# workers placement, on the quarter-core testbed examples/quarter.toml (8 nodes at 0.25 core,
# the coordinator included), model $1 (default /tmp/m1024) at q4, $2 interleaved pairs, 64
# tokens each (docs/results/fallbacks/hubgap.py); PP: a worktree's src for the coordinator
# (so that the tree can change while it runs). See ../head-split.md.
cd /work/main
for i in $(seq 1 ${2:-3}); do
  for head in coordinator workers; do
    out=$(HEAD=$head PYTHONPATH=${PP:-} .venv/bin/python docs/results/fallbacks/hubgap.py examples/quarter.toml ${1:-/tmp/m1024} workers 2>/dev/null | tail -1)
    echo "{\"run\": $i, \"head\": \"$head\", \"r\": $out}"
  done
done
