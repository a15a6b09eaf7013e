"""Shared fixtures: the default model (ours and the transformers reference) and texts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parents[1]
# The evaluation/calibration data shipped beside the project (../shared/data), or $HALO_DATA.
SHARED_DATA = Path(os.environ.get("HALO_DATA", ROOT.parent / "shared" / "data"))
if not SHARED_DATA.is_dir() and Path("/work/shared/data").is_dir():
    SHARED_DATA = Path("/work/shared/data")

# ~200 tokens of English (written for the tests), used wherever a "real text" is needed.
TEXT_200 = (
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
    "birthday."
)


@pytest.fixture(scope="session")
def model_path() -> Path:
    from halollm.model.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def model_fp32():
    from halollm.model.loader import load_model

    return load_model(None, "fp32")


@pytest.fixture(scope="session")
def reference(model_path):
    """transformers' own LLaMA, loading the same GGUF file (dequantized to fp32). A test
    dependency (installed by `scripts/setup.sh --test`): missing, the correctness tests
    fail rather than skip."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def reference_tokenizer(model_path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(model_path.parent),
                                                      gguf_file=model_path.name)


def run_halo(*args: str, input: str | None = None, timeout: float = 300,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `halo` command line in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "halollm.cli.main", *args], input=input,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def one_clear_line(proc) -> str:
    """A user mistake: exit 2 and one `halo: error:` line on stderr, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("halo: error: ")
    return lines[0]


CALIBRATION = SHARED_DATA / "calibration" / "alice_in_wonderland.pg11.body.txt"


@pytest.fixture(scope="session")
def calibration_text(tmp_path_factory) -> Path:
    """~3000 tokens of calibration text (the book if present, else a project text)."""
    path = tmp_path_factory.mktemp("calib") / "calibration.txt"
    text = CALIBRATION.read_text()[:12000] if CALIBRATION.is_file() else TEXT_200 * 12
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def predictor_file(calibration_text, tmp_path_factory) -> tuple[Path, dict]:
    """A small predictor for the default model, trained by the real `halo calibrate`."""
    out = tmp_path_factory.mktemp("pred") / "p.safetensors"
    r = run_halo("calibrate", "--text", str(calibration_text), "--out", str(out),
                 "--max-tokens", "2048", "--context", "128", "--holdout", "128",
                 "--epochs", "10", "--threads", "1", "--json", timeout=600)
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)
