"""The neuron-group vocabulary."""

from __future__ import annotations

import pytest

from halollm.errors import HaloError
from halollm.groups import GroupId, LayerGroups, Partition
from halollm.model.config import ModelConfig

CFG = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=10, n_layers=2, n_heads=4,
                  n_kv_heads=2, head_dim=2)


def test_contiguous_partition_covers_every_unit():
    p = Partition.contiguous(CFG, attn_groups=2, mlp_groups=3)
    p.validate(CFG)
    assert p.layers[0].attn == ((0,), (1,))
    assert p.layers[0].mlp == ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9))
    assert len(list(p.groups())) == 2 * (2 + 3)
    assert p.units(GroupId(1, "mlp", 2)) == (7, 8, 9)


def test_json_roundtrip_and_group_names():
    p = Partition.contiguous(CFG, 1, 4)
    assert Partition.from_json(p.to_json()) == p
    gid = GroupId(3, "mlp", 5)
    assert str(gid) == "3.mlp.5" and GroupId.parse("3.mlp.5") == gid


def test_invalid_partitions_are_refused():
    with pytest.raises(HaloError, match="between 1 and the number of KV heads"):
        Partition.contiguous(CFG, attn_groups=3)
    bad = Partition(layers=(LayerGroups(attn=((0, 1),), mlp=((0, 1, 2), (2, 3, 4, 5, 6, 7, 8, 9))),
                            ) * 2)
    with pytest.raises(HaloError, match="do not cover"):
        bad.validate(CFG)
    with pytest.raises(HaloError, match="layers"):
        Partition(layers=bad.layers[:1]).validate(CFG)
