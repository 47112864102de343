"""`fastlayers check attention`: each backend vs attention_ref, forward and backward, on the current device."""

from __future__ import annotations

import torch

from fastlayers.checks import Check
from fastlayers.functional.attention import attention
from fastlayers.reference.attention import attention_ref


def _check(
    name: str,
    b: int,
    h: int,
    s_q: int,
    s_k: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device,
    causal: bool,
    pad: bool,
) -> Check:
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(b, s_q, h, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(b, s_k, h, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(b, s_k, h, d, generator=g).to(device=device, dtype=dtype)
    dout = torch.randn(b, s_q, h, d, generator=g).to(device=device, dtype=dtype)
    bias = None
    if pad:
        bias = torch.zeros(b, 1, 1, s_k, device=device, dtype=dtype)
        bias[0, ..., s_k - s_k // 4 :] = float("-inf")  # padding in batch 0
        bias[-1, ..., :] = -10000.0 if b > 1 else 0.0

    def grads(fn) -> dict[str, torch.Tensor]:
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv)
        dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), dout)
        return {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}

    def run(backend: str) -> dict[str, torch.Tensor]:
        return grads(lambda q, k, v: attention(q, k, v, attn_bias=bias, causal=causal, backend=backend))

    def reference() -> dict[str, torch.Tensor]:
        res = grads(lambda q, k, v: attention_ref(q.float(), k.float(), v.float(), attn_bias=bias, causal=causal))
        return {key: t.to(dtype) for key, t in res.items()}

    low = dtype in (torch.float16, torch.bfloat16)
    return Check(
        name=name, run=run, reference=reference, dtype=dtype, atol=3e-2 if low else 2e-3, rtol=3e-2 if low else 2e-3
    )


def checks(device: torch.device) -> list[Check]:
    dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if device.type == "cuda" else [])
    out = []
    for dt in dtypes:
        out.append(_check(f"bert B2 H4 S37 D64 pad {dt}", 2, 4, 37, 37, 64, dt, device, False, True))
        out.append(_check(f"causal B1 H2 S21 D80 {dt}", 1, 2, 21, 21, 80, dt, device, True, False))
    return out
