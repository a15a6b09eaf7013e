"""Premise of the LM head split: is each row slice's int4 product bitwise the full head's?
Usage: python headrows.py  (m1024 from `halo make-model` at /tmp/m1024, and the default model)"""
import torch

from halollm.model.llama import project, rms_norm
from halollm.model.loader import load_model

torch.set_num_threads(1)
for path, quant in (("/tmp/m1024", "q4"), (None, None)):
    t = load_model(path, None, quant=quant).transformer
    head = t.lm_head
    x = torch.randn(1, t.config.hidden_size)
    xn = rms_norm(x, t.norm, t.config.rms_eps, torch.float32)
    ref = project(xn, head).float()
    V = ref.shape[-1]
    for parts in (7, 3):
        bounds = [V * k // parts for k in range(parts + 1)]
        outs = [project(xn, head.rows(list(range(a, b)))).float()
                for a, b in zip(bounds, bounds[1:], strict=False)]
        cat = torch.cat(outs, -1)
        print(path or "default", type(head).__name__, parts, "bitwise equal:",
              torch.equal(cat, ref), "max diff", (cat - ref).abs().max().item())
