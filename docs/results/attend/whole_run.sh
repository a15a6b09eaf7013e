#!/bin/bash
# Interleaved whole-run A/B of two trees (BASE, NEW: each a checkout with its C parts built in
# place): `halo generate` alone, and 7 local workers (docs/results/round-cpu/ab_cpu.py).
# usage: whole_run.sh BASE NEW MODEL "TOKENS..." REPEATS
set -u
BASE=$1 NEW=$2 MODEL=$3 TOKENS=$4 REPEATS=$5
PY=/work/main/.venv/bin/python
for r in $(seq "$REPEATS"); do
  for n in $TOKENS; do
    for side in base new; do
      [ $((r % 2)) = 0 ] && side=$([ $side = base ] && echo new || echo base)
      tree=$([ $side = base ] && echo "$BASE" || echo "$NEW")
      g=$(PYTHONPATH=$tree/src $PY -m halollm.cli.main generate --model "$MODEL" --quant q4 \
          --max-tokens "$n" --ignore-eos --json "Once upon a time" 2>/dev/null |
          $PY -c "import json,sys; print(json.load(sys.stdin)['decode_ms_per_token'])")
      w=$(PYTHONPATH=$tree/src $PY /work/main/docs/results/round-cpu/ab_cpu.py "$MODEL" "$n" 2>/dev/null)
      echo "repeat $r tokens $n $side generate_ms_per_token $g workers7 $w"
    done
  done
done
