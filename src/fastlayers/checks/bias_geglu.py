"""`fastlayers check bias_geglu`: bias_geglu with both gate activations (gelu, silu), forward and backward of
each backend against the float64 reference on the same inputs."""

from __future__ import annotations

import torch

from fastlayers.checks import Check
from fastlayers.functional.bias_geglu import bias_geglu
from fastlayers.reference.geglu import bias_geglu_ref
from fastlayers.utils import dtype_name

# (atol, rtol) per dtype, the backward tolerances of tests/tolerances.py (outputs and grads share one check)
TOLS = {torch.float32: (9e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}
ROWS, C = 64, 160  # x (64, 320): small enough for the Triton interpreter, C not a power of two


def _inputs(device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {
        "x": torch.randn(ROWS, 2 * C, generator=g) * 2,
        "bias": torch.randn(2 * C, generator=g),
        "dout": torch.randn(ROWS, C, generator=g),
    }
    return {k: v.to(device=device, dtype=dtype) for k, v in t.items()}


def _run(fn, t: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """fn(**leaves) forward and backward; returns the output and the grads of every input."""
    leaves = {k: (v if dtype is None else v.to(dtype)).detach().requires_grad_() for k, v in t.items() if k != "dout"}
    out = fn(**leaves)
    dout = t["dout"] if dtype is None else t["dout"].to(dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    return {"out": out.detach(), **{f"d{k}": g for k, g in zip(leaves, grads, strict=True)}}


def _check(device, dtype, activation) -> Check:
    t = _inputs(device, dtype)

    def run(backend):
        return _run(lambda x, bias: bias_geglu(x, bias, activation=activation, backend=backend), t)

    def reference():
        return _run(lambda x, bias: bias_geglu_ref(x, bias, activation=activation), t, torch.float64)

    atol, rtol = TOLS[dtype]
    return Check(f"bias_geglu {activation} {dtype_name(dtype)}", run, reference, dtype, atol, rtol)


def checks(device: torch.device) -> list[Check]:
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    return [_check(device, dtype, activation) for dtype in dtypes for activation in ("gelu", "silu")]
