"""Readable reference for the masked softmax with dropout (DeepSpeed's attention softmax, §1.3 steps 4–5).

Based on the naive softmax of Triton's tutorial `02-fused-softmax.py` (row max, exp, sum, divide).
"""

from __future__ import annotations

import torch


def safe_softmax_ref(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax over `dim`, where a slice whose every entry is -inf gives zeros (not NaN) and zero gradient.

    Equation: p_j = exp(x_j - m) / sum_k exp(x_k - m), m = max_k x_k; rows with m = -inf -> p = 0.
    """
    dead = torch.isneginf(x).all(dim=dim, keepdim=True)  # rows with no admissible entry
    x = x.masked_fill(dead, 0.0)  # any finite row: keeps softmax (and its grad) finite
    return torch.softmax(x, dim=dim).masked_fill(dead, 0.0)


def apply_dropout_ref(p: torch.Tensor, dropout_p: float, keep_mask: torch.Tensor | None) -> torch.Tensor:
    """Inverted dropout with a given keep mask: p * keep / (1 - dropout_p). `dropout_p == 0` -> p."""
    if dropout_p == 0.0:
        return p
    if keep_mask is None:
        raise ValueError(f"the reference needs keep_mask= when dropout_p > 0 (got dropout_p={dropout_p})")
    return p * keep_mask.to(p.dtype) / (1.0 - dropout_p)


def masked_softmax_ref(
    scores: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    keep_mask: torch.Tensor | None = None,
    training: bool = True,
    upcast: bool = False,
) -> torch.Tensor:
    """Softmax of scaled scores plus an additive mask over the last dim, then inverted dropout.

    Equation: p = softmax(scale * scores + mask, dim=-1) with all(-inf) rows -> 0;
    out = p * keep_mask / (1 - dropout_p) when training and dropout_p > 0, else p.

    Args:
        scores: (B, H, S_q, S_k), any float dtype.
        mask: additive, broadcastable to scores: (B, 1, 1, S_k), (B, 1, S_q, S_k), (B, H, S_q, S_k) or (S_q, S_k);
            0 keeps, large negative or -inf masks. No gradient flows to it through the fast backends.
        scale: multiplies the scores before the mask is added.
        dropout_p: drop probability in [0, 1).
        keep_mask: bool (B, H, S_q, S_k), True = keep; required when dropout applies.
        training: False disables dropout.
        upcast: compute in fp32 and cast back to the scores' dtype.

    Returns:
        (B, H, S_q, S_k), dtype of scores.
    """
    dtype = scores.dtype
    x = scores.float() if upcast else scores
    s = x * scale
    if mask is not None:
        s = s + mask.to(s.dtype)
    p = safe_softmax_ref(s, dim=-1)
    if training and dropout_p > 0.0:
        p = apply_dropout_ref(p, dropout_p, keep_mask)
    return p.to(dtype)
