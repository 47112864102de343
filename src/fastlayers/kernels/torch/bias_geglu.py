"""Fast plain-PyTorch bias + GEGLU forward and backward (no autograd; the Functions live in functional/).

Compared with eager `h, g = (x + b).chunk(2, -1); h * F.gelu(g)` (which keeps x + b and gelu(g) for backward)
these helpers keep only `x` between the passes. Forward: `y = x + b` (one fresh 2C buffer), the gate
activation in place on its second half, one multiply into the (..., C) output. Backward: `y = x + b` again,
then the gate gradient and the value gradient are written over the gate and value halves of `y`, which
becomes dx. Half inputs are computed in fp32 (the bias is added in fp32 too) and cast back once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlayers.kernels.torch.bias_gelu import column_sums, compute_dtype, preact, to_dtype

ACTIVATIONS = ("gelu", "silu")


def _act(g: torch.Tensor, activation: str) -> torch.Tensor:
    """act(g) as a new tensor."""
    if activation == "gelu":
        return torch.ops.aten.gelu(g)
    if activation == "silu":
        return F.silu(g)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _act_(g: torch.Tensor, activation: str) -> torch.Tensor:
    """act(g) in place."""
    if activation == "gelu":
        return torch.ops.aten.gelu_(g)
    if activation == "silu":
        return F.silu(g, inplace=True)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _act_backward_into(grad: torch.Tensor, g: torch.Tensor, activation: str) -> torch.Tensor:
    """grad · act'(g), written into g (elementwise: exact aliasing of input and output is fine)."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward.grad_input(grad, g, approximate="none", grad_input=g)
    if activation == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, g, grad_input=g)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def bias_geglu_fwd(x: torch.Tensor, bias: torch.Tensor | None, activation: str = "gelu") -> torch.Tensor:
    """out = h · act(gate), (h, gate) = halves of x + bias: x (..., 2C) -> (..., C) in x.dtype (fp32 maths for half)."""
    cdt = compute_dtype(x)
    if bias is None and x.dtype == cdt:
        h, g = x.chunk(2, dim=-1)
        return _act(g, activation).mul_(h)  # one (..., C) allocation, x untouched
    y = preact(x, bias, cdt)  # (..., 2C)
    h, g = y.chunk(2, dim=-1)  # views: value, gate
    _act_(g, activation)
    out = torch.empty(h.shape, dtype=x.dtype, device=x.device)
    return torch.mul(h, g, out=out)  # fp32 product rounded once into a half output


def bias_geglu_bwd(
    dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, activation: str = "gelu", need_dbias: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dh = dy · act(gate), dgate = dy · h · act'(gate), dx = [dh, dgate]; dbias = Σ_rows dx (fp32 accumulation).

    Returns (dx with the shape and dtype of x, dbias of shape (2C,) and dtype of bias, or None).
    """
    cdt = compute_dtype(x)
    y = preact(x, bias, cdt)  # (..., 2C), becomes dx
    h, g = y.chunk(2, dim=-1)
    g_dy = to_dtype(dy, cdt)
    a = _act(g, activation)  # act(gate), (..., C)
    dyh = torch.mul(g_dy, h)  # dy · h, (..., C)
    _act_backward_into(dyh, g, activation)  # gate half of y <- dy · h · act'(gate)
    torch.mul(g_dy, a, out=h)  # value half of y <- dy · act(gate) (h is no longer needed)
    dbias = column_sums(y, bias.dtype) if bias is not None and need_dbias else None
    return to_dtype(y, x.dtype), dbias
