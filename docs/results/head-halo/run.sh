#!/bin/bash
# The halo placement's head decision at 8 quarter-core nodes (examples/quarter.toml, m1024 q4,
# 64 tokens; the decision is commit a5cc3ad, reverted in 37ed478: run this on a5cc3ad): halo (head decided by scheduler/head.py), halo --head coordinator (before
# session 19), workers; REPEATS interleaved rounds of the three. Prints one line per run:
# mode, decode ms/token, groups per device, the head decision. The testbed must be up:
#   halo testbed up examples/quarter.toml --model /tmp/m1024
# usage: run.sh REPEATS
set -u
HALO=/work/main/.venv/bin/halo
for r in $(seq "$1"); do
  for mode in "halo" "halo --head coordinator" "workers"; do
    # shellcheck disable=SC2086
    $HALO run --testbed examples/quarter.toml --model /tmp/m1024 --quant q4 --placement $mode \
      --ignore-eos --max-tokens 64 --json "Once upon a time" 2>/dev/null |
      /work/main/.venv/bin/python -c "
import json, sys
d = json.load(sys.stdin); p = d['sync']['placement']
print('repeat $r', '$mode'.replace(' ', '_'), d['decode_ms_per_token'], p['groups_per_device'],
      json.dumps(p.get('head')), d['sync']['head'])"
  done
done
