"""Block-sparse self-attention (DeepSpeed `SparseSelfAttention`'s sdd -> softmax -> dsd), one public op.

Backends: `reference` (dense, readable), `torch` (gathers only the kept blocks, SDPA per group of rows;
autograd), `triton` (flash-style kernel over the kept blocks, from a CSR index of the layout).
"""

from __future__ import annotations

import numbers

import torch

from fastlayers import backends
from fastlayers.backends import Impl
from fastlayers.utils import FLOAT_DTYPES, check_tensor, describe, dtype_name

TRITON_BLOCKS = (16, 32, 64, 128)
TRITON_MAX_HEAD_DIM = 256
MASK_MODES = ("add", "mul")
LAYOUT_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _validate(q, k, v, layout, block, softmax_scale, rpe, key_padding_mask, attn_mask, kpm_mode, am_mode) -> None:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, H, S, D = q.shape
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, shape=(B, H, S, D), device=q.device)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {dtype_name(q.dtype)}, got {dtype_name(t.dtype)}")
    if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if S % block != 0:
        raise ValueError(f"sequence length {S} must be a multiple of block={block}")
    if D == 0 or S == 0:
        raise ValueError(f"q must have a nonzero sequence length and head dim, got shape {tuple(q.shape)}")
    nb = S // block
    check_tensor("layout", layout, shape=(H, nb, nb), dtypes=LAYOUT_DTYPES)
    if layout.dtype != torch.bool:
        lo, hi = torch.aminmax(layout)  # one pass (the layout has H·(S/block)² entries)
        if bool(lo < 0) or bool(hi > 1):
            raise ValueError(f"layout must hold only 0 and 1, got values in [{int(lo)}, {int(hi)}]")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real)):
        raise TypeError(f"softmax_scale must be a float or None, got {softmax_scale!r}")
    for name, mode in (("key_padding_mask_mode", kpm_mode), ("attn_mask_mode", am_mode)):
        if mode not in MASK_MODES:
            raise ValueError(f"{name} must be one of {MASK_MODES}, got {mode!r}")
    if rpe is not None:
        check_tensor("rpe", rpe, ndim=4, device=q.device)
        if rpe.shape[0] not in (1, B) or tuple(rpe.shape[1:]) != (H, S, S):
            raise ValueError(f"rpe must have shape ({B} or 1, {H}, {S}, {S}), got {tuple(rpe.shape)}")
        if rpe.dtype != q.dtype:
            raise TypeError(f"rpe must have q's dtype {dtype_name(q.dtype)}, got {dtype_name(rpe.dtype)}")
    for name, t, shape, mode in (
        ("key_padding_mask", key_padding_mask, (B, S), kpm_mode),
        ("attn_mask", attn_mask, (S, S), am_mode),
    ):
        if t is None:
            continue
        check_tensor(name, t, shape=shape, device=q.device)
        if mode == "add" and not t.is_floating_point():
            raise TypeError(f"{name} in 'add' mode must be a float tensor, got {describe(t)}")
        if mode == "mul" and t.is_complex():
            raise TypeError(f"{name} in 'mul' mode must be real (0 = masked), got {describe(t)}")


def _triton_reasons(q=None, block=None, **inputs) -> list[str]:
    reasons = []
    if block not in TRITON_BLOCKS:
        reasons.append(f"block={block} not supported (triton supports {TRITON_BLOCKS})")
    if q is not None and q.shape[-1] > TRITON_MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {TRITON_MAX_HEAD_DIM}")
    masks = {n: inputs.get(n) for n in ("key_padding_mask", "attn_mask")}
    grads = [n for n, t in masks.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if grads and torch.is_grad_enabled():
        reasons.append(f"no gradient for {', '.join(grads)} (the masks are constants for triton; rpe has one)")
    return reasons


class BlockSparseAttentionTorchFunction(torch.autograd.Function):
    """CPU fast path: ATen's CPU flash kernels, gradients written in place (masks, rpe constant).

    Two plans (documented dispatch, same maths): without rpe and masks, a layout whose diagonal band holds a fair
    share of the kept blocks (BigBird, sliding windows) runs the band path (`band_attention_cpu_fwd`: strided
    K/V views for the band, full rows, global columns, the rest grouped; merged through log-sum-exps); any
    other input runs the grouped path (`block_sparse_attention_cpu_fwd`)."""

    @staticmethod
    def forward(ctx, q, k, v, layout, block, scale, rpe, kpm, am):
        from fastlayers.kernels.torch import block_sparse as kt

        needs_grad = any(t.requires_grad for t in (q, k, v))
        band = None
        if rpe is None and kpm is None and am is None:
            band = kt.get_band_plan(layout, q.device)
        if band is not None:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            out, lse = kt.band_attention_cpu_fwd(q, k, v, band, block, scale)
            lses, plan = [lse], band
        else:
            plan = kt.get_plan(layout, q.device)
            out, lses = kt.block_sparse_attention_cpu_fwd(q, k, v, plan, block, scale, rpe, kpm, am)
        if needs_grad:
            ctx.save_for_backward(q, k, v, out, rpe, kpm, am, *lses)
            ctx.plan, ctx.block, ctx.scale, ctx.band = plan, block, scale, band is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        from fastlayers.kernels.torch import block_sparse as kt

        q, k, v, out, rpe, kpm, am, *lses = ctx.saved_tensors
        if ctx.band:
            dq, dk, dv = kt.band_attention_cpu_bwd(
                dout.contiguous(), q, k, v, out, lses[0], ctx.plan, ctx.block, ctx.scale
            )
        else:
            dq, dk, dv = kt.block_sparse_attention_cpu_bwd(
                dout.contiguous(), q, k, v, out, lses, ctx.plan, ctx.block, ctx.scale, rpe, kpm, am
            )
        return dq, dk, dv, None, None, None, None, None, None  # layout, block, scale, rpe, kpm, am


def _torch_impl(
    q, k, v, layout, *, block, softmax_scale, rpe, key_padding_mask, attn_mask, key_padding_mask_mode, attn_mask_mode
) -> torch.Tensor:
    from fastlayers.kernels.torch import block_sparse as kt

    biases = (rpe, key_padding_mask, attn_mask)
    bias_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in biases)
    if q.device.type == "cpu" and not bias_grad and kt.flash_cpu_available():
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
        kpm = (
            kt.additive_mask(key_padding_mask, key_padding_mask_mode, q.dtype) if key_padding_mask is not None else None
        )
        am = kt.additive_mask(attn_mask, attn_mask_mode, q.dtype) if attn_mask is not None else None
        return BlockSparseAttentionTorchFunction.apply(q, k, v, layout, block, scale, rpe, kpm, am)
    # Other devices, or a bias that needs its gradient: autograd through the composed ops (SDPA per group).
    return kt.block_sparse_attention_fwd(
        q,
        k,
        v,
        layout,
        block,
        softmax_scale,
        rpe,
        key_padding_mask,
        attn_mask,
        key_padding_mask_mode,
        attn_mask_mode,
    )


class BlockSparseAttentionTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rpe, layout, block, scale, kpm, am, kpm_mode, am_mode):
        from fastlayers.kernels.triton.block_sparse_attention import block_sparse_attention_fwd, layout_index

        index = layout_index(layout, q.device)
        out, lse = block_sparse_attention_fwd(q, k, v, index, block, scale, rpe, kpm, am, kpm_mode, am_mode)
        if any(t is not None and t.requires_grad for t in (q, k, v, rpe)):
            ctx.save_for_backward(q, k, v, rpe, kpm, am, out, lse)
            ctx.index = index
        ctx.args = (block, scale, kpm_mode, am_mode, None if rpe is None else rpe.shape[0])
        return out

    @staticmethod
    def backward(ctx, dout):
        from fastlayers.kernels.triton.block_sparse_attention import block_sparse_attention_bwd

        q, k, v, rpe, kpm, am, out, lse = ctx.saved_tensors
        block, scale, kpm_mode, am_mode, _ = ctx.args
        dq, dk, dv, drpe = block_sparse_attention_bwd(
            dout,
            q,
            k,
            v,
            out,
            lse,
            ctx.index,
            block,
            scale,
            rpe,
            kpm,
            am,
            kpm_mode,
            am_mode,
            need_drpe=rpe is not None and ctx.needs_input_grad[3],
        )
        return dq, dk, dv, drpe, None, None, None, None, None, None, None  # layout, block, scale, masks, modes


def _triton_impl(
    q, k, v, layout, *, block, softmax_scale, rpe, key_padding_mask, attn_mask, key_padding_mask_mode, attn_mask_mode
) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return BlockSparseAttentionTritonFunction.apply(
        q, k, v, rpe, layout, block, scale, key_padding_mask, attn_mask, key_padding_mask_mode, attn_mask_mode
    )


backends.register(
    Impl("block_sparse_attention", "reference", "fastlayers.reference.block_sparse:block_sparse_attention_ref")
)
backends.register(Impl("block_sparse_attention", "torch", "fastlayers.functional.block_sparse:_torch_impl"))
backends.register(
    Impl(
        "block_sparse_attention",
        "triton",
        "fastlayers.functional.block_sparse:_triton_impl",
        devices=frozenset({"cuda"}),
        check=_triton_reasons,
    )
)


def block_sparse_attention(
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
    backend: str | None = None,
) -> torch.Tensor:
    """Self-attention restricted to the kept blocks of a block layout (DeepSpeed `SparseSelfAttention` maths).

    scores = q·kᵀ·scale + rpe + kpm + am inside the kept blocks (layout[h, i//block, j//block] != 0), -inf
    outside; out = softmax(scores) @ v. Masks: "mul" mode turns 0 into -inf and nonzero into 0; "add" mode adds
    the values. A query row with no allowed key gives zeros (DeepSpeed gives NaN) and zero gradients.

    Args:
        q, k, v: (B, H, S, D), fp16/bf16/fp32 (fp64 on the reference and torch backends), same dtype and device.
        layout: (H, S/block, S/block), bool or int holding 0/1 (e.g. `SparsityConfig.make_layout(S)`); any device.
        block: block size in tokens; S must be a multiple of it (triton: 16, 32, 64 or 128).
        softmax_scale: multiplies q·kᵀ; default D**-0.5.
        rpe: (B or 1, H, S, S), q's dtype; dense additive relative-position bias; gets a gradient.
        key_padding_mask: (B, S) per key, mode `key_padding_mask_mode` ("add" needs a float tensor).
        attn_mask: (S, S) shared by batch and heads, mode `attn_mask_mode`.
        key_padding_mask_mode, attn_mask_mode: "add" or "mul".
        backend: "reference" | "torch" | "triton" | None (automatic, see `fastlayers.backends`).

    Returns:
        (B, H, S, D) in q's dtype.

    Equivalent PyTorch: `fastlayers.reference.block_sparse.block_sparse_attention_ref`.

    Backends: reference (everything, dense memory), torch (everything, memory linear in the kept blocks;
    gradients for q, k, v, rpe and float masks), triton (CUDA, blocks 16/32/64/128, D <= 256; gradients for
    q, k, v, rpe; masks are constants).
    """
    _validate(
        q, k, v, layout, block, softmax_scale, rpe, key_padding_mask, attn_mask, key_padding_mask_mode, attn_mask_mode
    )
    impl = backends.select(
        "block_sparse_attention",
        backend,
        q=q,
        k=k,
        v=v,
        rpe=rpe,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        block=block,
    )
    return impl.resolve()(
        q,
        k,
        v,
        layout,
        block=block,
        softmax_scale=softmax_scale,
        rpe=rpe,
        key_padding_mask=key_padding_mask,
        attn_mask=attn_mask,
        key_padding_mask_mode=key_padding_mask_mode,
        attn_mask_mode=attn_mask_mode,
    )
