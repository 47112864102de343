"""Fast plain-PyTorch masked softmax + seeded dropout, forward and backward (no autograd here).

The [.., S_q, S_k] tensors are the cost on CPU, so every step works in place on a buffer we own and
uses the fused ATen softmax kernels (`_softmax.out`, `_softmax_backward_data.out`, one row-blocked pass
each). Constants (softmax scale, 1/(1-p)) are folded into neighbouring ops instead of extra passes.
The dropout keep mask comes from `fastlayers.utils.keep_mask`. Unless the caller keeps the bool mask, the
forward stores it in the sign bit of the saved probabilities (P >= 0, so -P marks "kept"): the backward gets
the same bits back without a second RNG run (which costs more than the softmax itself on CPU) and without
extra memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastlayers.utils import keep_mask

_REDUCED = (torch.float16, torch.bfloat16)


def dropout_keep(
    shape: tuple[int, ...], dropout_p: float, seed: int, offset: int, device: torch.device
) -> torch.Tensor:
    """The bool keep mask (True = keep) of one dropout call; identical for identical (seed, offset)."""
    return keep_mask(tuple(shape), dropout_p, seed, device, offset)


def softmax_(s: torch.Tensor, row_inputs: Callable[[tuple[torch.Tensor, ...]], torch.Tensor]) -> torch.Tensor:
    """In-place softmax over the last dim of `s` (fp32 accumulation for fp16/bf16 inside ATen's kernel).

    A row whose every entry is -inf comes out NaN from the ATen kernel; such rows are zeroed. To tell them
    from rows made NaN by NaN inputs (which must stay NaN), the NaN rows (rare) are re-checked with
    `row_inputs(index)`, which returns their pre-softmax values (rows, S_k) rebuilt from the op's inputs.
    """
    torch.ops.aten._softmax.out(s, -1, False, out=s)
    nan_rows = torch.isnan(s[..., 0])  # an all -inf row is NaN in every column, so column 0 finds it
    if bool(nan_rows.any()):
        idx = nan_rows.nonzero(as_tuple=True)
        dead = torch.isneginf(row_inputs(idx)).all(-1)  # (rows,)
        s[tuple(i[dead] for i in idx)] = 0.0
    return s


def softmax_backward_(dp: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """In place on `dp`: dS = p * (dp - rowsum(dp * p)) over the last dim (rows with p = 0 give 0)."""
    torch.ops.aten._softmax_backward_data.out(dp, p, -1, p.dtype, grad_input=dp)
    return dp


def masked_softmax_fwd(
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    seed: int,
    offset: int,
    return_keep: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """p = softmax(scale*scores + mask) in fp32, then dropout.

    Args:
        scores: (B, H, S_q, S_k); mask: additive, broadcastable to scores, or None.
        dropout_p: 0 disables dropout (no RNG draw).
        return_keep: also return the bool keep mask (else None).

    Returns:
        (p, out, keep): p the softmax output P (scores' dtype) -- with dropout and not return_keep, sign-encoded:
        -P where kept, +P where dropped; out = P * keep / (1 - dropout_p) (P itself without dropout); keep
        (B, H, S_q, S_k) bool or None.
    """
    fp32 = torch.float32 if scores.dtype in _REDUCED else scores.dtype
    # one pass into a fresh contiguous fp32 buffer (the in-place softmax needs a dense row-major layout)
    s = torch.empty(scores.shape, dtype=fp32, device=scores.device)
    if mask is not None:
        torch.add(mask.to(fp32), scores.to(fp32), alpha=scale, out=s)
    else:
        torch.mul(scores, scale, out=s)

    def row_inputs(idx):
        rows = scores[idx].to(fp32) * scale
        return rows + mask.expand(scores.shape)[idx].to(fp32) if mask is not None else rows

    p = softmax_(s, row_inputs).to(scores.dtype)
    if dropout_p == 0.0:
        return p, p, None
    keep = dropout_keep(p.shape, dropout_p, seed, offset, p.device)
    # (bool operands go through `where`: arithmetic with a bool tensor first copies it to float)
    out = torch.where(keep, p, 0.0)  # P_d = P ⊙ keep
    if not return_keep:
        # P >= 0, so its sign bit is free: store -P where kept, +P where dropped (P - 2·P_d, exact, in place).
        # The backward reads the mask back from the signs: no stored mask, no second RNG run.
        p.add_(out, alpha=-2.0)
    out.mul_(1.0 / (1.0 - dropout_p))
    return p, out, keep if return_keep else None


def masked_softmax_bwd(
    grad: torch.Tensor,
    p: torch.Tensor,
    scale: float,
    dropout_p: float,
    keep: torch.Tensor | None = None,
    need_mask_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of masked_softmax_fwd's `out` w.r.t. scores (and w.r.t. the mask's broadcast input).

    dX = P * (dP - rowsum(dP * P)) with dP = grad * keep / (1 - dropout_p); dscores = scale * dX; dmask = dX
    (the caller sums it to the mask's shape). With dropout and no `keep`, `p` is the sign-encoded P of the
    forward (-P where kept); entries with P = 0 get keep = False, which changes nothing (their dX is 0).

    Returns:
        (dscores, dX or None): dX only when `need_mask_grad`.
    """
    c = 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0
    # softmax backward is linear in dP: fold 1/(1-p) and, unless dX itself is needed, the scale into one pass
    fold = c if need_mask_grad else c * scale
    if dropout_p > 0.0:
        if keep is None:
            keep = p < 0
            p = p.abs()
        dp = torch.where(keep, grad.to(p.dtype), 0.0)
        if fold != 1.0:
            dp.mul_(fold)
        dx = softmax_backward_(dp, p)
    elif fold != 1.0:
        dx = softmax_backward_((grad * fold).to(p.dtype), p)
    else:  # nothing to fold: the out-of-place kernel allocates the result
        dx = torch._softmax_backward_data(grad.to(p.dtype), p, -1, p.dtype)
    if not need_mask_grad:
        return dx, None
    return dx * scale if scale != 1.0 else dx.clone(), dx
