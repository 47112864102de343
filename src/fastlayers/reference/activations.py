"""Reference (readable, any dtype) fused bias + GELU and the GELU-then-linear of a transformer FFN.

GELU: Hendrycks & Gimpel, https://arxiv.org/abs/1606.08415. DeepSpeed's training layer uses the tanh
approximation with the bias add fused in, computed in fp32 for half inputs, and optionally recomputes the
activation in backward instead of storing it ("gelu_checkpoint").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

APPROXIMATIONS = ("none", "tanh")
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # 0.7978845608...
TANH_CUBIC = 0.044715


def gelu_ref(u: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU, written out.

    approximate="none":  0.5·u·(1 + erf(u/√2))
    approximate="tanh":  0.5·u·(1 + tanh(√(2/π)·(u + 0.044715·u³)))
    """
    if approximate == "none":
        return 0.5 * u * (1.0 + torch.erf(u * (1.0 / math.sqrt(2.0))))
    if approximate == "tanh":
        return 0.5 * u * (1.0 + torch.tanh(SQRT_2_OVER_PI * (u + TANH_CUBIC * u * u * u)))
    raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def bias_gelu_ref(
    x: torch.Tensor, bias: torch.Tensor | None, *, approximate: str = "none", upcast: bool = False
) -> torch.Tensor:
    """gelu(x + bias), bias broadcast over the last dim.

    Args:
        x: (..., N), any float dtype.
        bias: (N,) same dtype as x, or None.
        approximate: "none" (exact erf GELU) or "tanh".
        upcast: compute in fp32 and cast the result back to x.dtype (what the fast backends do for half).

    Returns:
        (..., N), dtype of x.
    """
    dtype = x.dtype
    u = x.float() if upcast else x
    if bias is not None:
        u = u + (bias.float() if upcast else bias)  # (..., N) + (N,)
    return gelu_ref(u, approximate).to(dtype)


def bias_gelu_linear_ref(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    weight: torch.Tensor,
    out_bias: torch.Tensor | None = None,
    *,
    approximate: str = "none",
    checkpoint: bool = False,
    upcast: bool = False,
) -> torch.Tensor:
    """gelu(x + bias) @ weight.T + out_bias: a transformer FFN's activation feeding its second linear.

    Args:
        x: (..., N) pre-activation (the first linear's output without its bias), any float dtype.
        bias: (N,) or None, same dtype as x.
        weight: (M, N), same dtype as x.
        out_bias: (M,) or None, same dtype as x.
        approximate: "none" or "tanh".
        checkpoint: keep only the inputs for backward and recompute gelu(x + bias) there
            (`torch.utils.checkpoint`); results are identical either way.
        upcast: the GELU in fp32 (cast back to x.dtype before the matmul).

    Returns:
        (..., M), dtype of x.
    """

    def act_linear(x: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        h = bias_gelu_ref(x, bias, approximate=approximate, upcast=upcast)  # (..., N)
        return F.linear(h, weight)  # (..., M)

    if checkpoint and torch.is_grad_enabled():
        out = _checkpoint(act_linear, x, bias, weight, use_reentrant=False)
    else:
        out = act_linear(x, bias, weight)
    return out if out_bias is None else out + out_bias
