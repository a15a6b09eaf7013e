#!/bin/bash
# A/B: the coordinator's data path native vs pure Python (workers native), m1024, quarter-core testbed, equal split
cd /work/main
for i in 1 2 3; do
  for mode in py native; do
    if [ $mode = py ]; then export HALO_PURE_PYTHON=1; else unset HALO_PURE_PYTHON; fi
    out=$(.venv/bin/python docs/results/fallbacks/hubgap.py /tmp/q/q8.toml /tmp/m1024 equal 2>/dev/null | tail -1)
    echo "{\"run\": $i, \"coord\": \"$mode\", \"r\": $out}"
  done
done
