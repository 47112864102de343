"""Fast plain-PyTorch `nhwc_bias_add` forward (inference; no autograd: `out=` ops).

Eager `act + bias.view(1, -1, 1, 1) + other + other_bias.view(1, -1, 1, 1)` makes three full-size temporaries
and, for fp16/bf16, rounds after every add. Here the two biases are summed first (C elements, in fp32) and the
output is allocated once, in activation's memory format:

- bias only, any dtype: one pass, `torch.add(act, bias, out=out)`. torch adds fp16/bf16 in fp32 and rounds
  once, so this is already fp32 maths.
- fp32/fp64 with `other`: `out = act + b; out += other`, two passes over one buffer.
- fp16/bf16 with `other`: the sum of three or four terms is formed in an fp32 buffer and rounded once into
  `out`. Rounding after each half-precision add instead (what DeepSpeed's fp16 kernel and eager PyTorch do)
  can be off by more than the fp16 tolerance when `other` cancels `act + bias`. On CUDA the mixed-dtype
  adds read the half inputs directly; on CPU torch's mixed-dtype elementwise path is not vectorized (about 10x
  slower than a same-dtype add), so `other` is converted to fp32 first there.
"""

from __future__ import annotations

import torch

_HALF = (torch.float16, torch.bfloat16)


def _channel_view(bias: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """bias (C,) viewed to broadcast along activation's channel dim (dim 1 of NCHW, the last of (B, S, C))."""
    return bias.view(1, -1, 1, 1) if activation.dim() == 4 else bias


def nhwc_bias_add_fwd(
    activation: torch.Tensor,
    bias: torch.Tensor,
    other: torch.Tensor | None = None,
    other_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = activation + bias[c] (+ other (+ other_bias[c])): a new tensor with activation's shape, dtype and
    memory format; fp32 maths for fp16/bf16, rounded once. activation (N, C, H, W) in any memory format or
    (B, S, C), bias/other_bias (C,), other like activation (any memory format)."""
    if other_bias is not None and other is None:
        raise ValueError("other_bias was given without other: it is the bias of `other`")
    out = torch.empty_like(activation)  # preserve_format: channels_last stays channels_last
    if other is None:
        return torch.add(activation, _channel_view(bias, activation), out=out)
    half = activation.dtype in _HALF
    cdt = torch.float32 if half else activation.dtype
    b = bias.to(cdt)
    if other_bias is not None:
        b = b + other_bias.to(cdt)  # (C,): both biases in one broadcast operand
    b = _channel_view(b, activation)
    if not half:
        torch.add(activation, b, out=out)
        return out.add_(other)
    acc = torch.add(activation, b)  # fp32 (a half tensor plus an fp32 bias promotes), activation's memory format
    if acc.device.type == "cuda":
        return torch.add(acc, other, out=out)  # fp32 sum, one rounding into the half output
    acc.add_(other.float())
    return out.copy_(acc)
