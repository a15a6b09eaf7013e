#!/bin/bash
# Session 11's coordinator (a worktree of 6731ebc at /tmp/wt11) against session 12's (this
# tree: native data path, one zmq poll), interleaved, on the quarter-core testbed /tmp/q/q8.toml
# (workers: this tree), m1024 packed, equal split; then one quarter-core node alone.
cd /work/main
for i in 1 2 3; do
  for arm in s11 s12; do
    if [ $arm = s11 ]; then pp=/tmp/wt11/src; else pp=; fi
    out=$(PYTHONPATH=$pp .venv/bin/python docs/results/fallbacks/hubgap.py /tmp/q/q8.toml /tmp/m1024 equal 2>/dev/null | tail -1)
    echo "{\"run\": $i, \"coord\": \"$arm\", \"r\": $out}"
  done
done
for i in 1 2; do
  out=$(.venv/bin/python docs/results/probe/one.py /tmp/q/q8.toml /tmp/m1024 2>/dev/null | tail -1)
  echo "{\"run\": $i, \"coord\": \"one-node\", \"r\": $out}"
done
