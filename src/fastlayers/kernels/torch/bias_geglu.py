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

_HALF = (torch.float16, torch.bfloat16)
ACTIVATIONS = ("gelu", "silu")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _HALF else x.dtype


def _preact(x: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor:
    """A fresh tensor y = x + bias in `compute_dtype` (safe to overwrite)."""
    if bias is None:
        return x.to(compute_dtype, copy=True)
    if x.dtype == compute_dtype:
        return torch.add(x, bias)  # (..., 2C) + (2C,): one pass, one allocation
    return x.to(compute_dtype).add_(bias)  # bias promoted to compute_dtype inside the add


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
    cdt = _compute_dtype(x)
    if bias is None and x.dtype == cdt:
        h, g = x.chunk(2, dim=-1)
        return _act(g, activation).mul_(h)  # one (..., C) allocation, x untouched
    y = _preact(x, bias, cdt)  # (..., 2C)
    h, g = y.chunk(2, dim=-1)  # views: value, gate
    _act_(g, activation)
    out = torch.empty(h.shape, dtype=x.dtype, device=x.device)
    return torch.mul(h, g, out=out)  # fp32 product rounded once into a half output


def bias_geglu_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str = "gelu",
    need_dbias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dh = dy · act(gate), dgate = dy · h · act'(gate), dx = [dh, dgate]; dbias = Σ_rows dx (fp32 accumulation).

    Returns (dx with the shape and dtype of x, dbias of shape (2C,) and dtype of bias, or None).
    """
    cdt = _compute_dtype(x)
    y = _preact(x, bias, cdt)  # (..., 2C), becomes dx
    h, g = y.chunk(2, dim=-1)
    g_dy = dy if dy.dtype == cdt else dy.to(cdt)
    a = _act(g, activation)  # act(gate), (..., C)
    dyh = torch.mul(g_dy, h)  # dy · h, (..., C)
    _act_backward_into(dyh, g, activation)  # gate half of y <- dy · h · act'(gate)
    torch.mul(g_dy, a, out=h)  # value half of y <- dy · act(gate) (h is no longer needed)
    dbias = None
    if bias is not None and need_dbias:
        # column sums as a GEMV, ones(rows) @ dx (fp32 or fp64): about 2x faster on CPU than dx.sum(0)
        y2 = y.reshape(-1, y.shape[-1])  # (rows, 2C)
        dbias = torch.mv(y2.t(), y2.new_ones(y2.shape[0])).to(bias.dtype)
    dx = y if y.dtype == x.dtype else y.to(x.dtype)
    return dx, dbias
