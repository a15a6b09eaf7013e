"""RMSNorm of the float32 residual stream (Hugging Face LLaMA's formula), in C where built."""

from __future__ import annotations

import torch

from halollm.model.kernels import KERNELS

_WEIGHT_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # as _kernels.c names them
_OUT_KINDS = {torch.float32: 0, torch.bfloat16: 2}


def rms_norm_reference(h: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype
                       ) -> torch.Tensor:
    """RMSNorm of the float32 residual stream in the compute dtype: the HF formula in torch."""
    return (weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))).to(dtype)


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype
             ) -> torch.Tensor:
    """RMSNorm of the float32 residual stream, returned in the compute dtype: the formula of
    rms_norm_reference, in one C call (`_kernels.c`) where it is built and the output is float32
    or bfloat16 -- torch's seven operators cost ~100 us a row on a coordinator woken for every
    round, this a few. Its mean of squares is summed in double (torch's in float32), so the
    two differ in the last bit of a value now and then; every path of a run uses this one."""
    if KERNELS is None or h.dtype != torch.float32 or dtype not in _OUT_KINDS or \
            weight.dtype not in _WEIGHT_KINDS or not (h.is_contiguous() and
                                                      weight.is_contiguous()):
        return rms_norm_reference(h, weight, eps, dtype)
    dim = h.shape[-1]
    if weight.numel() != dim or h.numel() == 0:
        return rms_norm_reference(h, weight, eps, dtype)
    out = torch.empty(h.shape, dtype=dtype)
    KERNELS.rms_norm(out.data_ptr(), _OUT_KINDS[dtype], h.data_ptr(), weight.data_ptr(),
                   _WEIGHT_KINDS[weight.dtype], h.numel() // dim, dim, eps)
    return out
