"""`fastlayers check bias_gelu`: bias_gelu and bias_gelu_linear (checkpoint off/on), both GELU approximations,
forward and backward of each backend against the float64 reference on the same inputs."""

from __future__ import annotations

import torch

from fastlayers.checks import Check
from fastlayers.functional.bias_gelu import bias_gelu, bias_gelu_linear
from fastlayers.reference.activations import bias_gelu_linear_ref, bias_gelu_ref
from fastlayers.utils import dtype_name

# (atol, rtol) per dtype, the backward tolerances of tests/tolerances.py (outputs and grads share one check)
TOLS = {torch.float32: (9e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}
ROWS, N, M = 64, 256, 64  # small enough for the Triton interpreter


def _inputs(device: torch.device, dtype: torch.dtype, linear: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {"x": torch.randn(ROWS, N, generator=g) * 3, "bias": torch.randn(N, generator=g)}
    if linear:
        t["weight"] = torch.randn(M, N, generator=g) / N**0.5
        t["out_bias"] = torch.randn(M, generator=g)
    t["dout"] = torch.randn(ROWS, M if linear else N, generator=g)
    return {k: v.to(device=device, dtype=dtype) for k, v in t.items()}


def _run(fn, t: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """fn(**leaves) forward and backward; returns the output and the grads of every input."""
    leaves = {k: (v if dtype is None else v.to(dtype)).detach().requires_grad_() for k, v in t.items() if k != "dout"}
    out = fn(**leaves)
    dout = t["dout"] if dtype is None else t["dout"].to(dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    return {"out": out.detach(), **{f"d{k}": g for k, g in zip(leaves, grads, strict=True)}}


def _act_check(device, dtype, approximate) -> Check:
    t = _inputs(device, dtype, linear=False)

    def run(backend):
        return _run(lambda x, bias: bias_gelu(x, bias, approximate=approximate, backend=backend), t)

    def reference():
        return _run(lambda x, bias: bias_gelu_ref(x, bias, approximate=approximate), t, torch.float64)

    atol, rtol = TOLS[dtype]
    return Check(f"bias_gelu {approximate} {dtype_name(dtype)}", run, reference, dtype, atol, rtol)


def _linear_check(device, dtype, approximate, checkpoint) -> Check:
    t = _inputs(device, dtype, linear=True)

    def run(backend):
        def fn(x, bias, weight, out_bias):
            return bias_gelu_linear(
                x, bias, weight, out_bias, approximate=approximate, checkpoint=checkpoint, backend=backend
            )

        return _run(fn, t)

    def reference():
        def fn(x, bias, weight, out_bias):
            return bias_gelu_linear_ref(x, bias, weight, out_bias, approximate=approximate)

        return _run(fn, t, torch.float64)

    atol, rtol = TOLS[dtype]
    name = f"bias_gelu_linear {approximate} {'ckpt' if checkpoint else 'save'} {dtype_name(dtype)}"
    return Check(name, run, reference, dtype, atol, rtol)


def checks(device: torch.device) -> list[Check]:
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    out = []
    for dtype in dtypes:
        for approximate in ("none", "tanh"):
            out.append(_act_check(device, dtype, approximate))
            out.extend(_linear_check(device, dtype, approximate, c) for c in (False, True))
    return out
