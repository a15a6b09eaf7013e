#!/bin/bash
# The issue's loopback measure: `halo run --local 1 --placement equal` (strict, relaxed) vs
# `halo generate`, same options, model $1 (default /tmp/m1024), $2 interleaved repeats.
cd /work/main
M=${1:-/tmp/m1024}
opts="--model $M --ignore-eos --max-tokens 64 --json"
ms() { python3 -c "import json,sys; print(json.load(sys.stdin)['decode_ms_per_token'])"; }
for i in $(seq ${2:-2}); do
  g=$(.venv/bin/halo generate "Once upon a time" $opts 2>/dev/null | ms)
  s=$(.venv/bin/halo run "Once upon a time" $opts --local 1 --placement equal --sync strict 2>/dev/null | ms)
  r=$(.venv/bin/halo run "Once upon a time" $opts --local 1 --placement equal --sync relaxed 2>/dev/null | ms)
  echo "generate $g strict $s relaxed $r"
done
