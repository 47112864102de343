"""LayerNorm and the fused "bias + dropout + residual add + LayerNorm": autograd Functions, dispatch, public ops.

DeepSpeed's training layer runs `add_res = residual + dropout(a + bias)` then `LN(add_res)` as fused CUDA
kernels, with `normalize_invertible` to keep the LN output instead of its input for backward. These are the
same maths for the `torch` (ATen LayerNorm + 1-byte keep mask) and `triton` (one fused kernel each way) backends.
"""

from __future__ import annotations

import torch

from fastlayers import backends
from fastlayers.backends import Impl
from fastlayers.kernels.torch import layer_norm as torch_ln
from fastlayers.utils import FLOAT_DTYPES, check_tensor, keep_mask, new_seed

OP = "bias_dropout_residual_layer_norm"
LN_OP = "layer_norm"


class LayerNormTorchFunction(torch.autograd.Function):
    """(M, N) rows; saves pre + mean + rstd, or y + rstd when invertible, plus the bool keep mask."""

    @staticmethod
    def forward(
        ctx, x, bias, residual, weight, ln_bias, eps, dropout_p, seed, offset, invertible, return_pre, return_mask
    ):
        ctx.set_materialize_grads(False)
        m, n = x.shape
        keep = keep_mask((m, n), dropout_p, seed, x.device, offset) if dropout_p > 0.0 else None
        scale = 1.0 / (1.0 - dropout_p)
        y, pre, mean, rstd = torch_ln.layer_norm_fwd(x, bias, residual, weight, ln_bias, eps, keep, scale)
        if any(ctx.needs_input_grad[:5]):
            if invertible:
                ctx.save_for_backward(y, weight, ln_bias, None, rstd, keep)
            else:
                ctx.save_for_backward(pre, weight, ln_bias, mean, rstd, keep)
        ctx.invertible, ctx.scale = invertible, scale
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        mask_out = None
        if return_mask:
            mask_out = keep if keep is not None else torch.ones((m, n), dtype=torch.bool, device=x.device)
            ctx.mark_non_differentiable(mask_out)
        return y, pre, mask_out

    @staticmethod
    def backward(ctx, dy, dpre_out, _dmask):
        saved, weight, ln_bias, mean, rstd, keep = ctx.saved_tensors
        if dy is None:  # only `pre` was used downstream
            dy = torch.zeros_like(saved)
        dx, dbias, dres, dw, db = torch_ln.layer_norm_bwd(
            dy,
            saved,
            weight,
            ln_bias,
            mean,
            rstd,
            invertible=ctx.invertible,
            dpre_out=dpre_out,
            keep=keep,
            dropout_scale=ctx.scale,
            has_bias=ctx.has_bias,
            need_weight_grads=ctx.needs_input_grad[3] or ctx.needs_input_grad[4],
        )
        dres = dres if ctx.has_residual else None
        return dx, dbias, dres, dw, db, None, None, None, None, None, None, None  # eps p seed offset inv pre mask


class LayerNormTritonFunction(torch.autograd.Function):
    """(M, N) rows; like the torch Function, but the keep mask is regenerated in backward from the seed."""

    @staticmethod
    def forward(
        ctx, x, bias, residual, weight, ln_bias, eps, dropout_p, seed, offset, invertible, return_pre, return_mask
    ):
        from fastlayers.kernels.triton import layer_norm as triton_ln

        ctx.set_materialize_grads(False)
        is_grad = any(ctx.needs_input_grad[:5])
        identity = bias is None and residual is None and dropout_p == 0.0  # pre is x itself
        store_pre = not identity and (return_pre or (is_grad and not invertible))
        key = triton_ln.dropout_seed(seed, offset) if dropout_p > 0.0 else 0
        y, pre, mean, rstd, mask_out = triton_ln.layer_norm_fwd(
            x, bias, residual, weight, ln_bias, eps, dropout_p, key, store_pre=store_pre, return_mask=return_mask
        )
        if identity:
            pre = x
        if is_grad:
            if invertible:
                ctx.save_for_backward(y, weight, ln_bias, None, rstd)
            else:
                ctx.save_for_backward(pre, weight, ln_bias, mean, rstd)
        ctx.invertible, ctx.dropout_p, ctx.key = invertible, dropout_p, key
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        if mask_out is not None:
            ctx.mark_non_differentiable(mask_out)
        return y, pre, mask_out

    @staticmethod
    def backward(ctx, dy, dpre_out, _dmask):
        from fastlayers.kernels.triton import layer_norm as triton_ln

        saved, weight, ln_bias, mean, rstd = ctx.saved_tensors
        if dy is None:  # only `pre` was used downstream
            dy = torch.zeros_like(saved)
        dx, dbias, dres, dw, db = triton_ln.layer_norm_bwd(
            dy,
            saved,
            weight,
            ln_bias,
            mean,
            rstd,
            invertible=ctx.invertible,
            dpre_out=dpre_out,
            has_bias=ctx.has_bias,
            has_residual=ctx.has_residual,
            dropout_p=ctx.dropout_p,
            seed=ctx.key,
        )
        dres = dres if ctx.has_residual else None
        return dx, dbias, dres, dw, db, None, None, None, None, None, None, None  # eps p seed offset inv pre mask


def _apply(
    fn,
    x,
    bias,
    residual,
    weight,
    ln_bias,
    *,
    eps,
    dropout_p,
    seed,
    offset,
    training,
    invertible,
    return_residual_out,
    return_mask,
):
    shape, n = x.shape, x.shape[-1]
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = new_seed()
    x2 = x.reshape(-1, n)  # (M, N), M = prod(leading dims)
    r2 = residual.reshape(-1, n) if residual is not None else None
    y, pre, mask = fn.apply(
        x2,
        bias,
        r2,
        weight,
        ln_bias,
        float(eps),
        p,
        int(seed or 0),
        int(offset),
        bool(invertible),
        bool(return_residual_out),
        bool(return_mask),
    )
    out = [y.view(shape)]
    if return_residual_out:
        out.append(pre.view(shape))
    if return_mask:
        out.append(mask.view(shape))
    return out[0] if len(out) == 1 else tuple(out)


def _torch_impl(x, bias, residual, weight, ln_bias, **kw):
    return _apply(LayerNormTorchFunction, x, bias, residual, weight, ln_bias, **kw)


def _triton_impl(x, bias, residual, weight, ln_bias, **kw):
    return _apply(LayerNormTritonFunction, x, bias, residual, weight, ln_bias, **kw)


def _plain_layer_norm(impl, x, weight, bias, *, eps, invertible):
    """Plain LayerNorm through the fused op: no bias add, no residual, no dropout."""
    kw = dict(dropout_p=0.0, seed=None, offset=0, training=False, return_residual_out=False, return_mask=False)
    return impl(x, None, None, weight, bias, eps=eps, invertible=invertible, **kw)


def _layer_norm_torch_impl(x, weight, bias, *, eps, invertible):
    return _plain_layer_norm(_torch_impl, x, weight, bias, eps=eps, invertible=invertible)


def _layer_norm_triton_impl(x, weight, bias, *, eps, invertible):
    return _plain_layer_norm(_triton_impl, x, weight, bias, eps=eps, invertible=invertible)


TRITON_MAX_N = 4096  # = kernels.triton.layer_norm.MAX_N (not imported here: that module imports triton)


def _triton_reasons(x=None, **_) -> list[str]:
    if x is not None and x.shape[-1] > TRITON_MAX_N:
        return [f"hidden size {x.shape[-1]} > {TRITON_MAX_N} (the Triton kernels keep a row in registers)"]
    return []


backends.register(Impl(OP, "reference", "fastlayers.reference.norm:bias_dropout_residual_layer_norm_ref"))
backends.register(Impl(OP, "torch", "fastlayers.functional.layer_norm:_torch_impl"))
backends.register(
    Impl(
        OP,
        "triton",
        "fastlayers.functional.layer_norm:_triton_impl",
        devices=frozenset({"cuda"}),
        check=_triton_reasons,
    )
)
backends.register(Impl(LN_OP, "reference", "fastlayers.reference.norm:layer_norm_ref"))
backends.register(Impl(LN_OP, "torch", "fastlayers.functional.layer_norm:_layer_norm_torch_impl"))
backends.register(
    Impl(
        LN_OP,
        "triton",
        "fastlayers.functional.layer_norm:_layer_norm_triton_impl",
        devices=frozenset({"cuda"}),
        check=_triton_reasons,
    )
)


def _check_scalars(eps, dropout_p=0.0, seed=None, offset=0) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a number > 0, got {eps!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0, got {offset!r}")


def _check_tensors(x, bias, residual, weight, ln_bias, *, bias_name="bias") -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (hidden) dim, got shape {tuple(x.shape)}")
    n, like = x.shape[-1], dict(dtypes=(x.dtype,), device=x.device)
    check_tensor("weight", weight, shape=(n,), **like)
    check_tensor(bias_name, ln_bias, shape=(n,), **like)
    if bias is not None:
        check_tensor("bias", bias, shape=(n,), **like)
    if residual is not None:
        check_tensor("residual", residual, shape=tuple(x.shape), **like)


def bias_dropout_residual_layer_norm(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    *,
    eps: float = 1e-12,
    dropout_p: float = 0.0,
    seed: int | None = None,
    offset: int = 0,
    training: bool = True,
    invertible: bool = False,
    return_residual_out: bool = False,
    return_mask: bool = False,
    backend: str | None = None,
):
    """Fused `pre = residual + dropout(x + bias)`; `y = LayerNorm(pre) * weight + ln_bias` over the last dim.

    DeepSpeed's `add_res = x + dropout(attn_out + attn_ob)` followed by `LN(add_res)`. Dropout is inverted
    dropout (kept values scaled by 1 / (1 - dropout_p)) and happens only when `training` and
    `dropout_p > 0`; no random number is drawn otherwise. `bias` and `residual` may be None (skipped).
    `invertible=True` (DeepSpeed's normalize_invertible) saves only y and rstd for backward and rebuilds
    x̂ = (y - ln_bias) / weight there, so the LN input `pre` need not be kept: y is usually kept anyway by
    the next layer. It needs every weight entry nonzero. Gradients flow to x, bias, residual, weight and
    ln_bias; with `return_residual_out` also from the returned `pre`.

    Args:
        x: (..., N), float16/bfloat16/float32/float64.
        bias: (N,) or None, same dtype as x; added to x before dropout.
        residual: same shape and dtype as x, or None.
        weight: (N,), same dtype as x; LayerNorm scale (gamma).
        ln_bias: (N,), same dtype as x; LayerNorm shift (beta).
        eps: > 0, added to the variance (DeepSpeed's default 1e-12).
        dropout_p: drop probability in [0, 1).
        seed: dropout seed; None draws one from torch's global RNG (so `torch.manual_seed` reproduces).
        offset: separates several dropouts that share one seed.
        training: apply dropout only when True.
        invertible: save y instead of the LN input (see above).
        return_residual_out: also return `pre`, differentiable.
        return_mask: also return the bool keep mask (True = kept; all True without dropout). The bits depend
            on the backend: torch uses `fastlayers.utils.keep_mask(shape, p, seed, device, offset)`, Triton
            `tl.rand` keyed by (seed, offset).

    Returns:
        y (..., N) x.dtype; then `pre` (..., N) x.dtype if return_residual_out; then the mask (..., N) bool
        if return_mask.

    Equivalent PyTorch:
        `fastlayers.reference.norm.bias_dropout_residual_layer_norm_ref` (pass it `keep_mask=` to reproduce
        a backend's mask), i.e. `F.layer_norm(residual + F.dropout(x + bias, p), (N,), weight, ln_bias, eps)`.

    Backends:
        reference (any device/dtype, autograd), torch (any device, fp16/bf16/fp32/fp64; half computed in fp32;
        saves a 1-byte keep mask), triton (CUDA fp16/bf16/fp32, CPU interpreter fp16/fp32; N <= 4096;
        regenerates the mask in backward). All support every feature and backward.
    """
    _check_tensors(x, bias, residual, weight, ln_bias, bias_name="ln_bias")
    _check_scalars(eps, dropout_p, seed, offset)
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = new_seed()
    impl = backends.select(
        OP,
        backend,
        x=x,
        bias=bias,
        residual=residual,
        weight=weight,
        ln_bias=ln_bias,
        dropout_p=p,
        invertible=invertible,
    )
    return impl.resolve()(
        x,
        bias,
        residual,
        weight,
        ln_bias,
        eps=eps,
        dropout_p=p,
        seed=seed,
        offset=offset,
        training=training,
        invertible=invertible,
        return_residual_out=return_residual_out,
        return_mask=return_mask,
    )


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    eps: float = 1e-5,
    invertible: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim: `y = (x - mean) / sqrt(var + eps) * weight + bias` (biased variance).

    The same machinery as `bias_dropout_residual_layer_norm` with no bias, residual or dropout.
    `invertible=True` saves y and rstd instead of x, mean and rstd, and rebuilds x̂ = (y - bias) / weight in
    backward (needs every weight entry nonzero).

    Args:
        x: (..., N), float16/bfloat16/float32/float64.
        weight: (N,), same dtype as x.
        bias: (N,), same dtype as x.
        eps: > 0, added to the variance.
        invertible: save the output instead of the input for backward.

    Returns:
        y: (..., N), x.dtype.

    Equivalent PyTorch:
        `fastlayers.reference.norm.layer_norm_ref`, i.e. `F.layer_norm(x, (N,), weight, bias, eps)`.

    Backends:
        reference, torch (any device, fp16/bf16/fp32/fp64), triton (CUDA fp16/bf16/fp32, CPU interpreter
        fp16/fp32; N <= 4096). All support backward.
    """
    _check_tensors(x, None, None, weight, bias)
    _check_scalars(eps)
    impl = backends.select(LN_OP, backend, x=x, weight=weight, bias=bias, invertible=invertible)
    return impl.resolve()(x, weight, bias, eps=eps, invertible=invertible)
