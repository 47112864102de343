"""`fastlayers check bias_gelu`: bias_gelu and bias_gelu_linear (checkpoint off/on), both GELU approximations,
forward and backward of each backend against the float64 reference on the same inputs."""

from __future__ import annotations

import torch

from fastlayers.checks import Check, fwd_bwd_check
from fastlayers.functional.bias_gelu import bias_gelu, bias_gelu_linear
from fastlayers.reference.activations import bias_gelu_linear_ref, bias_gelu_ref
from fastlayers.utils import dtype_name

ROWS, N, M = 64, 256, 64  # small enough for the Triton interpreter


def _inputs(device: torch.device, dtype: torch.dtype, linear: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {"x": torch.randn(ROWS, N, generator=g) * 3, "bias": torch.randn(N, generator=g)}
    if linear:
        t["weight"] = torch.randn(M, N, generator=g) / N**0.5
        t["out_bias"] = torch.randn(M, generator=g)
    t["dout"] = torch.randn(ROWS, M if linear else N, generator=g)
    return {k: v.to(device=device, dtype=dtype) for k, v in t.items()}


def _act_check(device, dtype, approximate) -> Check:
    return fwd_bwd_check(
        f"bias_gelu {approximate} {dtype_name(dtype)}",
        lambda backend, x, bias: bias_gelu(x, bias, approximate=approximate, backend=backend),
        lambda x, bias: bias_gelu_ref(x, bias, approximate=approximate),
        _inputs(device, dtype, linear=False),
        dtype,
    )


def _linear_check(device, dtype, approximate, checkpoint) -> Check:
    def fn(backend, x, bias, weight, out_bias):
        return bias_gelu_linear(
            x, bias, weight, out_bias, approximate=approximate, checkpoint=checkpoint, backend=backend
        )

    def reference(x, bias, weight, out_bias):
        return bias_gelu_linear_ref(x, bias, weight, out_bias, approximate=approximate)

    name = f"bias_gelu_linear {approximate} {'ckpt' if checkpoint else 'save'} {dtype_name(dtype)}"
    return fwd_bwd_check(name, fn, reference, _inputs(device, dtype, linear=True), dtype)


def checks(device: torch.device) -> list[Check]:
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    out = []
    for dtype in dtypes:
        for approximate in ("none", "tanh"):
            out.append(_act_check(device, dtype, approximate))
            out.extend(_linear_check(device, dtype, approximate, c) for c in (False, True))
    return out
