"""Fast plain-PyTorch attention core (training): batched GEMMs + in-place softmax + seeded dropout.

Forward: S = (q·scale) kᵀ (scale folded into the one copy of q to (B·H, S_q, D)), S += bias (bias and the
causal mask pre-combined into one small additive tensor, so one pass), P = softmax(S) in place,
P_d = P ⊙ keep, out = (P_d v)/(1-p) (the 1/(1-p) folded into the copy back to (B, S_q, H, D)).
Backward: dV = P_dᵀ dO/(1-p), dP_d = dO vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)) in place with dP = dP_d ⊙ keep,
dQ = dS k·scale/(1-p), dK = dSᵀ (q·scale)/(1-p) (constants as GEMM alphas).
Dropout mask without storing it: P >= 0, so the forward stores -P where kept and +P where dropped in the one
saved P buffer; the backward reads the mask back from the sign bits (no RNG re-run, which costs about as much
as a GEMM here, no extra bytes). With `return_keep=True` the plain P and the bool mask are returned instead.
No autograd here; `functional/attention.py` wraps these.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastlayers.kernels.torch.softmax import dropout_keep, softmax_, softmax_backward_


def _heads_first(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(B, S, H, D) strided view -> contiguous (B·H, S, D), times `scale`, in one copy."""
    b, s, h, d = x.shape
    out = torch.empty((b, h, s, d), dtype=x.dtype, device=x.device)
    if scale == 1.0:
        out.copy_(x.transpose(1, 2))
    else:
        torch.mul(x.transpose(1, 2), scale, out=out)
    return out.view(b * h, s, d)


def _scaled_bmm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha · (a @ b) with alpha applied by the GEMM (beta = 0: the scalar input is ignored)."""
    if alpha == 1.0:
        return torch.bmm(a, b)
    return torch.baddbmm(a.new_zeros(()), a, b, beta=0.0, alpha=alpha)


def combined_bias(
    attn_bias: torch.Tensor | None, causal: bool, s_q: int, s_k: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """The additive bias plus the causal -inf mask (top-left aligned) as one tensor broadcastable to (B,H,S_q,S_k)."""
    if not causal:
        return attn_bias.to(dtype) if attn_bias is not None else None
    above = torch.ones(s_q, s_k, dtype=torch.bool, device=device).triu(1)  # key j > query i
    causal_bias = torch.zeros(s_q, s_k, dtype=dtype, device=device).masked_fill_(above, float("-inf"))
    return causal_bias if attn_bias is None else attn_bias.to(dtype) + causal_bias


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_bias: torch.Tensor | None,
    softmax_scale: float | None,
    dropout_p: float,
    seed: int,
    offset: int,
    causal: bool,
    return_keep: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Attention forward.

    Args:
        q: (B, S_q, H, D); k, v: (B, S_k, H, D) (strided views allowed); attn_bias broadcastable to
        (B, H, S_q, S_k) or None; dropout_p: 0 disables dropout; return_keep: also return the keep mask.

    Returns:
        (out, p, q3, k3, v3, keep): out (B, S_q, H, D) contiguous; p the softmax output P (B·H, S_q, S_k) in q's
        dtype -- sign-encoded with dropout unless return_keep (-P where kept, +P where dropped); q3 = q·scale,
        k3, v3 as contiguous (B·H, S, D) (what the backward needs); keep bool (B, H, S_q, S_k) or None.
    """
    b, s_q, h, d = q.shape
    s_k = k.shape[1]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    q3 = _heads_first(q, scale)  # (B·H, S_q, D), scaled
    k3 = _heads_first(k)  # (B·H, S_k, D)
    v3 = _heads_first(v)  # (B·H, S_k, D)
    s = torch.bmm(q3, k3.transpose(1, 2))  # (B·H, S_q, S_k)
    s4 = s.view(b, h, s_q, s_k)
    bias = combined_bias(attn_bias, causal, s_q, s_k, s.dtype, s.device)
    if bias is not None:
        s4.add_(bias)

    def row_inputs(idx):  # pre-softmax values of the (rare) rows that came out NaN
        rows = torch.einsum("nd,nkd->nk", q3.view(b, h, s_q, d)[idx], k3.view(b, h, s_k, d)[idx[:2]])
        return rows + bias.expand(b, h, s_q, s_k)[idx] if bias is not None else rows

    p = softmax_(s4, row_inputs).view(b * h, s_q, s_k)
    keep = None
    c = 1.0
    pd = p
    if dropout_p > 0.0:
        keep = dropout_keep((b, h, s_q, s_k), dropout_p, seed, offset, q.device)
        pd = torch.where(keep.view(b * h, s_q, s_k), p, 0.0)
        c = 1.0 / (1.0 - dropout_p)
    o = torch.bmm(pd, v3).view(b, h, s_q, d)
    if keep is not None and not return_keep:
        # P >= 0, so its sign bit is free: store -P where kept, +P where dropped (p - 2·P_d, exact). The
        # backward reads the keep mask back from the signs instead of re-running the RNG or saving a mask.
        p.add_(pd, alpha=-2.0)
    out = torch.empty((b, s_q, h, d), dtype=q.dtype, device=q.device)
    if c == 1.0:
        out.transpose(1, 2).copy_(o)
    else:
        torch.mul(o, c, out=out.transpose(1, 2))  # dropout's 1/(1-p) folded into the layout copy
    return out, p, q3, k3, v3, keep if return_keep else None


def attention_bwd(
    dout: torch.Tensor,
    q3: torch.Tensor,
    k3: torch.Tensor,
    v3: torch.Tensor,
    p: torch.Tensor,
    softmax_scale: float,
    dropout_p: float,
    keep: torch.Tensor | None = None,
    need_bias_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Attention backward from what attention_fwd saved.

    Args:
        dout: (B, S_q, H, D); q3 (= q·scale), k3, v3: (B·H, S, D); p: (B·H, S_q, S_k) softmax output;
        softmax_scale: the resolved scale; keep: the forward's mask, or None when p is sign-encoded (the forward ran
        with return_keep=False).
        need_bias_grad: also return dS (B, H, S_q, S_k), the gradient w.r.t. the additive bias before reduction.

    Returns:
        (dq, dk, dv, dS or None); dq (B, S_q, H, D), dk/dv (B, S_k, H, D) as strided views of (B, H, S, D) buffers.
    """
    b, s_q, h, d = dout.shape
    s_k = k3.shape[1]
    do3 = _heads_first(dout)  # (B·H, S_q, D)
    c = 1.0
    if dropout_p == 0.0:
        dv3 = torch.bmm(p.transpose(1, 2), do3)  # (B·H, S_k, D)
        dp = torch.bmm(do3, v3.transpose(1, 2))  # (B·H, S_q, S_k)
    elif keep is not None:
        c = 1.0 / (1.0 - dropout_p)
        keep3 = keep.view(b * h, s_q, s_k)
        dv3 = _scaled_bmm(torch.where(keep3, p, 0.0).transpose(1, 2), do3, c)  # P_d = P ⊙ keep
        dp = torch.where(keep3, torch.bmm(do3, v3.transpose(1, 2)), 0.0)  # dL/dP_d ⊙ keep, without the 1/(1-p)
    else:  # sign-encoded p (see attention_fwd): -P where kept; entries with P = 0 do not matter either way
        c = 1.0 / (1.0 - dropout_p)
        neg_pd = p.clamp_max(0.0)  # -P_d
        dv3 = _scaled_bmm(neg_pd.transpose(1, 2), do3, -c)
        dp = torch.bmm(do3, v3.transpose(1, 2)).masked_fill_(neg_pd >= 0, 0.0)
        del neg_pd
        p = p.abs()
    ds = softmax_backward_(dp, p)  # dS / c: the 1/(1-p) goes into the GEMM alphas below
    dq3 = _scaled_bmm(ds, k3, softmax_scale * c)  # (B·H, S_q, D)
    dk3 = _scaled_bmm(ds.transpose(1, 2), q3, c)  # (B·H, S_k, D); q3 already carries the scale
    dbias = None
    if need_bias_grad:
        dbias = ds.view(b, h, s_q, s_k)
        if c != 1.0:
            dbias.mul_(c)

    def back(x, s):  # (B·H, S, D) -> (B, S, H, D) view
        return x.view(b, h, s, d).transpose(1, 2)

    return back(dq3, s_q), back(dk3, s_k), back(dv3, s_k), dbias


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_bias: torch.Tensor | None,
    softmax_scale: float | None,
    causal: bool,
) -> torch.Tensor:
    """No-dropout attention through F.scaled_dot_product_attention's fused kernel; (B, S_q, H, D).

    Used whenever there is no dropout and attn_bias needs no gradient (SDPA's backward gives q, k, v theirs).
    Fully masked rows give 0 there too (torch >= 2.5).
    """
    s_q, s_k = q.shape[1], k.shape[1]
    if attn_bias is None:
        bias, is_causal = None, causal
    else:
        bias, is_causal = combined_bias(attn_bias, causal, s_q, s_k, q.dtype, q.device), False
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=bias,
        is_causal=is_causal,
        scale=softmax_scale,
    )  # (B, H, S_q, D)
    return out.transpose(1, 2)
