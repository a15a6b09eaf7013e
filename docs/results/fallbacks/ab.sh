#!/bin/bash
# A/B at quarter core: before (HEAD worktree) vs after (working tree), interleaved
source /work/main/.venv/bin/activate
for i in 1 2; do
  for v in before after; do
    if [ $v = before ]; then PP=/tmp/s10/before/src; else PP=/work/main/src; fi
    r=$(PYTHONPATH=$PP REPLAN=${REPLAN:-4} timeout 900 python /tmp/s10/hubgap.py /tmp/q/q8.toml /tmp/s10/m1024 ${PLACEMENT:-halo} 2>/dev/null)
    echo "$r" >> /tmp/s10/ab.jsonl
    echo "$r" | python -c "
import json,sys; d=json.loads(sys.stdin.read()); print('$v', round(d['decode_ms'],1), {k: round(v,1) for k,v in d['per_token_ms'].items()}, [r['groups_per_device'] for r in d['replans']], d['fallbacks'] if 'fallbacks' in d else '')"
  done
done
