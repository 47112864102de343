"""Block-sparse self-attention, dense and readable: the oracle for the torch and Triton backends.

Semantics follow DeepSpeed's `SparseSelfAttention` (sdd matmul -> block-sparse softmax -> dsd matmul), see
docs/deepspeed-behaviour.md §4.3-4.5, except that rows with no allowed key give zeros instead of NaN.
"""

from __future__ import annotations

import math

import torch

MASK_MODES = ("add", "mul")


def layout_to_dense_mask(layout: torch.Tensor, block: int) -> torch.Tensor:
    """Expand a block layout to a token-level boolean mask (True = the query may attend to the key).

    Args:
        layout: (H, nb, nb) or (nb, nb), int or bool, nonzero = the block is kept.
        block: block size in tokens.

    Returns:
        bool (H, nb·block, nb·block) (or (nb·block, nb·block) for a 2-D layout).
    """
    keep = layout != 0
    return keep.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)


def mask_to_additive(mask: torch.Tensor, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """DeepSpeed's mask modes as an additive mask: "mul": 0 -> -inf, nonzero -> 0; "add": the values themselves."""
    if mode == "add":
        return mask.to(dtype)
    if mode == "mul":
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask == 0, torch.tensor(float("-inf"), dtype=dtype, device=mask.device), zero)
    raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    *,
    block: int,
    softmax_scale: float | None = None,
    rpe: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask_mode: str = "add",
    attn_mask_mode: str = "mul",
    upcast: bool = False,
) -> torch.Tensor:
    """Block-sparse attention computed densely: softmax over the kept blocks only.

    scores[b, h, i, j] = q[b,h,i]·k[b,h,j]·scale + rpe[b,h,i,j] + kpm[b,j] + am[i,j]   if layout[h, i//block, j//block]
                       = -inf                                                          otherwise
    out = softmax(scores, dim=-1) @ v, with rows whose every score is -inf giving zeros (and zero gradients).

    Masks: in "mul" mode a mask value 0 becomes -inf and a nonzero value 0; in "add" mode the values are added.

    Args:
        q, k, v: (B, H, S, D), same dtype (any float dtype).
        layout: (H, S/block, S/block), int or bool; nonzero = the block is computed.
        block: block size in tokens (S must be a multiple of it).
        softmax_scale: multiplies q·kᵀ; default D**-0.5.
        rpe: (B or 1, H, S, S) additive relative-position bias (differentiable).
        key_padding_mask: (B, S), per key; mode `key_padding_mask_mode`.
        attn_mask: (S, S), shared by batch and heads; mode `attn_mask_mode`.
        upcast: compute in fp32 (fp64 stays fp64) and cast the result back.

    Returns:
        (B, H, S, D) in q's dtype.
    """
    B, H, S, D = q.shape
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    dtype = q.dtype
    if upcast and dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
        rpe = rpe.float() if rpe is not None else None
    cdt = q.dtype
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, S, S)
    if rpe is not None:
        scores = scores + rpe.to(cdt)  # (B|1, H, S, S) broadcasts over B
    if key_padding_mask is not None:
        scores = scores + mask_to_additive(key_padding_mask, key_padding_mask_mode, cdt)[:, None, None, :]
    if attn_mask is not None:
        scores = scores + mask_to_additive(attn_mask, attn_mask_mode, cdt)
    allowed = layout_to_dense_mask(layout.to(q.device), block)  # (H, S, S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # Safe softmax: a row with no finite score gives zeros, not NaN (DeepSpeed gives NaN there).
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    out = torch.matmul(p, v)
    return out.to(dtype)


def dense_mask_and_bias(
    layout: torch.Tensor, block: int, S: int, *, dtype: torch.dtype, device: torch.device | None = None
) -> torch.Tensor:
    """The additive (H, S, S) bias of a layout alone: 0 inside kept blocks, -inf outside (for SDPA comparisons)."""
    allowed = layout_to_dense_mask(layout.to(device), block)
    assert allowed.shape[-1] == S, f"layout covers {allowed.shape[-1]} tokens, not {S}"
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill(~allowed, -math.inf)
