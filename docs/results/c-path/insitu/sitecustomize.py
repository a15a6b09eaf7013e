"""In-situ A/B of two implementations inside one run, loaded by every process of the run
through PYTHONPATH (`insitu_ab.Recorder`: a coin per call, each side's thread CPU summed;
session 17's table in c-path.md was taken when calls alternated, see its caveat). Where
HALO_INSITU_OUT is set: llama.rms_norm (C) against llama.rms_norm_reference (torch);
tensor_codec.decode_body with the C path and without it (numpy); AttentionShard.forward with
the C kernel and with torch's operators (`attention`: decode steps only); MlpShard.activations
with the C silu_mul and with torch's (`mlp_activations`)."""
import os

OUT = os.environ.get("HALO_INSITU_OUT")
if OUT:
    import torch

    from halollm.model import llama
    from halollm.runtime import tensor_codec
    from insitu_ab import Recorder

    rec = Recorder(OUT, ("c", "reference"))
    llama.rms_norm = rec.both("rms_norm", llama.rms_norm, llama.rms_norm_reference)
    decode = tensor_codec.decode_body
    tensor_codec.decode_body = rec.both(
        "decode_body", decode, lambda body, wire, ntok, dim: decode(body, wire, ntok, dim, None))

    kernels = llama.KERNELS

    def torch_attention(shard, x, start, key_mask=None):
        llama.KERNELS = None
        try:
            return forward(shard, x, start, key_mask)
        finally:
            llama.KERNELS = kernels

    forward = rec.decode_attention("attention", torch_attention)

    silu, activations = llama.silu_mul, llama.MlpShard.activations

    def torch_activations(shard, x, dtype=torch.float32):
        llama.silu_mul = lambda *a: None
        try:
            return activations(shard, x, dtype)
        finally:
            llama.silu_mul = silu

    mlp = rec.both("mlp_activations", activations, torch_activations)
    llama.MlpShard.activations = lambda shard, x, dtype=torch.float32: mlp(shard, x, dtype)
