"""In-situ A/B inside one run (loaded by every process through PYTHONPATH, beside
docs/results/c-path/insitu for its `insitu_ab.Recorder`: a coin per call, each side's
thread CPU summed). Where HALO_INSITU_OUT is set, by HALO_INSITU_WHAT:
adapters (default): the packed kernels' input and output adapters (quant._as_input,
  quant._as_output), the tree's (a decode step's tensor returned as it is when it already
  fits) against session 17's (always reshaped, converted, copied if needed);
mlp: MlpShard.forward with the kernel's bfloat16 activations and with float32 ones;
attn: a decode step's AttentionShard.forward with the kernel taking bfloat16 rows and giving
  bfloat16 output, and with float32 in and out."""
import os
import sys

OUT = os.environ.get("HALO_INSITU_OUT")
if OUT:
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "c-path", "insitu"))
    from halollm.model import llama, quant
    from insitu_ab import Recorder

    rec = Recorder(OUT, ("new", "old"))
    what = os.environ.get("HALO_INSITU_WHAT", "adapters")

    if what == "adapters":
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

        quant._as_input = rec.both("as_input", quant._as_input, old_input)
        quant._as_output = rec.both("as_output", quant._as_output, old_output)
    elif what == "attn":
        attend = llama.attend_one

        def old_attention(shard, x, start, key_mask=None):
            # session 17's: float32 rows in (widened by torch), float32 out (rounded by the
            # packed product)
            llama.attend_one = lambda qkv, *a: attend(qkv.float(), *a[:6])
            try:
                return forward(shard, x, start, key_mask)
            finally:
                llama.attend_one = attend

        forward = rec.decode_attention("attention", old_attention)
    else:  # mlp
        new_forward = llama.MlpShard.forward

        def old_forward(shard, x, start=0):
            return llama.project(shard.activations(x), shard.w_down)

        mlp = rec.both("mlp_forward", new_forward, old_forward)
        llama.MlpShard.forward = lambda shard, x, start=0: mlp(shard, x, start)
