"""`masked_softmax`: softmax(scale·scores + mask) with seeded dropout (DeepSpeed's attention softmax + dropout).

Backends: `reference` (reference/softmax.py), `torch` (kernels/torch/softmax.py), `triton`
(kernels/triton/softmax.py; CUDA, or CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import numbers

import torch

from fastlayers import backends
from fastlayers.backends import Impl
from fastlayers.kernels.torch import softmax as torch_softmax
from fastlayers.reference.softmax import masked_softmax_ref
from fastlayers.utils import FLOAT_DTYPES, check_tensor, keep_mask, new_seed

TRITON_MAX_S_K = 4096  # = kernels.triton.softmax.MAX_S_K (not imported: triton loads only when launched)


def check_additive_mask(name: str, mask: torch.Tensor, target: tuple[int, ...], like: torch.Tensor) -> None:
    """ValueError/TypeError unless `mask` is a floating tensor on like's device broadcastable to `target`."""
    check_tensor(name, mask, ndim=(1, 2, 3, 4), dtypes=FLOAT_DTYPES, device=like.device)
    try:
        ok = torch.broadcast_shapes(tuple(mask.shape), target) == tuple(target)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} is not broadcastable to {tuple(target)} "
            f"(use (B, 1, 1, S_k), (B, 1, S_q, S_k), (B, H, S_q, S_k) or (S_q, S_k))"
        )


def check_dropout_p(dropout_p: float) -> None:
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


class MaskedSoftmaxTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, mask, scale, dropout_p, seed, offset, checkpoint):
        keep_needed = dropout_p > 0.0 and not checkpoint
        p, out, keep = torch_softmax.masked_softmax_fwd(scores, mask, scale, dropout_p, seed, offset, keep_needed)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        ctx.mask_shape = None if mask is None else mask.shape
        ctx.mask_dtype = None if mask is None else mask.dtype
        if scores.requires_grad or (mask is not None and mask.requires_grad):
            ctx.save_for_backward(p, keep)
        return out

    @staticmethod
    def backward(ctx, grad):
        p, keep = ctx.saved_tensors
        need_mask_grad = ctx.mask_shape is not None and ctx.needs_input_grad[1]
        dscores, dx = torch_softmax.masked_softmax_bwd(grad, p, ctx.scale, ctx.dropout_p, keep, need_mask_grad)
        dmask = dx.sum_to_size(ctx.mask_shape).to(ctx.mask_dtype) if need_mask_grad else None
        return dscores, dmask, None, None, None, None, None  # scale, dropout_p, seed, offset, checkpoint


class MaskedSoftmaxTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, mask, scale, dropout_p, seed, offset, checkpoint):
        from fastlayers.kernels.triton.softmax import masked_softmax_fwd

        store_mask = dropout_p > 0.0 and not checkpoint
        out, p, keep = masked_softmax_fwd(scores, mask, scale, dropout_p, seed, offset, return_mask=store_mask)
        ctx.scale, ctx.dropout_p, ctx.seed, ctx.offset = scale, dropout_p, seed, offset
        if scores.requires_grad:
            ctx.save_for_backward(p, keep)
        return out

    @staticmethod
    def backward(ctx, grad):
        from fastlayers.kernels.triton.softmax import masked_softmax_bwd

        p, keep = ctx.saved_tensors
        dscores = masked_softmax_bwd(grad, p, ctx.scale, ctx.dropout_p, ctx.seed, ctx.offset, keep=keep)
        return dscores, None, None, None, None, None, None  # mask, scale, dropout_p, seed, offset, checkpoint


def _reference_impl(scores, mask, *, scale, dropout_p, seed, offset, checkpoint):
    keep = keep_mask(tuple(scores.shape), dropout_p, seed, scores.device, offset) if dropout_p > 0.0 else None
    upcast = scores.dtype in (torch.float16, torch.bfloat16)  # fp32 maths, as the fast backends
    return masked_softmax_ref(scores, mask, scale=scale, dropout_p=dropout_p, keep_mask=keep, upcast=upcast)


def _torch_impl(scores, mask, *, scale, dropout_p, seed, offset, checkpoint):
    return MaskedSoftmaxTorchFunction.apply(scores, mask, scale, dropout_p, seed, offset, checkpoint)


def _triton_impl(scores, mask, *, scale, dropout_p, seed, offset, checkpoint):
    return MaskedSoftmaxTritonFunction.apply(scores, mask, scale, dropout_p, seed, offset, checkpoint)


def _triton_reasons(scores=None, mask=None, **_) -> list[str]:
    reasons = []
    if mask is not None and torch.is_grad_enabled() and mask.requires_grad:
        reasons.append("mask requires grad: the Triton backward gives no mask gradient (use backend='torch')")
    if scores is not None and scores.shape[-1] > TRITON_MAX_S_K:
        reasons.append(f"S_k={scores.shape[-1]} > {TRITON_MAX_S_K} (a row must fit one program's registers)")
    return reasons


backends.register(Impl("masked_softmax", "reference", "fastlayers.functional.softmax:_reference_impl"))
backends.register(Impl("masked_softmax", "torch", "fastlayers.functional.softmax:_torch_impl"))
backends.register(
    Impl(
        "masked_softmax",
        "triton",
        "fastlayers.functional.softmax:_triton_impl",
        devices=frozenset({"cuda"}),
        check=_triton_reasons,
    )
)


def masked_softmax(
    scores: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: int | None = None,
    offset: int = 0,
    training: bool = True,
    checkpoint: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax of `scale·scores + mask` over the last dim (fp32 math), then inverted dropout.

    A row whose every entry is -inf gives zeros (never NaN) and a zero gradient. The mask is additive
    (0 keeps, -10000 or -inf masks). The gradient flows to `scores`; the `torch` and `reference` backends
    also give `mask` a gradient when it requires one (a learned bias), the `triton` backend refuses such a mask.

    Args:
        scores: (B, H, S_q, S_k), fp16/bf16/fp32/fp64.
        mask: additive, broadcastable to scores: (B, 1, 1, S_k), (B, 1, S_q, S_k), (B, H, S_q, S_k) or (S_q, S_k);
            any float dtype, same device.
        scale: multiplies the scores before the mask is added.
        dropout_p: drop probability in [0, 1); applies only when `training`.
        seed: dropout seed; None draws one from torch's global RNG (`torch.manual_seed` reproduces).
        offset: distinguishes several dropouts that share a seed.
        training: False (or dropout_p == 0) disables dropout and draws no random number.
        checkpoint: True (DeepSpeed attn_dropout_checkpoint) saves only the softmax output P; the torch backend
            keeps the mask in P's sign bit (P >= 0: no extra bytes, no RNG re-run), the triton backend regenerates
            it with tl.rand. False also saves the bool mask. Results are identical.
        backend: "reference" | "torch" | "triton" | None (automatic, see `fastlayers.backends`).

    Returns:
        (B, H, S_q, S_k), dtype of scores.

    Equivalent PyTorch: `fastlayers.reference.softmax.masked_softmax_ref` with the backend's keep mask.

    Backends: reference (any device/dtype), torch (any device/dtype), triton (CUDA fp16/bf16/fp32, or CPU
    interpreter fp16/fp32; S_k <= 4096; no mask gradient). The keep masks of torch/reference (same bits) and
    triton (`tl.rand`) differ.
    """
    check_tensor("scores", scores, ndim=4, dtypes=FLOAT_DTYPES)
    if mask is not None:
        check_additive_mask("mask", mask, tuple(scores.shape), scores)
    if not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    check_dropout_p(dropout_p)
    if not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    dropout_p = float(dropout_p) if training else 0.0
    if dropout_p > 0.0 and seed is None:
        seed = new_seed()
    seed = 0 if seed is None else int(seed)
    impl = backends.select(
        "masked_softmax", backend, scores=scores, mask=mask, dropout_p=dropout_p, checkpoint=checkpoint
    )
    return impl.resolve()(
        scores, mask, scale=float(scale), dropout_p=dropout_p, seed=seed, offset=offset, checkpoint=checkpoint
    )


__all__ = ["masked_softmax", "MaskedSoftmaxTorchFunction", "MaskedSoftmaxTritonFunction"]
