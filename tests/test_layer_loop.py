"""The one layer loop (`Transformer.hidden`): its reduction of each layer half is plugged in."""

from __future__ import annotations

import torch

from halollm.groups import Partition
from halollm.model.gguf_file import GGUFModelFile
from halollm.model.llama import (
    AttentionShard,
    Half,
    Layer,
    MlpShard,
    Transformer,
    local_reduce,
    sum_partials,
)
from tests.conftest import TEXT_200


def test_reducer_sees_every_layer_half_once_in_order(model_fp32):
    t = model_fp32.transformer
    ids = model_fp32.tokenizer.encode(TEXT_200)[:12]
    seen: list[tuple[int, Half, int, int]] = []

    def observe(i: int, half: Half, layer: Layer, x: torch.Tensor, start: int) -> torch.Tensor:
        assert layer is t.layers[i] and x.dtype == t.dtype
        seen.append((i, half, x.shape[0], start))
        return local_reduce(i, half, layer, x, start)

    a = t.forward(ids[:8], 0)
    b = t.forward(ids[:8], 0, reduce=observe)
    assert torch.equal(a, b)
    expect = [(i, half, 8, 0) for i in range(t.config.n_layers) for half in ("attn", "mlp")]
    assert seen == expect
    seen.clear()
    t.forward(ids[8:9], 8, reduce=observe)
    assert seen == [(i, half, 1, 8) for i, half, _, _ in expect]


def test_group_reducer_over_a_weightless_model_equals_the_default(model_fp32, model_path):
    """A model holding only norms, whose layer halves are the float32 sum of per-group
    partials computed elsewhere (as the runtime and the streamed loader do), equals the split
    model's own loop bit for bit, prompt and decode steps alike."""
    cfg = model_fp32.config
    part = Partition.contiguous(cfg, 3, 5)
    src = GGUFModelFile(model_path)
    split = Transformer(cfg, src.tensor, torch.float32, attn_sets=[lg.attn for lg in part.layers],
                        mlp_sets=[lg.mlp for lg in part.layers])
    bare = Transformer(cfg, src.tensor, torch.float32, layers=[])
    assert all(not lay.attn and not lay.mlp for lay in bare.layers)
    # the groups, held apart from the model: attention weightless, its weights given per use
    attn = [[(AttentionShard.without_weights(cfg, s.kv_heads, bare.rope),
              (s.w_qkv, s.b_qkv, s.w_o)) for s in lay.attn] for lay in split.layers]
    mlp: list[list[MlpShard]] = [lay.mlp for lay in split.layers]

    def groups(i: int, half: Half, _layer: Layer, x: torch.Tensor, start: int) -> torch.Tensor:
        if half == "attn":
            return sum_partials([s.with_weights(w).forward(x, start) for s, w in attn[i]])
        return sum_partials([s.forward(x, start) for s in mlp[i]])

    ids = model_fp32.tokenizer.encode(TEXT_200)[:24]
    for chunk, start in ((ids[:20], 0), (ids[20:21], 20), (ids[21:24], 21)):
        assert torch.equal(bare.forward(chunk, start, reduce=groups), split.forward(chunk, start))
