"""Reference (readable, any dtype) fused bias + GEGLU: the gated activation of a Stable Diffusion feed-forward.

GEGLU: Shazeer, "GLU Variants Improve Transformer", https://arxiv.org/abs/2002.05202. The projection to 2C
channels is split into a value half and a gate half, and the value is multiplied by the activated gate.
DeepSpeed's `bias_geglu` / `gated_activation` kernel (diffusers transformer block, FF step 7) fuses the bias
add and uses the exact erf GELU computed in fp32 for half inputs; its `GATED_SILU` variant uses SiLU.
"""

from __future__ import annotations

import torch

from fastlayers.reference.activations import gelu_ref

ACTIVATIONS = ("gelu", "silu")


def gate_act_ref(g: torch.Tensor, activation: str = "gelu") -> torch.Tensor:
    """The gate's activation, written out.

    activation="gelu":  0.5·g·(1 + erf(g/√2))   (exact GELU)
    activation="silu":  g·sigmoid(g)
    """
    if activation == "gelu":
        return gelu_ref(g, "none")
    if activation == "silu":
        return g * torch.sigmoid(g)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def bias_geglu_ref(
    x: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "gelu", upcast: bool = False
) -> torch.Tensor:
    """h · act(gate) where (h, gate) are the two halves of x + bias along the last dim.

    y = x + bias;  h = y[..., :C] (value);  gate = y[..., C:];  out = h · act(gate)

    Args:
        x: (..., 2C), any float dtype.
        bias: (2C,) same dtype as x, or None.
        activation: "gelu" (exact erf GELU, DeepSpeed's default) or "silu" (DeepSpeed's GATED_SILU).
        upcast: compute in fp32 and cast the result back to x.dtype (what the fast backends do for half).

    Returns:
        (..., C), dtype of x.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dim (..., 2C), got shape {tuple(x.shape)}")
    dtype = x.dtype
    y = x.float() if upcast else x
    if bias is not None:
        y = y + (bias.float() if upcast else bias)  # (..., 2C) + (2C,)
    h, gate = y.chunk(2, dim=-1)  # (..., C) each: value first, gate second
    return (h * gate_act_ref(gate, activation)).to(dtype)
