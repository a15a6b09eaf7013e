#!/bin/bash
# --wire accuracy on real weights (the default model), relaxed mode, no loss, long deadline
cd /work/main
T=/work/shared/data/wikitext-2/wiki.test.raw
.venv/bin/halo eval agree --text $T --tokens 512 --json > /tmp/w8/single.json 2>/tmp/w8/single.err
for wire in fp32 bf16 int8; do
  .venv/bin/halo eval agree --text $T --tokens 512 --local 2 --placement equal --sync relaxed --deadline-ms 5000 --wire $wire --json > /tmp/w8/$wire.json 2>/tmp/w8/$wire.err
done
