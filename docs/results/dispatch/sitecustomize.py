"""In-situ A/B inside one run (loaded by every process through PYTHONPATH), as
docs/results/c-path/insitu/sitecustomize.py but by a coin per call: calls of the packed kernels' input and output
adapters (quant._as_input, quant._as_output) alternate between the tree's (which return a
decode step's tensor as it is when it already fits) and session 17's (which always reshape,
convert and copy-if-needed); with HALO_INSITU_WHAT=mlp instead, MlpShard.forward with the
kernel's bfloat16 activations and with float32 ones; with =attn, a decode step's
AttentionShard.forward with the kernel taking bfloat16 rows and giving bfloat16 output, and
with float32 in and out. Each side's thread CPU is summed. Where HALO_INSITU_OUT is set,
every process appends {pid, role, what: {name: {impl: [calls, cpu_s]}}} there as it exits."""
import atexit
import json
import os
import sys
import time

import torch.nn.functional as F

OUT = os.environ.get("HALO_INSITU_OUT")
if OUT:
    from halollm.model import quant

    stats: dict = {}

    import random

    coin = random.Random(os.getpid())

    def alternating(name, fast, slow):
        # a coin per call, not strict alternation: a worker's calls repeat with the layers
        # (16 a token here), and its shards differ between layers (groups are dealt out in
        # turn), so alternating call by call put every even layer on one side
        def call(*args):
            impl, fn = ("new", fast) if coin.random() < 0.5 else ("old", slow)
            t = time.thread_time()
            out = fn(*args)
            s = stats.setdefault(name, {}).setdefault(impl, [0, 0.0])
            s[0] += 1
            s[1] += time.thread_time() - t
            return out
        return call

    def old_input(x, in_features, padded):
        if x.shape[-1] != in_features:
            raise ValueError("bad input")
        x2 = x.reshape(-1, in_features).to(quant.ACT_DTYPE)
        if padded != in_features:
            x2 = F.pad(x2, (0, padded - in_features))
        return x2.contiguous()

    def old_output(y, x, out_features):
        if y.shape[1] != out_features:
            y = y[:, :out_features]
        return y.reshape(*x.shape[:-1], out_features)

    if os.environ.get("HALO_INSITU_WHAT", "adapters") == "adapters":
        quant._as_input = alternating("as_input", quant._as_input, old_input)
        quant._as_output = alternating("as_output", quant._as_output, old_output)
    elif os.environ["HALO_INSITU_WHAT"] == "attn":  # decode attention: bfloat16 out or not
        from halollm.model import llama

        forward, attend = llama.AttentionShard.forward, llama.attend_one

        def old_attention(shard, x, start, key_mask=None):
            # session 17's: float32 rows in (widened by torch), float32 out (rounded by
            # the packed product)
            llama.attend_one = lambda qkv, *a: attend(qkv.float(), *a[:6])
            try:
                return forward(shard, x, start, key_mask)
            finally:
                llama.attend_one = attend

        both = alternating("attention", forward, old_attention)
        llama.AttentionShard.forward = lambda shard, x, start, key_mask=None: \
            both(shard, x, start, key_mask) if x.shape[0] == 1 and key_mask is None else \
            forward(shard, x, start, key_mask)
    else:  # "mlp": MlpShard.forward with the kernel's bfloat16 activations, and without
        from halollm.model import llama

        forward = llama.MlpShard.forward

        def old_forward(shard, x, start=0):
            return llama.project(shard.activations(x), shard.w_down)

        mlp = alternating("mlp_forward", forward, old_forward)
        llama.MlpShard.forward = lambda shard, x, start=0: mlp(shard, x, start)

    def dump():
        role = "worker" if "worker" in sys.argv else "coordinator"
        with open(OUT, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "role": role, "what": stats}) + "\n")

    atexit.register(dump)
