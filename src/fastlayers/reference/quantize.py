"""Reference symmetric int8 (2..8-bit) group quantization, DeepSpeed's `GroupQuantizer` maths.

The tensor is read as `num_groups` equal groups of consecutive elements (`x.reshape(G, -1)`). Each group has
one scale, `absmax · 2 / 2**num_bits` (absmax/128 for 8 bits), computed in fp32; the codes are
`clamp(round(x / scale), -2**(bits-1), 2**(bits-1) - 1)` (round half to even), and dequantization is
`q · scale`. Symmetric, no zero point.

One fix over DeepSpeed: a group that is all zeros has scale 0 and DeepSpeed divides 0 by 0 (NaN codes).
Here its codes are 0 (the division uses 1 where the scale is 0) and its stored scale stays 0, so it
dequantizes to exact zeros.
"""

from __future__ import annotations

import torch


def group_scales_ref(x: torch.Tensor, num_groups: int, num_bits: int = 8) -> torch.Tensor:
    """Per-group scales absmax · 2 / 2**num_bits of x read as (num_groups, -1), fp32, shape (num_groups,)."""
    g = x.reshape(num_groups, -1).float()  # (G, K)
    absmax = g.abs().amax(dim=1)  # (G,) = max(|min|, |max|)
    return absmax * 2.0 / (2**num_bits)  # same op order as DeepSpeed: bit-identical scales


def group_quantize_ref(x: torch.Tensor, num_groups: int, num_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-group quantization of x.

    Args:
        x: any shape, any float dtype, numel divisible by num_groups; groups are consecutive runs of
            numel / num_groups elements in row-major order.
        num_groups: G.
        num_bits: code width (2..8); codes lie in [-2**(bits-1), 2**(bits-1) - 1].

    Returns:
        (q, scale): q int8 with the shape of x, scale fp32 (G,), with x ≈ q · scale[group].
        An all-zero group has scale 0 and codes 0.
    """
    scale = group_scales_ref(x, num_groups, num_bits)  # (G,)
    lo, hi = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # 0/0 would be NaN
    g = x.reshape(num_groups, -1).float()  # (G, K)
    q = (g / safe[:, None]).round().clamp(lo, hi).to(torch.int8)
    return q.reshape(x.shape), scale


def group_dequantize_ref(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q · scale per group: q (any shape, numel divisible by G) read as (G, -1), scale (G,); returns q's shape in
    `dtype` (computed in fp32, fp64 for an fp64 dtype)."""
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    g = q.reshape(scale.numel(), -1).to(cdt)  # (G, K)
    return (g * scale.to(cdt)[:, None]).reshape(q.shape).to(dtype)
