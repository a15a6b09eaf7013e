"""The default model on packed weights (a measurement for docs/quant.md): agreement with the
fp32 engine, decode speed and resident weight bytes. `pack_transformer` is also the
reference for wiring packed weights into llama.py (same tensors, same calls)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from halollm.model import quant as Q
from halollm.model import quant_gguf as G
from halollm.model.quant_bench import packed_projections

TEXT = (
    "The old bridge across the river had stood for two hundred years. Carts and horses had "
    "crossed it, then motor cars, then lorries far heavier than its builders had ever imagined. "
    "In the spring of the flood year the water rose higher than anyone could remember, carrying "
    "trees, fences and a farmer's shed against the piers. Engineers came from the city with "
    "instruments and notebooks. They measured the cracks, tapped the stones and argued late into "
    "the night in the inn by the square. Some wanted to tear the bridge down and build a new one "
    "of steel and concrete; others said the old stones would outlast them all if only the "
    "foundations were strengthened. In the end the town voted, by a margin of eleven votes, to "
    "repair it. The work took three summers. When it was finished the mayor walked across first, "
    "followed by the schoolchildren, the engineers, and a very old woman who said she had crossed "
    "it on her wedding day, seventy years before, and intended to cross it again on her hundredth "
    "birthday.")


def _packed_logits(t: Any, h: torch.Tensor) -> torch.Tensor:
    """Transformer.logits with a packed head: the top REFINE_TOP recomputed in float32 from the
    head's own dequantized rows (what the float engine does with its fp16 rows)."""
    from halollm.model.llama import REFINE_TOP, rms_norm

    x = rms_norm(h, t.norm, t.config.rms_eps, torch.float32)
    logits = Q.linear(x, t.lm_head).float()
    top = logits.topk(REFINE_TOP, dim=-1).indices
    rows = t.lm_head.dequantize(top.reshape(-1)).reshape(*top.shape, -1)
    return logits.scatter(-1, top, torch.bmm(rows, x.unsqueeze(-1)).squeeze(-1))


def pack_transformer(t: Any, source: Any, head_layout: str | None = "int4x2") -> dict:
    """Replace a built Transformer's projection weights by packed ones from the GGUF (head
    too unless head_layout is None); return resident and GGUF bytes of what was packed."""
    packed, gguf_bytes = 0, 0
    for i, layer in enumerate(t.layers):
        p = f"layers.{i}."
        attn, mlp = layer.attn[0], layer.mlp[0]
        attn.w_qkv = Q.concat_rows([G.pack_rows(source, p + n)[0] for n in ("wq", "wk", "wv")])
        attn.w_o = G.pack_rows(source, p + "wo")[0]
        mlp.w_gate_up = Q.concat_rows([G.pack_rows(source, p + n)[0]
                                       for n in ("w_gate", "w_up")])
        mlp.w_down = G.pack_rows(source, p + "w_down")[0]
        packed += sum(w.nbytes for w in (attn.w_qkv, attn.w_o, mlp.w_gate_up, mlp.w_down))
        gguf_bytes += sum(G.gguf_nbytes(source, p + n) for n in
                          ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
    if head_layout is not None:
        name = "embed" if t.config.tie_embeddings else "lm_head"
        t.lm_head = G.pack_rows(source, name, layout=head_layout)[0]
        table = t.lm_head if t.config.tie_embeddings else G.QuantEmbedding.from_source(source)
        t.embed_table = None
        t.embed = lambda ids: G.embed_rows(table, ids)
        t.logits = lambda h: _packed_logits(t, h)
        packed += t.lm_head.nbytes
        gguf_bytes += G.gguf_nbytes(source, name)
    return {"packed_bytes": packed, "gguf_bytes": gguf_bytes}


def _decode_ms(t: Any, ids: torch.Tensor, steps: int = 24) -> float:
    t.forward(ids[:8])
    times = []
    for i in range(steps):
        t0 = time.thread_time()  # CPU time of this (only compute) thread: the machine is shared
        t.forward(ids[8 + i: 9 + i], start=8 + i)
        times.append((time.thread_time() - t0) * 1e3)
    return statistics.median(times)


def _compare(ref: torch.Tensor, logits: torch.Tensor) -> dict:
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(logits, -1)
    return {"top1": float((ref.argmax(-1) == logits.argmax(-1)).float().mean()),
            "kl": float((lp.exp() * (lp - lq)).sum(-1).mean()),
            "max_dlogit": float((ref - logits).abs().max())}


def model(heads: tuple[str | None, ...] = (None, "int4x2", "int8")) -> list[dict]:
    """fp16 engine vs packed layers (+ each head layout): teacher-forced top-1 agreement and KL
    against fp32 on TEXT (one prefill pass), decode ms/token (1 thread), weight bytes."""
    from halollm.model.loader import load_model, open_source

    torch.set_num_threads(1)
    ref = load_model(None, "fp32")
    ids = torch.tensor(ref.tokenizer.encode(TEXT))
    with torch.inference_mode():
        ref_logits = ref.transformer.forward(ids)
    del ref
    rows, source = [], open_source(None)
    with packed_projections(), torch.inference_mode():
        for variant in ("fp16", *heads):
            m = load_model(None, "fp16")
            row: dict = {"variant": "fp16 engine" if variant == "fp16" else
                         f"packed, head {variant or 'fp16'}"}
            if variant != "fp16":
                row.update(pack_transformer(m.transformer, source, variant))
            row.update(_compare(ref_logits, m.transformer.forward(ids)))
            row["decode_ms"] = _decode_ms(m.transformer, ids)
            rows.append(row)
            print(row, flush=True)
            del m
    source.close()
    return rows
