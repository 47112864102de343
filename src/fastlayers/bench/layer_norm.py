"""bias + dropout + residual add + LayerNorm, training fwd+bwd: fastlayers `bias_dropout_residual_layer_norm` vs
eager `F.layer_norm(residual + F.dropout(x + bias))`, BERT shapes (8×128 and 8×512 tokens × 768 / 1024).

Memory-bound: bytes moved per call ≈ fwd (read x, residual; write pre, y) + bwd (read dy, pre; write dx,
dresidual) ≈ 8·M·N elements; reported as saved-activation MiB instead of FLOPs. `*_saved_MiB` counts what
the op alone keeps for backward; `*_in_layer_MiB` adds the next Linear, which keeps y anyway: that is where
`invertible=True` (saves y and rstd, not pre) pays off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlayers.bench.harness import Case
from fastlayers.functional.layer_norm import bias_dropout_residual_layer_norm
from fastlayers.memory import saved_activation_bytes


def _case(m: int, n: int, p: float, device: torch.device, dtype: torch.dtype, invertible: bool = False) -> Case:
    g = torch.Generator().manual_seed(0)

    def mk(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g) * scale + shift
        return t.to(device=device, dtype=dtype).requires_grad_()

    x, bias, residual = mk(m, n), mk(n), mk(m, n)
    weight, ln_bias = mk(n, scale=0.1, shift=1.0), mk(n, scale=0.1)
    leaves = (x, bias, residual, weight, ln_bias)
    dy = torch.randn(m, n, generator=g).to(device=device, dtype=dtype)
    next_w = torch.nn.Parameter(torch.randn(64, n, generator=g).to(device=device, dtype=dtype))

    def ours_fwd(inv=invertible):
        return bias_dropout_residual_layer_norm(
            x, bias, residual, weight, ln_bias, eps=1e-12, dropout_p=p, invertible=inv
        )

    def peer_fwd():
        return F.layer_norm(residual + F.dropout(x + bias, p, training=True), (n,), weight, ln_bias, 1e-12)

    def step(fwd):
        return lambda: torch.autograd.grad(fwd(), leaves, dy)

    def mib(fn, in_layer=False):
        run = (lambda: fn() @ next_w.t()) if in_layer else fn
        return round(saved_activation_bytes(run, exclude=leaves) / 2**20, 3)

    ours_inv = lambda: ours_fwd(True)
    ours_std = lambda: ours_fwd(False)
    return Case(
        name=f"bias+dropout+res+LN fwd+bwd M{m} N{n} p{p}{' invertible' if invertible else ''}",
        ours=step(ours_fwd),
        peer=step(peer_fwd),
        peer_name="eager F.layer_norm(res + F.dropout(x + b))",
        extra={
            "ours_saved_MiB": mib(ours_std),
            "ours_inv_saved_MiB": mib(ours_inv),
            "peer_saved_MiB": mib(peer_fwd),
            "ours_in_layer_MiB": mib(ours_std, True),
            "ours_inv_in_layer_MiB": mib(ours_inv, True),
            "peer_in_layer_MiB": mib(peer_fwd, True),
        },
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if quick:
        return [_case(64, 128, 0.1, device, dtype)]
    out = [_case(8 * s, n, 0.1, device, dtype) for s in (128, 512) for n in (768, 1024)]
    out.append(_case(8 * 512, 1024, 0.1, device, dtype, invertible=True))
    return out
