"""The compiled one-row operators of a decode step (`_kernels.c`: RMSNorm; RoPE, the KV
cache write and the attention of one query; a SwiGLU MLP's activations), or None where they
are not built (setup.py builds them where a C compiler is; the torch code they mirror runs
instead) or HALO_PURE_PYTHON is set.

Why: a decode step's operators work on one row of a few thousand values, where PyTorch's
per-operator dispatch costs more than the arithmetic -- and several times more on a device
woken for every synchronisation round than in a warm loop (docs/results/c-path.md)."""

from __future__ import annotations

import os


def _load() -> object | None:
    if os.environ.get("HALO_PURE_PYTHON"):
        return None
    try:
        from halollm.model import _kernels  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _kernels


KERNELS = _load()
