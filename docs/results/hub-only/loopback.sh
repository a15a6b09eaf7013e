#!/bin/bash
# loopback 0.8x check (issue 16): halo run --local 1 --placement equal vs halo generate, m1024
cd /work/main
for i in 1 2; do
  g=$(.venv/bin/halo generate "Once upon a time" --model /tmp/m1024 --ignore-eos --max-tokens 64 --json 2>/dev/null | jq .decode_ms_per_token)
  for sync in strict relaxed; do
    r=$(.venv/bin/halo run "Once upon a time" --model /tmp/m1024 --local 1 --placement equal --sync $sync --ignore-eos --max-tokens 64 --json 2>/dev/null | jq .decode_ms_per_token)
    echo "{\"run\": $i, \"generate\": $g, \"sync\": \"$sync\", \"run_ms\": $r}"
  done
done
