"""`fastlayers check random_ltd`: token_gather (forward and backward), token_scatter_, and a Random-LTD layer
(GatherTokens -> layer -> ScatterTokens, forward and backward) for each backend against float64 references
(advanced indexing and index_put with autograd) on the same inputs and indices, in both layouts."""

from __future__ import annotations

import torch

from fastlayers.checks import Check
from fastlayers.functional.random_ltd import (
    GatherTokens,
    ScatterTokens,
    gpt_sample_tokens,
    token_gather,
    token_scatter_,
)
from fastlayers.reference.tokens import token_gather_ref, token_scatter_ref_
from fastlayers.utils import dtype_name

# (atol, rtol) per dtype, the backward tolerances of tests/tolerances.py (gather and scatter themselves are exact)
TOLS = {torch.float32: (9e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}
B, S, R, C = 4, 64, 24, 96  # small enough for the Triton interpreter; C not a power of two


def _inputs(device: torch.device, dtype: torch.dtype, batch_first: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {
        "x": torch.randn((B, S, C) if batch_first else (S, B, C), generator=g),
        "part": torch.randn((B, R, C) if batch_first else (R, B, C), generator=g),
        "w": torch.randn(C, C, generator=g) / C**0.5,
    }
    t["dout"] = torch.randn(t["x"].shape, generator=g)
    t["dpart"] = torch.randn(t["part"].shape, generator=g)
    out = {k: v.to(device=device, dtype=dtype) for k, v in t.items()}
    out["idx"] = gpt_sample_tokens(R, S, B, generator=g)[0][0].to(device)  # (B, R) int32, sorted
    return out


def _gather_scatter(t, batch_first, dtype, gather, scatter_) -> dict[str, torch.Tensor]:
    x = t["x"].to(dtype).detach().requires_grad_()
    out = gather(x, t["idx"], batch_first)
    (dx,) = torch.autograd.grad(out, x, t["dpart"].to(dtype))
    with torch.no_grad():
        scattered = scatter_(t["x"].to(dtype).clone(), t["part"].to(dtype), t["idx"], batch_first)
    return {"out": out.detach(), "dx": dx, "scattered": scattered}


def _ltd_layer(t, batch_first, dtype, backend) -> dict[str, torch.Tensor]:
    """x -> kept tokens -> tanh(part @ w) -> written back; reference: index_put with autograd."""
    x = t["x"].to(dtype).detach().requires_grad_()
    w = t["w"].to(dtype)
    idx = t["idx"]
    if backend is None:
        out = token_scatter_ref_(x.clone(), torch.tanh(token_gather_ref(x, idx, batch_first) @ w), idx, batch_first)
    else:
        passthrough, part = GatherTokens.apply(x, idx, batch_first, backend)
        out = ScatterTokens.apply(passthrough, torch.tanh(part @ w), idx, batch_first, backend)
    (dx,) = torch.autograd.grad(out, x, t["dout"].to(dtype))
    return {"ltd_out": out.detach(), "ltd_dx": dx}


def _check(device: torch.device, dtype: torch.dtype, batch_first: bool) -> Check:
    t = _inputs(device, dtype, batch_first)

    def run(backend):
        def gather(x, idx, bf):
            return token_gather(x, idx, bf, backend=backend)

        def scatter_(a, p, idx, bf):
            return token_scatter_(a, p, idx, bf, backend=backend)

        return {
            **_gather_scatter(t, batch_first, dtype, gather, scatter_),
            **_ltd_layer(t, batch_first, dtype, backend),
        }

    def reference():
        f64 = torch.float64
        return {
            **_gather_scatter(t, batch_first, f64, token_gather_ref, token_scatter_ref_),
            **_ltd_layer(t, batch_first, f64, None),
        }

    atol, rtol = TOLS[dtype]
    layout = "BSC" if batch_first else "SBC"
    return Check(f"random_ltd {layout} {dtype_name(dtype)}", run, reference, dtype, atol, rtol)


def checks(device: torch.device) -> list[Check]:
    dtypes = [torch.float32, torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    return [_check(device, dtype, batch_first) for dtype in dtypes for batch_first in (True, False)]
