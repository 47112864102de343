"""`fastlayers check softmax`: each masked_softmax backend vs masked_softmax_ref, forward and backward."""

from __future__ import annotations

import torch

from fastlayers.checks import Check
from fastlayers.functional.softmax import masked_softmax
from fastlayers.reference.softmax import masked_softmax_ref


def _check(
    name: str, shape: tuple[int, int, int, int], mask_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> Check:
    g = torch.Generator(device="cpu").manual_seed(0)
    scores = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype)
    mask = torch.zeros(mask_shape)
    mask[..., -3:] = -10000.0
    mask[0, ..., -1] = float("-inf")
    mask = mask.to(device=device, dtype=dtype)
    dout = torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    def grads(fn) -> dict[str, torch.Tensor]:
        x = scores.detach().clone().requires_grad_()
        out = fn(x)
        (dx,) = torch.autograd.grad(out, x, dout)
        return {"out": out.detach(), "dscores": dx}

    def run(backend: str) -> dict[str, torch.Tensor]:
        return grads(lambda x: masked_softmax(x, mask, scale=0.125, backend=backend))

    def reference() -> dict[str, torch.Tensor]:
        res = grads(lambda x: masked_softmax_ref(x, mask, scale=0.125, upcast=True))
        return res

    low = dtype in (torch.float16, torch.bfloat16)
    return Check(
        name=name, run=run, reference=reference, dtype=dtype, atol=1e-2 if low else 1e-5, rtol=1e-2 if low else 1e-4
    )


def checks(device: torch.device) -> list[Check]:
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device.type == "cuda" else [])
    out = []
    for dt in dtypes:
        out.append(_check(f"bert key-padding B2 H3 S37 {dt}", (2, 3, 37, 37), (2, 1, 1, 37), dt, device))
        out.append(_check(f"full mask B1 H2 S9x119 {dt}", (1, 2, 9, 119), (1, 2, 9, 119), dt, device))
    return out
