#!/bin/bash
# Session 14: the coordinator of 5ecb213 (a worktree at /tmp/wt_old, its _wire built in
# place) vs this tree (83ee162: a round's wait in C), placement $1, $2 interleaved pairs, on
# the quarter-core testbed /tmp/q/q8.toml with m1024 (see ../hub-only.md).
cd /work/main
for i in $(seq 1 ${2:-3}); do
  for arm in old new; do
    if [ $arm = old ]; then pp=/tmp/wt_old/src; else pp=; fi
    out=$(PYTHONPATH=$pp .venv/bin/python docs/results/fallbacks/hubgap.py /tmp/q/q8.toml /tmp/m1024 $1 2>/dev/null | tail -1)
    echo "{\"run\": $i, \"coord\": \"$arm\", \"r\": $out}"
  done
done
