"""Where HALO keeps what it measures once (significance rankings, predictors' defaults), and
writing small status files."""

from __future__ import annotations

import json
import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "halo"


def write_json_quietly(path: Path, obj: object) -> None:
    """Replace path with obj as JSON, atomically; a full or read-only disk is ignored (a
    status file must never stop the process that writes it)."""
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(obj))
        tmp.replace(path)
    except OSError:
        pass
