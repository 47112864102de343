"""`fastlayers check bias_geglu`: bias_geglu with both gate activations (gelu, silu), forward and backward of
each backend against the float64 reference on the same inputs."""

from __future__ import annotations

import torch

from fastlayers.checks import Check, fwd_bwd_check
from fastlayers.functional.bias_geglu import bias_geglu
from fastlayers.reference.geglu import bias_geglu_ref
from fastlayers.utils import dtype_name

ROWS, C = 64, 160  # x (64, 320): small enough for the Triton interpreter, C not a power of two


def _inputs(device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {
        "x": torch.randn(ROWS, 2 * C, generator=g) * 2,
        "bias": torch.randn(2 * C, generator=g),
        "dout": torch.randn(ROWS, C, generator=g),
    }
    return {k: v.to(device=device, dtype=dtype) for k, v in t.items()}


def _check(device, dtype, activation) -> Check:
    return fwd_bwd_check(
        f"bias_geglu {activation} {dtype_name(dtype)}",
        lambda backend, x, bias: bias_geglu(x, bias, activation=activation, backend=backend),
        lambda x, bias: bias_geglu_ref(x, bias, activation=activation),
        _inputs(device, dtype),
        dtype,
    )


def checks(device: torch.device) -> list[Check]:
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    return [_check(device, dtype, activation) for dtype in dtypes for activation in ("gelu", "silu")]
