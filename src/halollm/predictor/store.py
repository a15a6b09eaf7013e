"""Saving, finding and checking predictors.

A predictor file is safetensors: per half (attn, mlp) the stacked network weights and the
calibrated mean significance of every group ("static"), plus metadata saying what it was made
for (model hash, partition) and from what (texts, token count, quality report). A predictor
made for another model or partition is refused: its group indices would mean other neurons.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from halollm.errors import HaloError
from halollm.groups import KINDS, GroupId, Kind, Partition
from halollm.paths import cache_dir
from halollm.predictor.net import HalfPredictor

FORMAT = "halo-predictor/1"
SUFFIX = ".halo-predictor.safetensors"


@dataclass
class Predictor:
    nets: dict[Kind, HalfPredictor]
    static: dict[Kind, torch.Tensor]  # [n_layers, groups]: calibrated mean significance
    partition: Partition
    model_hash: str
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None  # where it was loaded from

    def static_ranking(self) -> dict[GroupId, float]:
        return {GroupId(i, kind, j): float(v)
                for kind in KINDS for i, row in enumerate(self.static[kind])
                for j, v in enumerate(row)}

    def check(self, model_hash: str, partition: Partition | None = None,
              where: str = "the predictor") -> None:
        if model_hash != self.model_hash:
            raise HaloError(f"{where} was made for another model (model hash "
                            f"{self.model_hash[:12]}…, this model is {model_hash[:12]}…); "
                            "run `halo calibrate` for this model")
        if partition is not None and partition != self.partition:
            raise HaloError(f"{where} was made for another group partition "
                            f"({describe(self.partition)}; asked for {describe(partition)}); "
                            "use its partition or calibrate again")


def describe(partition: Partition) -> str:
    lg = partition.layers[0]
    return f"{len(lg.attn)} attention + {len(lg.mlp)} MLP groups per layer"


def save(predictor: Predictor, path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for kind in KINDS:
        net = predictor.nets[kind]
        for name in ("w1", "b1", "w2", "b2"):
            tensors[f"{kind}.{name}"] = getattr(net, name).contiguous()
        tensors[f"{kind}.static"] = predictor.static[kind].float().contiguous()
    metadata = {"format": FORMAT, "model_hash": predictor.model_hash,
                "partition": predictor.partition.to_json(), "meta": json.dumps(predictor.meta)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HaloError(f"cannot write the predictor to {path}: {exc.strerror or exc}") from exc


def load(path: str | Path) -> Predictor:
    path = Path(path)
    if not path.is_file():
        raise HaloError(f"no predictor file at {path} (make one with `halo calibrate`)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise HaloError(f"{path} is not a readable predictor file ({exc})") from exc
    if metadata.get("format") != FORMAT:
        raise HaloError(f"{path} is not a HALO predictor ({metadata.get('format')!r})")
    try:
        nets = {kind: HalfPredictor(*(tensors[f"{kind}.{n}"] for n in ("w1", "b1", "w2", "b2")))
                for kind in KINDS}
        static = {kind: tensors[f"{kind}.static"] for kind in KINDS}
        partition = Partition.from_json(metadata["partition"])
        meta = json.loads(metadata.get("meta", "{}"))
    except (KeyError, ValueError, TypeError) as exc:
        raise HaloError(f"{path} is a damaged predictor file ({exc})") from exc
    for kind in KINDS:
        if nets[kind].groups != partition.count(0, kind) or \
                nets[kind].w1.shape[0] != len(partition.layers):
            raise HaloError(f"{path} is a damaged predictor file (shapes do not match its "
                            "partition)")
    return Predictor(nets, static, partition, metadata["model_hash"], meta, str(path))


def load_for(model_path: Path, model_hash: str, path: str | Path | None = None) -> Predictor:
    """The predictor at `path`, or the one `halo calibrate` saved for the model; checked to
    be made for this model."""
    found = Path(path) if path is not None else find(model_path, model_hash)
    if found is None:
        raise HaloError("no predictor for this model; make one with `halo calibrate --text "
                        "FILE` or give --predictor PATH")
    predictor = load(found)
    predictor.check(model_hash, where=str(found))
    return predictor


def default_path(model_path: Path) -> Path:
    """Next to the model: FILE.gguf -> FILE.gguf.halo-predictor.safetensors; a folder ->
    FOLDER/halo-predictor.safetensors."""
    if model_path.is_dir():
        return model_path / SUFFIX.lstrip(".")
    return model_path.with_name(model_path.name + SUFFIX)


def cache_path(model_hash: str) -> Path:
    return cache_dir() / "predictors" / f"{model_hash[:24]}{SUFFIX}"


def writable_path(model_path: Path, model_hash: str) -> Path:
    """Where `halo calibrate` saves by default: next to the model if that directory is
    writable, else the user cache."""
    target = default_path(model_path)
    return target if os.access(target.parent, os.W_OK) else cache_path(model_hash)


def find(model_path: Path, model_hash: str) -> Path | None:
    """The predictor `halo calibrate` saved for this model by default, if any."""
    for candidate in (default_path(model_path), cache_path(model_hash)):
        if candidate.is_file():
            return candidate
    return None
