#!/bin/bash
# Session 13: the coordinator of d083166 (a worktree at /tmp/wt_old, its _wire built in place)
# against this tree (a decode round's partials taken in by _wire.Gather: replay windows,
# reassembly, checks and the float32 sum in C), interleaved, on the quarter-core testbed
# /tmp/q/q8.toml (coordinator and 7 workers at 0.25 core each; the workers run d083166 in
# both arms), m1024 packed to int4, equal split, relaxed, 64 tokens. Then one quarter-core
# node alone, twice.
cd /work/main
for i in 1 2 3; do
  for arm in old new; do
    if [ $arm = old ]; then pp=/tmp/wt_old/src; else pp=; fi
    out=$(PYTHONPATH=$pp .venv/bin/python docs/results/fallbacks/hubgap.py /tmp/q/q8.toml /tmp/m1024 equal 2>/dev/null | tail -1)
    echo "{\"run\": $i, \"coord\": \"$arm\", \"r\": $out}"
  done
done
for i in 1 2; do
  out=$(.venv/bin/python docs/results/probe/one.py /tmp/q/q8.toml /tmp/m1024 2>/dev/null | tail -1)
  echo "{\"run\": $i, \"coord\": \"one-node\", \"r\": $out}"
done
