"""Reference LayerNorm and the fused "bias + dropout + residual add + LayerNorm" (DeepSpeed's post-attention
block: `add_res = x + dropout(a + b)` then `LN(add_res)`). Readable, any float dtype, autograd for free.
"""

from __future__ import annotations

import torch

from fastlayers.utils import keep_mask as _keep_mask
from fastlayers.utils import new_seed


def layer_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    eps: float = 1e-5,
    invertible: bool = False,
    upcast: bool = False,
) -> torch.Tensor:
    """LayerNorm over the last dim: `y = (x - mean) / sqrt(var + eps) * weight + bias`, biased variance.

    Args:
        x: (..., N), any float dtype.
        weight, bias: (N,), same dtype as x, or None (1 and 0).
        eps: added to the variance.
        invertible: accepted for API parity with the other backends; it only changes what they save for
            backward, never the maths.
        upcast: compute in float32 and cast the result back to x.dtype.

    Returns:
        y: (..., N), x.dtype.
    """
    del invertible
    dtype = x.dtype
    if upcast:
        x = x.float()
        weight = weight.float() if weight is not None else None
        bias = bias.float() if bias is not None else None
    mean = x.mean(dim=-1, keepdim=True)  # (..., 1)
    var = (x - mean).pow(2).mean(dim=-1, keepdim=True)  # (..., 1), biased, as F.layer_norm and DeepSpeed
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.to(dtype)


def bias_dropout_residual_layer_norm_ref(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    *,
    eps: float = 1e-12,
    dropout_p: float = 0.0,
    seed: int | None = None,
    offset: int = 0,
    training: bool = True,
    invertible: bool = False,
    return_residual_out: bool = False,
    return_mask: bool = False,
    keep_mask: torch.Tensor | None = None,
    upcast: bool = False,
):
    """`pre = residual + dropout(x + bias)`; `y = LayerNorm(pre) * weight + ln_bias` over the last dim.

    Dropout is inverted dropout: kept elements are scaled by 1 / (1 - dropout_p). The keep mask is
    `keep_mask` when given (e.g. the mask another backend returned), else
    `fastlayers.utils.keep_mask(x.shape, dropout_p, seed, x.device, offset)`: the same bits as the torch
    backend for the same (seed, offset). `training=False` or `dropout_p == 0` means no dropout.

    Args:
        x: (..., N), any float dtype.
        bias: (N,) or None, added to x before dropout.
        residual: same shape as x, or None.
        weight, ln_bias: (N,), LayerNorm affine parameters (None: 1 and 0).
        eps: added to the variance.
        dropout_p: drop probability in [0, 1).
        seed, offset: select the mask when `keep_mask` is None (seed None: drawn from torch's global RNG).
        training: dropout only when True.
        invertible: accepted for API parity; it only changes what the other backends save.
        return_residual_out: also return `pre`.
        return_mask: also return the bool keep mask (all True when there is no dropout).
        keep_mask: (..., N) bool (True = keep), or None.
        upcast: compute in float32 and cast the outputs back to x.dtype.

    Returns:
        y (..., N), then `pre` (..., N) if return_residual_out, then the mask (..., N) bool if return_mask.
    """
    del invertible
    dtype = x.dtype
    if upcast:
        x = x.float()
        bias = bias.float() if bias is not None else None
        residual = residual.float() if residual is not None else None
    z = x if bias is None else x + bias
    dropout = training and dropout_p > 0.0
    if dropout:
        if keep_mask is None:
            keep_mask = _keep_mask(tuple(x.shape), dropout_p, new_seed() if seed is None else seed, x.device, offset)
        z = z * keep_mask.to(z.dtype) / (1.0 - dropout_p)
    elif keep_mask is None:
        keep_mask = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    pre = z if residual is None else residual + z
    y = layer_norm_ref(pre, weight, ln_bias, eps=eps, upcast=upcast)
    out = [y]
    if return_residual_out:
        out.append(pre.to(dtype))
    if return_mask:
        out.append(keep_mask)
    return out[0] if len(out) == 1 else tuple(out)
