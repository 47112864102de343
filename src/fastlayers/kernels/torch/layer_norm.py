"""Fast plain-PyTorch forward and backward of "bias + dropout + residual add + LayerNorm" on 2-D (M, N) rows.

The LayerNorm itself is ATen's fused `native_layer_norm` / `native_layer_norm_backward` (one pass each, the
same kernels `F.layer_norm` runs); around it: bias add, then dropout and residual in one `addcmul`, a 1-byte
bool keep mask saved instead of the float noise tensor `F.dropout` keeps, and the invertible backward that
rebuilds x̂ = (y - ln_bias) / weight from the output (DeepSpeed's normalize_invertible).
Half inputs (fp16, bf16) are computed in float32 and rounded once at the outputs.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half inputs, else the input dtype (float32 or float64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def layer_norm_fwd(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    keep: torch.Tensor | None = None,
    dropout_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward on (M, N) rows.

    Args:
        x, residual: (M, N); bias, weight, ln_bias: (N,); all the same dtype.
        keep: (M, N) bool keep mask, or None for no dropout; kept values are scaled by `dropout_scale`.

    Returns:
        y (M, N) x.dtype; pre = residual + dropout(x + bias) (M, N) x.dtype (x itself when there is nothing
        to add); mean, rstd (M, 1) in the compute dtype.
    """
    acc = compute_dtype(x.dtype)
    n = x.shape[-1]
    z = x.to(acc)
    if bias is not None:
        z = z + bias.to(acc)
    if keep is not None:
        # The bool mask (what is saved, 1 byte/elt) becomes a transient float mask: on CPU a float multiply
        # is ~2x faster than where(bool); the 1/(1-p) scale rides on addcmul's `value`.
        keep_f = keep.to(acc)
        if residual is not None:
            z = torch.addcmul(residual.to(acc), z, keep_f, value=dropout_scale)
        else:
            z = torch.mul(z, keep_f).mul_(dropout_scale)
    elif residual is not None:
        z = z + residual.to(acc)
    y, mean, rstd = torch.native_layer_norm(z, (n,), weight.to(acc), ln_bias.to(acc), eps)
    return y.to(x.dtype), z.to(x.dtype), mean, rstd


def layer_norm_bwd(
    dy: torch.Tensor,
    saved: torch.Tensor,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    *,
    invertible: bool,
    dpre_out: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    dropout_scale: float = 1.0,
    has_bias: bool = False,
    need_weight_grads: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward on (M, N) rows.

    Args:
        dy: (M, N) gradient of y.
        saved: (M, N) the LN input `pre` (invertible=False) or the LN output `y` (invertible=True).
        weight, ln_bias: (N,); mean (M, 1) (unused and may be None when invertible), rstd (M, 1).
        dpre_out: (M, N) gradient of the returned `pre`, or None.
        keep, dropout_scale: the forward's keep mask (None: no dropout).
        has_bias: whether to return the gradient of the (N,) bias added before dropout.

    Returns:
        dx (M, N), dbias (N,) or None, dresidual (M, N), dweight (N,) or None, dln_bias (N,) or None;
        in the input dtypes.
    """
    acc = compute_dtype(dy.dtype)
    n = dy.shape[-1]
    w = weight.to(acc)
    mask = [True, need_weight_grads, need_weight_grads]
    if invertible:
        # x̂ = (y - β) / γ; then ATen's backward with mean 0 and rstd 1 returns the bracket of
        # dpre = rstd * (γ·dy - mean(γ·dy) - x̂ · mean(γ·dy·x̂)), and dγ = Σ dy·x̂, dβ = Σ dy exactly.
        inv_w = 1.0 / w
        xhat = torch.addcmul(-ln_bias.to(acc) * inv_w, saved.to(acc), inv_w)  # one pass over (M, N)
        ones = torch.ones_like(rstd)
        dpre, dw, db = torch.ops.aten.native_layer_norm_backward(
            dy.to(acc), xhat, [n], torch.zeros_like(rstd), ones, w, ln_bias.to(acc), mask
        )
        dpre = dpre.mul_(rstd)
    else:
        dpre, dw, db = torch.ops.aten.native_layer_norm_backward(
            dy.to(acc), saved.to(acc), [n], mean, rstd, w, ln_bias.to(acc), mask
        )
    if dpre_out is not None:
        dpre = dpre.add_(dpre_out.to(acc))
    dx = dpre if keep is None else torch.mul(dpre, keep.to(acc)).mul_(dropout_scale)
    dbias = dx.sum(0).to(dy.dtype) if has_bias else None
    dw = dw.to(weight.dtype) if dw is not None else None
    db = db.to(ln_bias.dtype) if db is not None else None
    return dx.to(dy.dtype), dbias, dpre.to(dy.dtype), dw, db
