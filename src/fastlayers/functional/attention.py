"""`attention`: the training attention core softmax(q kᵀ·scale + bias) v with seeded dropout on the probabilities.

Backends: `reference` (reference/attention.py), `torch` (kernels/torch/attention.py: batched GEMMs, in-place
softmax, saves P), `triton` (kernels/triton/attention.py: flash-attention style, saves out + lse only).
"""

from __future__ import annotations

import math
import numbers

import torch

from fastlayers import backends
from fastlayers.backends import Impl
from fastlayers.functional.softmax import check_additive_mask, check_dropout_p
from fastlayers.kernels.torch import attention as torch_attention
from fastlayers.reference.attention import attention_ref
from fastlayers.utils import FLOAT_DTYPES, check_tensor, dtype_name, keep_mask, new_seed

TRITON_MAX_HEAD_DIM = 128


class AttentionTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_bias, softmax_scale, dropout_p, seed, offset, causal, dropout_checkpoint):
        store_keep = dropout_p > 0.0 and not dropout_checkpoint
        out, p, q3, k3, v3, keep = torch_attention.attention_fwd(
            q, k, v, attn_bias, softmax_scale, dropout_p, seed, offset, causal, return_keep=store_keep
        )
        ctx.scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
        ctx.dropout_p = dropout_p
        ctx.bias_shape = None if attn_bias is None else attn_bias.shape
        ctx.bias_dtype = None if attn_bias is None else attn_bias.dtype
        if any(t is not None and t.requires_grad for t in (q, k, v, attn_bias)):
            ctx.save_for_backward(q3, k3, v3, p, keep)
        return out

    @staticmethod
    def backward(ctx, dout):
        q3, k3, v3, p, keep = ctx.saved_tensors
        need_bias_grad = ctx.bias_shape is not None and ctx.needs_input_grad[3]
        dq, dk, dv, ds = torch_attention.attention_bwd(
            dout, q3, k3, v3, p, ctx.scale, ctx.dropout_p, keep, need_bias_grad
        )
        dbias = ds.sum_to_size(ctx.bias_shape).to(ctx.bias_dtype) if need_bias_grad else None
        return dq, dk, dv, dbias, None, None, None, None, None, None  # scale, p, seed, offset, causal, checkpoint


class AttentionTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_bias, softmax_scale, dropout_p, seed, offset, causal, dropout_checkpoint):
        from fastlayers.kernels.triton.attention import attention_fwd

        scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
        out, lse = attention_fwd(q, k, v, attn_bias, scale, dropout_p, seed, offset, causal)
        ctx.scale, ctx.dropout_p, ctx.seed, ctx.offset, ctx.causal = scale, dropout_p, seed, offset, causal
        ctx.mark_non_differentiable(lse)
        if any(t.requires_grad for t in (q, k, v)):
            ctx.save_for_backward(q, k, v, attn_bias, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        from fastlayers.kernels.triton.attention import attention_bwd

        q, k, v, attn_bias, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(
            dout, q, k, v, attn_bias, out, lse, ctx.scale, ctx.dropout_p, ctx.seed, ctx.offset, ctx.causal
        )
        return dq, dk, dv, None, None, None, None, None, None, None  # bias, scale, p, seed, offset, causal, ckpt


def _reference_impl(q, k, v, *, attn_bias, softmax_scale, dropout_p, seed, offset, causal, dropout_checkpoint):
    keep = None
    if dropout_p > 0.0:
        b, s_q, h, _ = q.shape
        keep = keep_mask((b, h, s_q, k.shape[1]), dropout_p, seed, q.device, offset)
    return attention_ref(
        q,
        k,
        v,
        attn_bias=attn_bias,
        softmax_scale=softmax_scale,
        dropout_p=dropout_p,
        keep_mask=keep,
        causal=causal,
        upcast=q.dtype in (torch.float16, torch.bfloat16),
    )


def _torch_impl(q, k, v, *, attn_bias, softmax_scale, dropout_p, seed, offset, causal, dropout_checkpoint):
    bias_grad = torch.is_grad_enabled() and attn_bias is not None and attn_bias.requires_grad
    if dropout_p == 0.0 and not bias_grad:  # no dropout: SDPA's fused kernel (its own backward saves out + lse)
        return torch_attention.sdpa_attention(q, k, v, attn_bias, softmax_scale, causal)
    return AttentionTorchFunction.apply(
        q, k, v, attn_bias, softmax_scale, dropout_p, seed, offset, causal, dropout_checkpoint
    )


def _triton_impl(q, k, v, *, attn_bias, softmax_scale, dropout_p, seed, offset, causal, dropout_checkpoint):
    return AttentionTritonFunction.apply(
        q, k, v, attn_bias, softmax_scale, dropout_p, seed, offset, causal, dropout_checkpoint
    )


def _triton_reasons(q=None, k=None, attn_bias=None, **_) -> list[str]:
    reasons = []
    if q is not None and q.shape[-1] > TRITON_MAX_HEAD_DIM:
        reasons.append(f"head dim D={q.shape[-1]} > {TRITON_MAX_HEAD_DIM}")
    if q is not None and q.device.type == "cuda" and q.dtype == torch.float32:
        reasons.append("fp32 on CUDA: the Triton attention kernels are built for fp16/bf16 (torch backend runs fp32)")
    if q is not None and q.shape[-1] < 16:
        reasons.append(f"head dim D={q.shape[-1]} < 16 (tl.dot needs K >= 16)")
    if attn_bias is not None and torch.is_grad_enabled() and attn_bias.requires_grad:
        reasons.append("attn_bias requires grad: the Triton backward gives no bias gradient (use backend='torch')")
    return reasons


backends.register(Impl("attention", "reference", "fastlayers.functional.attention:_reference_impl"))
backends.register(Impl("attention", "torch", "fastlayers.functional.attention:_torch_impl"))
backends.register(
    Impl(
        "attention",
        "triton",
        "fastlayers.functional.attention:_triton_impl",
        devices=frozenset({"cuda"}),
        check=_triton_reasons,
    )
)


def _validate(q, k, v, attn_bias, softmax_scale, dropout_p) -> None:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, k, v must share a dtype, got q {dtype_name(q.dtype)}, k {dtype_name(k.dtype)}, v {dtype_name(v.dtype)}"
        )
    (b, s_q, h, d), (bk, s_k, hk, dk) = q.shape, k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"k and v must have the same shape (B, S_k, H, D), got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if bk != b:
        raise ValueError(f"batch mismatch: q has B={b}, k/v have B={bk}")
    if hk != h:
        raise ValueError(f"head count mismatch: q has H={h}, k/v have H={hk} (layout is (B, S, H, D))")
    if dk != d:
        raise ValueError(f"head dim mismatch: q has D={d}, k/v have D={dk}")
    if attn_bias is not None:
        check_additive_mask("attn_bias", attn_bias, (b, h, s_q, s_k), q)
    if softmax_scale is not None and not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a real number or None, got {type(softmax_scale).__name__}")
    check_dropout_p(dropout_p)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_bias: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    offset: int = 0,
    causal: bool = False,
    dropout_checkpoint: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with an additive bias and seeded dropout on the probabilities (training core).

    out = dropout(softmax(q kᵀ·softmax_scale + attn_bias)) v per (batch, head). Rows whose every score is -inf
    (fully masked) give zero output and zero gradients, never NaN. `causal` is top-left aligned: query i sees
    keys j <= i (as SDPA's `is_causal`). Pass `dropout_p=0` for evaluation.

    Args:
        q: (B, S_q, H, D); strided views (e.g. of a fused qkv projection) are fine.
        k, v: (B, S_k, H, D), same dtype and device as q.
        attn_bias: additive, broadcastable to (B, H, S_q, S_k): (B, 1, 1, S_k), (B, 1, S_q, S_k), (B, H, S_q, S_k) or
            (S_q, S_k); 0 keeps, -10000 or -inf masks. Any float dtype (cast to q's).
        softmax_scale: default 1/sqrt(D).
        dropout_p: drop probability of attention probabilities, in [0, 1).
        seed: dropout seed; None draws one from torch's global RNG (so `torch.manual_seed` reproduces).
        offset: separates several dropouts sharing one seed.
        causal: add a causal mask.
        dropout_checkpoint: torch backend: True saves only P (the keep bits ride in P's sign bit, P >= 0, so the
            backward gets the mask back without storing it or re-running the RNG); False also saves the bool mask.
            Results are identical. The Triton backend always regenerates the mask (nothing [S, S] saved).
        backend: "reference" | "torch" | "triton" | None (automatic, see `fastlayers.backends`).

    Returns:
        (B, S_q, H, D), dtype of q.

    Equivalent PyTorch: `fastlayers.reference.attention.attention_ref` with the backend's keep mask.

    Backends: reference (any), torch (any device/dtype; its own Function saving q, k, v and P; when dropout_p == 0
    and attn_bias needs no gradient, F.scaled_dot_product_attention's fused kernel and its backward, which save
    out and the log-sum-exp instead of P; gives attn_bias a gradient when it requires one), triton (CUDA fp16/bf16
    or the CPU interpreter fp16/fp32; 16 <= D <= 128; attn_bias without grad). Keep masks differ between torch
    (same bits as reference) and triton (`tl.rand`).
    """
    _validate(q, k, v, attn_bias, softmax_scale, dropout_p)
    dropout_p = float(dropout_p)
    if not isinstance(offset, int):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if dropout_p > 0.0 and seed is None:
        seed = new_seed()
    seed = 0 if seed is None else int(seed)
    impl = backends.select("attention", backend, q=q, k=k, v=v, attn_bias=attn_bias, dropout_p=dropout_p, causal=causal)
    return impl.resolve()(
        q,
        k,
        v,
        attn_bias=attn_bias,
        softmax_scale=softmax_scale,
        dropout_p=dropout_p,
        seed=seed,
        offset=offset,
        causal=causal,
        dropout_checkpoint=dropout_checkpoint,
    )


__all__ = ["attention", "AttentionTorchFunction", "AttentionTritonFunction"]
