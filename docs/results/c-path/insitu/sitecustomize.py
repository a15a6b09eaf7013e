"""In-situ A/B of two implementations inside one run, loaded by every process of the run
through PYTHONPATH. Calls alternate between the C path and the reference it mirrors, and each
side's thread CPU time is summed, so both see the same machine at the same moments (this
shared machine's speed swings by 1.5x between runs). Where HALO_INSITU_OUT is set, every
process appends one JSON line there as it exits: {pid, role, what: {name: {impl: [calls,
cpu_s]}}}. Alternates: llama.rms_norm (C) with llama.rms_norm_reference (torch);
tensor_codec.decode_body with the C path and without it (numpy); AttentionShard.forward with
the C kernel and with torch's operators (`attention`: decode steps only); MlpShard.activations
with the C silu_mul and with torch's (`mlp_activations`)."""
import atexit
import json
import os
import sys
import time

OUT = os.environ.get("HALO_INSITU_OUT")
if OUT:
    from halollm.model import llama
    from halollm.runtime import tensor_codec

    stats: dict = {}

    def alternating(name, fast, slow):
        count = [0]

        def call(*args):
            count[0] += 1
            impl, fn = ("c", fast) if count[0] % 2 else ("reference", slow)
            t = time.thread_time()
            out = fn(*args)
            s = stats.setdefault(name, {}).setdefault(impl, [0, 0.0])
            s[0] += 1
            s[1] += time.thread_time() - t
            return out
        return call

    llama.rms_norm = alternating("rms_norm", llama.rms_norm, llama.rms_norm_reference)
    decode = tensor_codec.decode_body
    tensor_codec.decode_body = alternating(
        "decode_body", decode, lambda body, wire, ntok, dim: decode(body, wire, ntok, dim, None))

    kernels, forward = llama.KERNELS, llama.AttentionShard.forward

    def torch_attention(shard, x, start, key_mask=None):
        llama.KERNELS = None
        try:
            return forward(shard, x, start, key_mask)
        finally:
            llama.KERNELS = kernels

    both = alternating("attention", forward, torch_attention)
    llama.AttentionShard.forward = lambda shard, x, start, key_mask=None: \
        both(shard, x, start, key_mask) if x.shape[0] == 1 and key_mask is None else \
        forward(shard, x, start, key_mask)

    silu, activations = llama.silu_mul, llama.MlpShard.activations

    def torch_activations(shard, x):
        llama.silu_mul = lambda gu, n: None
        try:
            return activations(shard, x)
        finally:
            llama.silu_mul = silu

    mlp = alternating("mlp_activations", activations, torch_activations)
    llama.MlpShard.activations = lambda shard, x: mlp(shard, x)

    def dump():
        role = "worker" if "worker" in sys.argv else "coordinator"
        with open(OUT, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "role": role, "what": stats}) + "\n")

    atexit.register(dump)
