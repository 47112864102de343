"""Reference per-channel bias add of DeepSpeed's spatial extension (`nhwc_bias_add`).

DeepSpeed's diffusers UNet runs in channels_last; `nhwc_bias_add` adds a per-channel bias to an NCHW
activation stored channels_last (read as [N, H·W, C]) or to a [B, S, C] activation, optionally adding a
residual `other` and that residual's own per-channel bias, in one pass.
"""

from __future__ import annotations

import torch


def _channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a (C,) vector along the channel dim of x: dim 1 of NCHW, the last dim of (B, S, C)."""
    if x.dim() == 4:
        return (1, -1, 1, 1)
    if x.dim() == 3:
        return (-1,)
    raise ValueError(f"activation must be 4-D NCHW or 3-D (B, S, C), got shape {tuple(x.shape)}")


def nhwc_bias_add_ref(
    activation: torch.Tensor,
    bias: torch.Tensor,
    other: torch.Tensor | None = None,
    other_bias: torch.Tensor | None = None,
    *,
    upcast: bool = False,
) -> torch.Tensor:
    """out = activation + bias[c]  (+ other  (+ other_bias[c])), as a new tensor.

    out = (activation + bias[c]) + (other + other_bias[c])   with both optional terms present;
    c is the channel: dim 1 of a 4-D (N, C, H, W) tensor (in any memory format; DeepSpeed's is channels_last),
    the last dim of a 3-D (B, S, C) tensor.

    Args:
        activation: (N, C, H, W) or (B, S, C), any float dtype.
        bias: (C,).
        other: None or the shape of activation.
        other_bias: None or (C,); only together with `other`.
        upcast: compute in (at least) fp32 and cast the result back to activation.dtype (what the fast backends do).

    Returns:
        activation's shape and dtype; torch's usual elementwise rules give it activation's memory format.
    """
    if other_bias is not None and other is None:
        raise ValueError("other_bias was given without other: it is the bias of `other`")
    shape = _channel_shape(activation)

    def up(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.promote_types(t.dtype, torch.float32)) if upcast else t

    out = up(activation) + up(bias).reshape(shape)
    if other is not None:
        res = up(other)
        if other_bias is not None:
            res = res + up(other_bias).reshape(shape)
        out = out + res
    return out.to(activation.dtype)
