"""Weight-only int8 group quantization with DeepSpeed's `GroupQuantizer` API and scale layout.

`GroupQuantizer(q_int8=True, group_size=1, num_bits=8, num_groups=0).quantize(w)` returns an int8
`nn.Parameter` shaped like `w` (requires_grad=False) whose `.scale` is laid out exactly as DeepSpeed lays it
out (see `GroupQuantizer.quantize`), so scales from DeepSpeed checkpoints can be used as they are.
Differences from DeepSpeed:

- the tensor stays on its own device (DeepSpeed moves it to the current accelerator);
- an all-zero group gets codes 0 and scale 0 (DeepSpeed divides 0 by 0 and stores NaN codes);
- bad shapes and settings raise ValueError naming the values (DeepSpeed fails inside reshape/split, or silently
  makes three halves for an odd split).

`quantized_linear` dequantizes the weight on every call and runs `F.linear`: no int8 GEMM kernel is built, so
this saves weight memory, not time.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastlayers.reference.quantize import group_dequantize_ref, group_quantize_ref, group_scales_ref
from fastlayers.utils import FLOAT_DTYPES, check_tensor, dtype_name

MIN_BITS, MAX_BITS = 2, 8


def _check_int(name: str, value, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


class GroupQuantizer:
    """DeepSpeed's `module_inject.replace_module.GroupQuantizer`: symmetric per-group weight quantization.

    Args:
        q_int8: quantize (True) or pass the tensor through as a float Parameter (False).
        group_size: rows per group when num_groups is 0 (default one group per row). Must divide the row count.
        num_bits: code width, 2..8 (codes are stored as int8).
        num_groups: the number of groups G (> 0), or 0 to use rows // group_size.
    """

    def __init__(self, q_int8: bool = True, group_size: int = 1, num_bits: int = 8, num_groups: int = 0):
        _check_int("group_size", group_size, 1)
        _check_int("num_groups", num_groups, 0)
        _check_int("num_bits", num_bits)
        if not MIN_BITS <= num_bits <= MAX_BITS:
            raise ValueError(f"num_bits must be in {MIN_BITS}..{MAX_BITS} (codes are int8), got {num_bits}")
        self.q_int8 = q_int8
        self.group_size = group_size
        self.num_bits = num_bits
        self.num_groups = num_groups

    def __repr__(self) -> str:
        return (
            f"GroupQuantizer(q_int8={self.q_int8}, group_size={self.group_size}, num_bits={self.num_bits}, "
            f"num_groups={self.num_groups})"
        )

    def _groups(self, inputs: torch.Tensor, parallel_dim: int) -> int:
        """G for these inputs, after checking that the tensor and both halves split into G equal groups."""
        shape = tuple(inputs.shape)
        if inputs.dim() == 0:
            raise ValueError("inputs must have at least 1 dim (rows first), got a 0-dim tensor")
        rows, numel = shape[0], inputs.numel()
        if self.num_groups > 0:
            g = self.num_groups
        else:
            if rows % self.group_size:
                raise ValueError(
                    f"the row count {rows} of inputs {shape} must be divisible by group_size ({self.group_size})"
                )
            g = rows // self.group_size
        if g == 0 or numel % g:
            raise ValueError(f"inputs {shape} ({numel} elements) cannot be split into num_groups={g} equal groups")
        if not -inputs.dim() <= parallel_dim < inputs.dim():
            raise ValueError(f"parallel_dim={parallel_dim} is out of range for inputs {shape}")
        size = shape[parallel_dim]
        if size % 2:
            raise ValueError(
                f"inputs {shape} has odd size {size} along parallel_dim={parallel_dim}: cannot split it into two halves"
            )
        if (numel // 2) % g:
            raise ValueError(
                f"each half of inputs {shape} along parallel_dim={parallel_dim} has {numel // 2} elements, "
                f"which cannot be split into num_groups={g} equal groups"
            )
        return g

    @torch.no_grad()
    def quantize(self, inputs: torch.Tensor, qkv: bool = True, count: int = 1, parallel_dim: int = 0) -> nn.Parameter:
        """Quantize a weight (rows first, e.g. (out, in)) to an int8 Parameter with DeepSpeed's `.scale`.

        If `q_int8` is False or `qkv` is False: returns `nn.Parameter(inputs, requires_grad=False)` (sharing
        inputs' storage) with `.scale = torch.empty(1)`, as DeepSpeed does.

        Otherwise returns an int8 Parameter q with the shape and device of inputs (requires_grad=False),
        q = clamp(round(inputs / scale), -2**(bits-1), 2**(bits-1) - 1) per group of `inputs.reshape(G, -1)`, and
        `q.scale` fp32 (G, 3) holding, in memory order, [scale_all (G), scale_half0 (G), scale_half1 (G)]: the
        whole-tensor group scales, then the group scales of each half of inputs split along `parallel_dim` (each
        half read as (G, -1)). It is DeepSpeed's `cat([1, G] rows).reshape(G, 3)`, a reinterpretation of the
        (3, G) block, not a transpose: row i of `.scale` is not the three scales of group i.
        `q.scale.reshape(-1)[:G]` are the scales that dequantize q (`group_dequantize`).

        `count` is unused (DeepSpeed's signature).
        """
        del count  # unused, as in DeepSpeed
        if not self.q_int8 or not qkv:
            out = nn.Parameter(inputs, requires_grad=False)
            out.scale = torch.empty(1)
            return out
        check_tensor("inputs", inputs, dtypes=FLOAT_DTYPES)
        g = self._groups(inputs, parallel_dim)
        q, scale = group_quantize_ref(inputs, g, self.num_bits)  # (shape of inputs) int8, (G,) fp32
        half = inputs.shape[parallel_dim] // 2
        halves = inputs.split(half, dim=parallel_dim)
        half_scales = [group_scales_ref(h, g, self.num_bits) for h in halves]  # 2 x (G,)
        out = nn.Parameter(q.contiguous(), requires_grad=False)
        out.scale = torch.cat([scale, *half_scales]).reshape(g, 3).contiguous()  # [3, G] memory read as [G, 3]
        return out


def _group_scales(scale: torch.Tensor) -> torch.Tensor:
    """The (G,) dequantization scales: a (G,) tensor as is, or the first G of DeepSpeed's (G, 3) layout."""
    if scale.dim() == 1:
        return scale
    if scale.dim() == 2 and scale.shape[1] == 3:
        return scale.reshape(-1)[: scale.shape[0]]
    raise ValueError(
        f"scale must have shape (G,) or DeepSpeed's (G, 3) layout from GroupQuantizer, got {tuple(scale.shape)}"
    )


def group_dequantize(
    param_or_q: torch.Tensor, scale: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """q · scale per group, shaped like q, in `dtype` (default fp32).

    Args:
        param_or_q: an int8 tensor of codes, e.g. the Parameter `GroupQuantizer.quantize` returns. A float
            tensor (what `quantize` returns with q_int8=False) is returned as is, cast to `dtype`.
        scale: (G,) fp32 group scales (`group_quantize_ref`) or DeepSpeed's (G, 3) `.scale` (the first G entries
            of its memory are used). None reads `param_or_q.scale`.
        dtype: the output float dtype; None means fp32.
    """
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {[dtype_name(d) for d in FLOAT_DTYPES]}, got {dtype}")
    check_tensor("param_or_q", param_or_q)
    if param_or_q.is_floating_point():
        return param_or_q.to(dtype)  # pass-through weight (q_int8=False or qkv=False)
    if param_or_q.dtype != torch.int8:
        raise TypeError(f"param_or_q must be int8 codes (or a float weight), got {dtype_name(param_or_q.dtype)}")
    if scale is None:
        scale = getattr(param_or_q, "scale", None)
        if scale is None:
            raise ValueError("param_or_q has no .scale attribute (not from GroupQuantizer.quantize): pass scale=")
    check_tensor("scale", scale)
    s = _group_scales(scale)
    g = s.numel()
    if g == 0 or param_or_q.numel() % g:
        raise ValueError(
            f"q {tuple(param_or_q.shape)} ({param_or_q.numel()} elements) cannot be split into the {g} groups "
            f"of scale {tuple(scale.shape)}"
        )
    return group_dequantize_ref(param_or_q, s.to(param_or_q.device), dtype)


def quantized_linear(x: torch.Tensor, q_weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, group_dequantize(q_weight, dtype=x.dtype), bias): x (..., in), q_weight (out, in) int8 with
    `.scale` (or a pass-through float weight), bias (out,) or None -> (..., out) in x.dtype.

    The weight is dequantized on every call (a full (out, in) temporary in x.dtype); there is no int8 GEMM kernel.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("q_weight", q_weight, ndim=2)
    if x.dim() == 0 or x.shape[-1] != q_weight.shape[1]:
        raise ValueError(
            f"x {tuple(x.shape)} must end with the in-features {q_weight.shape[1]} of q_weight {tuple(q_weight.shape)}"
        )
    return F.linear(x, group_dequantize(q_weight, dtype=x.dtype), bias)
