"""The in-situ A/B harness of the sitecustomize.py files under docs/results (c-path/insitu,
dispatch): each wrapped call goes to one of two implementations by a coin, and each side's
thread CPU time is summed, so both meet the same machine at the same moments (this shared
machine's speed swings by 1.5x between runs). A coin, not alternation: a worker's calls
repeat with the layers and its shards differ between layers, so alternating call by call
put every even layer on one side (session 18, dispatch.md). At exit every process appends
{pid, role, what: {name: {side: [calls, cpu_s]}}} to the file it was given
(`summary.py` sums them)."""
import atexit
import json
import os
import random
import sys
import time


class Recorder:
    def __init__(self, out: str, sides: tuple[str, str]) -> None:
        self.out, self.sides, self.stats = out, sides, {}
        self.coin = random.Random(os.getpid())
        atexit.register(self.dump)

    def both(self, name, first, second):
        """A callable sending each call to `first` or `second` by the coin, timed."""
        def call(*args):
            side, fn = (self.sides[0], first) if self.coin.random() < 0.5 else \
                (self.sides[1], second)
            t = time.thread_time()
            out = fn(*args)
            s = self.stats.setdefault(name, {}).setdefault(side, [0, 0.0])
            s[0] += 1
            s[1] += time.thread_time() - t
            return out
        return call

    def decode_attention(self, name, other):
        """AttentionShard.forward's decode steps (one row, no key mask) between the tree's
        forward and `other`; every other call stays the tree's."""
        from halollm.model import llama

        forward = llama.AttentionShard.forward
        both = self.both(name, forward, other)
        llama.AttentionShard.forward = lambda shard, x, start, key_mask=None: \
            both(shard, x, start, key_mask) if x.shape[0] == 1 and key_mask is None else \
            forward(shard, x, start, key_mask)
        return forward

    def dump(self):
        role = "worker" if "worker" in sys.argv else "coordinator"
        with open(self.out, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "role": role, "what": self.stats}) + "\n")
