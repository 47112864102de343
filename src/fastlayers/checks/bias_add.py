"""`fastlayers check bias_add`: nhwc_bias_add (inference op, forward only) with its three variants on a
channels_last NCHW activation and a (B, S, C) one, each backend against the float64 reference."""

from __future__ import annotations

import torch

from fastlayers.checks import BWD_TOLS, Check
from fastlayers.functional.bias_add import nhwc_bias_add
from fastlayers.reference.bias_add import nhwc_bias_add_ref
from fastlayers.utils import dtype_name

N, C, HW = 2, 40, 5  # C not a power of two


def _inputs(device, dtype, four_d: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (N, C, HW, HW) if four_d else (N, HW * HW, C)
    t = {
        "act": torch.randn(shape, generator=g),
        "bias": torch.randn(C, generator=g),
        "other": torch.randn(shape, generator=g),
        "other_bias": torch.randn(C, generator=g),
    }
    t = {k: v.to(device=device, dtype=dtype) for k, v in t.items()}
    if four_d:
        for k in ("act", "other"):
            t[k] = t[k].contiguous(memory_format=torch.channels_last)
    return t


def _check(device, dtype, four_d: bool, variant: str) -> Check:
    t = _inputs(device, dtype, four_d)
    names = {"bias": ("act", "bias"), "other": ("act", "bias", "other"), "other_bias": tuple(t)}[variant]

    def run(backend):
        return {"out": nhwc_bias_add(*(t[n] for n in names), backend=backend)}

    def reference():
        return {"out": nhwc_bias_add_ref(*(t[n].double() for n in names))}

    atol, rtol = BWD_TOLS[dtype]
    layout = "NCHW channels_last" if four_d else "(B, S, C)"
    return Check(f"nhwc_bias_add {variant} {layout} {dtype_name(dtype)}", run, reference, dtype, atol, rtol)


def checks(device: torch.device) -> list[Check]:
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    return [
        _check(device, dtype, four_d, variant)
        for dtype in dtypes
        for four_d in (True, False)
        for variant in ("bias", "other", "other_bias")
    ]
