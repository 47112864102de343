"""Readable reference for the training attention core: softmax(q kᵀ·scale + bias) with dropout, times v.

Follows flash-attn `flash_attn/utils/testing.py::attention_ref` (upcast option, (B, S, H, D) layout) and
DeepSpeed's attention steps (deepspeed-behaviour §1.3 steps 3–6).
"""

from __future__ import annotations

import math

import torch

from fastlayers.reference.softmax import apply_dropout_ref, safe_softmax_ref


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_bias: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    keep_mask: torch.Tensor | None = None,
    causal: bool = False,
    upcast: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention with an additive bias, causal option and inverted dropout on the probabilities.

    Equation (per batch b and head h):
        s = q kᵀ · softmax_scale + attn_bias   (+ -inf above the diagonal when causal)
        p = softmax(s) over keys; rows whose every entry is -inf give p = 0 (so output 0)
        out = (p * keep_mask / (1 - dropout_p)) v

    Causal masking is top-left aligned (as `F.scaled_dot_product_attention(is_causal=True)`): query i sees keys
    j <= i.

    Args:
        q: (B, S_q, H, D).
        k, v: (B, S_k, H, D), same dtype as q.
        attn_bias: additive, broadcastable to (B, H, S_q, S_k), e.g. (B, 1, 1, S_k) padding masks (0 / -10000 or -inf).
        softmax_scale: default 1/sqrt(D).
        dropout_p: probability of dropping an attention probability, in [0, 1).
        keep_mask: bool (B, H, S_q, S_k), True = keep; required when dropout_p > 0.
        causal: add the causal mask.
        upcast: compute in fp32 and cast the output back to q's dtype.

    Returns:
        (B, S_q, H, D), dtype of q.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
        attn_bias = attn_bias.float() if attn_bias is not None else None
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    qh = q.transpose(1, 2)  # (B, H, S_q, D)
    kh = k.transpose(1, 2)  # (B, H, S_k, D)
    vh = v.transpose(1, 2)  # (B, H, S_k, D)
    s = torch.matmul(qh, kh.transpose(-2, -1)) * scale  # (B, H, S_q, S_k)
    if attn_bias is not None:
        s = s + attn_bias.to(s.dtype)
    if causal:
        s_q, s_k = s.shape[-2], s.shape[-1]
        above = torch.ones(s_q, s_k, dtype=torch.bool, device=s.device).triu(1)  # key j > query i
        s = s.masked_fill(above, float("-inf"))
    p = safe_softmax_ref(s, dim=-1)
    p = apply_dropout_ref(p, dropout_p, keep_mask)
    out = torch.matmul(p, vh)  # (B, H, S_q, D)
    return out.transpose(1, 2).to(dtype)  # (B, S_q, H, D)
