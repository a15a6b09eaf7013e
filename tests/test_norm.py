"""RMSNorm in C (model/_norm.c) against the torch formula it mirrors (norm.rms_norm_reference)."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from halollm.model import norm
from halollm.model.norm import rms_norm, rms_norm_reference


def test_the_c_norm_is_built_where_a_compiler_is() -> None:
    if shutil.which("cc") or shutil.which("gcc"):
        assert importlib.util.find_spec("halollm.model._norm") is not None, \
            "model/_norm.c did not build (see setup.py)"


@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight", [torch.float32, torch.float16, torch.bfloat16])
def test_the_c_norm_is_the_formula_to_its_last_bit(out: torch.dtype, weight: torch.dtype
                                                   ) -> None:
    """float32 outputs within 2.5 eps of the exact value (torch's are within 2) and 4 ulp of
    torch's; bfloat16 outputs equal to torch's or one step apart (the only difference is the
    mean's summation), over scales from 1e-3 to 1e2, several widths and rows."""
    if norm._NORM is None:
        pytest.skip("model/_norm.c is not built here")
    gen = torch.Generator().manual_seed(int(out.itemsize) * 10 + weight.itemsize)
    for trial in range(300):
        dim = (64, 576, 1024, 2048, 5)[trial % 5]
        h = torch.randn(1 + trial % 3, dim, generator=gen) * 10.0 ** (trial % 6 - 3)
        w = (torch.randn(dim, generator=gen) * 0.5 + 1).to(weight)
        got, ref = rms_norm(h, w, 1e-5, out), rms_norm_reference(h, w, 1e-5, out)
        assert got.dtype == out and got.shape == ref.shape
        if out == torch.float32:  # a few roundings from the exact value, as torch is
            eps = torch.finfo(torch.float32).eps
            hd = h.double()
            exact = w.double() * hd / (hd.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
            assert ((got.double() - exact).abs() <= 2.5 * eps * exact.abs()).all(), trial
            assert ((got - ref).abs() <= 4 * eps * ref.abs()).all(), trial
        else:  # neighbouring bfloat16 values are one apart as integers (same sign)
            steps = (got.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
            assert int(steps.max()) <= 1, trial
            assert (got == ref).float().mean() > 0.5, trial  # mostly bit-identical


def test_what_the_c_norm_does_not_take_is_the_formula_itself() -> None:
    """float16 outputs, views that are not contiguous, and empty rows go to torch's formula."""
    h = torch.randn(4, 64)
    w = torch.rand(64) + 0.5
    assert torch.equal(rms_norm(h, w, 1e-6, torch.float16), rms_norm_reference(h, w, 1e-6,
                                                                               torch.float16))
    view = torch.randn(64, 4).t()
    assert torch.equal(rms_norm(view, w, 1e-6, torch.float32),
                       rms_norm_reference(view, w, 1e-6, torch.float32))
    assert rms_norm(torch.empty(0, 64), w, 1e-6, torch.bfloat16).shape == (0, 64)
