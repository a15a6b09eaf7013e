"""A static significance ranking: the mean norm of each group's partial residual update.

Measured once per (model, partition) on a text and cached; the static plan keeps the most
significant groups on the coordinator. (The semantic-aware predictor replaces this with a
per-token prediction.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
import torch

from halollm.groups import GroupId, Partition
from halollm.model.config import ModelConfig
from halollm.model.llama import Half, Layer, Transformer, cached, sum_partials
from halollm.paths import cache_dir, write_json_quietly

# A fixed English text written for this project (not evaluation data), ~300 tokens.
RANKING_TEXT = (
    "The village stood where the river bent to the east, between two low hills covered with "
    "orchards. In summer the children swam below the mill and the old men played cards in the "
    "shade of the plane trees; in winter the road to the town was often closed by snow, and the "
    "baker's van came only twice a week. Nobody remembered exactly when the first families had "
    "settled there. The church register began in 1642, but the stones of the mill were older, "
    "and a farmer ploughing the upper field had once turned up a Roman coin. The schoolteacher, "
    "a patient woman with a passion for maps, made the pupils draw the village every spring: "
    "the square, the fountain, the three streets, the bridge and the path along the water to "
    "the ruined chapel. Comparing the drawings over the years, she noticed that the children "
    "always drew the bridge too large and the church too small, and that nobody ever forgot the "
    "bakery. When the new road was built in the valley, traffic left the village alone. Some "
    "houses were sold to families from the city, who repaired the roofs and planted lavender; "
    "others stayed empty, their shutters closed. Yet every August, for the feast of the patron "
    "saint, the square filled again with tables, music and lanterns, and those who had left "
    "came back for a night to dance and to argue, as they always had, about the weather, the "
    "harvest and the price of bread. Question: what did the children always draw too large? "
    "Answer: the bridge. def area(r): return 3.14159 * r ** 2  # 1, 2, 3, 42, 2026"
)


@torch.inference_mode()
def measure(config: ModelConfig, tensor: Callable[[str], np.ndarray], partition: Partition,
            ids: list[int], dtype: torch.dtype = torch.float32) -> dict[GroupId, float]:
    """Mean L2 norm, over the tokens of `ids`, of every group's partial residual update."""
    tensor = cached(tensor, size=16)
    model = Transformer(config, tensor, dtype, attn_sets=[lg.attn for lg in partition.layers])
    out: dict[GroupId, float] = {}

    def observe(i: int, half: Half, layer: Layer, x: torch.Tensor, start: int) -> torch.Tensor:
        if half == "attn":
            parts = [s.forward(x, start).float() for s in layer.attn]
        else:  # one pass for the activations, then each group's slice of the down projection
            (mlp,) = layer.mlp
            act, down = mlp.activations(x).float(), mlp.w_down.float()
            parts = [act[:, idx] @ down[:, idx].T
                     for idx in map(torch.tensor, partition.layers[i].mlp)]
        for j, p in enumerate(parts):
            out[GroupId(i, half, j)] = float(p.norm(dim=-1).mean())
        return sum_partials(parts)

    model.hidden(ids, 0, reduce=observe)
    return out


def cached_ranking(model_hash: str, config: ModelConfig, tensor: Callable[[str], np.ndarray],
                   partition: Partition, ids: list[int]) -> dict[GroupId, float]:
    """measure(), cached under ~/.cache/halo by model hash and partition."""
    key = hashlib.sha256((model_hash + partition.to_json() + str(ids)).encode()).hexdigest()
    path = cache_dir() / f"significance-{key[:24]}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            return {GroupId.parse(k): float(v) for k, v in data.items()}
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: measure again
    ranking = measure(config, tensor, partition, ids)
    # a read-only home or a full disk only costs a re-measurement next time
    write_json_quietly(path, {str(k): v for k, v in ranking.items()})
    return ranking
