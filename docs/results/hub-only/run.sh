#!/bin/bash
# Session 14: on the quarter-core testbed /tmp/q/q8.toml (coordinator and 7 workers at 0.25
# core each), m1024 packed to int4, relaxed, 64 tokens: one quarter-core node alone, the
# equal split (the coordinator computes an eighth), the workers placement (the coordinator
# computes nothing) and the halo placement, interleaved, 3 repeats. Writes JSON lines.
cd /work/main
for i in 1 2 3; do
  out=$(.venv/bin/python docs/results/probe/one.py /tmp/q/q8.toml /tmp/m1024 2>/dev/null | tail -1)
  echo "{\"run\": $i, \"arm\": \"one-node\", \"r\": $out}"
  for p in equal workers halo; do
    out=$(.venv/bin/python docs/results/fallbacks/hubgap.py /tmp/q/q8.toml /tmp/m1024 $p 2>/dev/null | tail -1)
    echo "{\"run\": $i, \"arm\": \"$p\", \"r\": $out}"
  done
done
