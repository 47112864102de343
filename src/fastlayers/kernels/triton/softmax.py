"""Triton masked softmax + seeded dropout, forward and backward: a block of whole rows per program.

Design after the Triton tutorial 02 (fused softmax: a row in registers, `other=-inf`), with the additive mask
read through its own strides (stride 0 on broadcast dims) and dropout drawn with `tl.rand(key, element index)`:
- https://triton-lang.org/main/getting-started/tutorials/02-fused-softmax.html
Rows whose every entry is -inf give 0 (guarded max and 1/sum), never NaN.
"""

import torch
import triton
import triton.language as tl

from fastlayers.kernels.triton.aot import AotSpec
from fastlayers.utils import cdiv, next_pow2

# A row lives in registers (16 warps x 32 lanes x 8 elements at most: tl.rand's Philox state is the register
# bound; 16 elements per lane spill at sm_90); longer rows go to the torch backend.
MAX_S_K = 4096
_ELEMS_PER_PROGRAM = 2048  # short rows: pack several per program so each program moves ~2k elements


def dropout_key(seed: int, offset: int) -> int:
    """Fold (seed, offset) into one 63-bit Philox key (as `fastlayers.utils.keep_mask` folds them)."""
    return (int(seed) + 0x9E3779B97F4A7C15 * int(offset)) % (2**63)


def _config(s_k: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) for rows of s_k elements."""
    block_n = max(16, next_pow2(s_k))
    rows = max(1, min(16, _ELEMS_PER_PROGRAM // block_n))
    num_warps = min(max(block_n // 256, 4), 16)  # <= 8 elements per thread for rows >= 1024
    return block_n, rows, num_warps


@triton.jit
def _masked_softmax_fwd_kernel(
    X_ptr,  # scores, (B, H, S_q, S_k), any strides
    M_ptr,  # additive mask broadcast to (B, H, S_q, S_k) through strides (0 on broadcast dims)
    P_ptr,  # softmax output, contiguous (B, H, S_q, S_k)
    Out_ptr,  # dropped output p * keep / (1 - dropout_p), contiguous; unused without dropout
    Keep_ptr,  # int8 keep mask, contiguous; written when STORE_KEEP
    stride_xb,
    stride_xh,
    stride_xq,
    stride_xk,  #
    stride_mb,
    stride_mh,
    stride_mq,
    stride_mk,  #
    n_rows,
    H,
    S_q,
    S_k,  #
    scale,
    dropout_p,
    seed,  # seed: Philox key; element e (row-major index) draws tl.rand(seed, e)
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,  #
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_KEEP: tl.constexpr,
):
    # All maths in fp32; cast to the output element type at tl.store.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)  # (ROWS,) flat row index b*H*S_q + h*S_q + i
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    ok = (rows < n_rows)[:, None] & (cols < S_k)[None, :]
    b = rows // (H * S_q)
    h = (rows // S_q) % H
    i = rows % S_q
    x_off = (b * stride_xb + h * stride_xh + i * stride_xq)[:, None] + cols[None, :] * stride_xk
    x = tl.load(X_ptr + x_off, mask=ok, other=float("-inf")).to(tl.float32) * scale
    if HAS_MASK:
        m_off = (b * stride_mb + h * stride_mh + i * stride_mq)[:, None] + cols[None, :] * stride_mk
        x += tl.load(M_ptr + m_off, mask=ok, other=0.0).to(tl.float32)
    x = tl.where(ok, x, float("-inf"))
    # -- softmax with a guard for rows that are all -inf (max -inf -> use 0, sum 0 -> p = 0) --
    row_max = tl.max(x, axis=1)
    dead = row_max == float("-inf")
    row_max = tl.where(dead, 0.0, row_max)
    e = tl.exp2((x - row_max[:, None]) * 1.4426950408889634)  # 1/ln(2): exp via exp2
    denom = tl.sum(e, axis=1)  # NaN inputs make it NaN, so they stay NaN in p
    inv = tl.where(dead, 0.0, 1.0 / tl.where(dead, 1.0, denom))
    p = e * inv[:, None]
    o_off = rows[:, None] * S_k + cols[None, :]  # contiguous outputs; also the dropout element index
    tl.store(P_ptr + o_off, p.to(P_ptr.dtype.element_ty), mask=ok)
    if HAS_DROPOUT:
        keep = tl.rand(seed, o_off) >= dropout_p
        out = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        tl.store(Out_ptr + o_off, out.to(Out_ptr.dtype.element_ty), mask=ok)
        if STORE_KEEP:
            tl.store(Keep_ptr + o_off, keep.to(tl.int8), mask=ok)


@triton.jit
def _masked_softmax_bwd_kernel(
    G_ptr,  # grad of the (dropped) output, (B, H, S_q, S_k), any strides
    P_ptr,  # saved softmax output, contiguous
    Keep_ptr,  # int8 keep mask, contiguous; read when LOAD_KEEP, else regenerated from seed
    DX_ptr,  # grad of scores, contiguous
    stride_gb,
    stride_gh,
    stride_gq,
    stride_gk,  #
    n_rows,
    H,
    S_q,
    S_k,  #
    scale,
    dropout_p,
    seed,  #
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,  #
    HAS_DROPOUT: tl.constexpr,
    LOAD_KEEP: tl.constexpr,
):
    # dS = scale * P * (dP - rowsum(dP * P)), dP = G * keep / (1 - dropout_p); fp32 maths.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    ok = (rows < n_rows)[:, None] & (cols < S_k)[None, :]
    b = rows // (H * S_q)
    h = (rows // S_q) % H
    i = rows % S_q
    g_off = (b * stride_gb + h * stride_gh + i * stride_gq)[:, None] + cols[None, :] * stride_gk
    dp = tl.load(G_ptr + g_off, mask=ok, other=0.0).to(tl.float32)
    o_off = rows[:, None] * S_k + cols[None, :]
    p = tl.load(P_ptr + o_off, mask=ok, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        if LOAD_KEEP:
            keep = tl.load(Keep_ptr + o_off, mask=ok, other=0) != 0
        else:
            keep = tl.rand(seed, o_off) >= dropout_p  # the forward's stream, regenerated
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    r = tl.sum(dp * p, axis=1)
    dx = p * (dp - r[:, None]) * scale
    tl.store(DX_ptr + o_off, dx.to(DX_ptr.dtype.element_ty), mask=ok)


def _mask_strides(mask: torch.Tensor | None, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    if mask is None:
        return (0, 0, 0, 0)
    return tuple(mask.expand(shape).stride())  # broadcast dims get stride 0


def masked_softmax_fwd(
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    seed: int,
    offset: int,
    return_mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """softmax(scale*scores + mask) then dropout.

    Args:
        scores: (B, H, S_q, S_k), any strides; mask broadcastable to it (any float dtype) or None.
        dropout_p: 0 disables dropout; return_mask: also return the bool keep mask the kernel drew.

    Returns:
        (out, p, keep): out the dropped probabilities (p itself without dropout), p the softmax output, both
        contiguous (B, H, S_q, S_k) in scores' dtype; keep bool (B, H, S_q, S_k) or None.
    """
    shape = tuple(scores.shape)
    b, h, s_q, s_k = shape
    if s_k > MAX_S_K:
        raise ValueError(f"masked_softmax_fwd: S_k={s_k} > {MAX_S_K} does not fit one row per program")
    p = torch.empty(shape, dtype=scores.dtype, device=scores.device)
    has_dropout = dropout_p > 0.0
    out = torch.empty_like(p) if has_dropout else p
    store_keep = has_dropout and return_mask
    keep = torch.empty(shape, dtype=torch.int8, device=scores.device) if store_keep else p
    n_rows = b * h * s_q
    block_n, rows, num_warps = _config(s_k)
    _masked_softmax_fwd_kernel[(cdiv(n_rows, rows),)](
        scores,
        mask if mask is not None else scores,
        p,
        out,
        keep,  #
        *scores.stride(),
        *_mask_strides(mask, shape),  #
        n_rows,
        h,
        s_q,
        s_k,  #
        float(scale),
        float(dropout_p),
        dropout_key(seed, offset),  #
        BLOCK_N=block_n,
        ROWS=rows,
        HAS_MASK=mask is not None,
        HAS_DROPOUT=has_dropout,
        STORE_KEEP=store_keep,  #
        num_warps=num_warps,
    )
    return out, p, keep.view(torch.bool) if store_keep else None


def masked_softmax_bwd(
    grad: torch.Tensor,
    p: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    offset: int,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. scores of masked_softmax_fwd's `out`; keep (bool) is read when given, else regenerated.

    Args:
        grad: (B, H, S_q, S_k), any strides; p: the forward's contiguous softmax output.

    Returns:
        dscores: contiguous (B, H, S_q, S_k), dtype of p.
    """
    b, h, s_q, s_k = p.shape
    dx = torch.empty_like(p)
    n_rows = b * h * s_q
    block_n, rows, num_warps = _config(s_k)
    has_dropout = dropout_p > 0.0
    load_keep = has_dropout and keep is not None
    _masked_softmax_bwd_kernel[(cdiv(n_rows, rows),)](
        grad,
        p,
        keep.view(torch.int8) if load_keep else p,
        dx,  #
        *grad.stride(),  #
        n_rows,
        h,
        s_q,
        s_k,  #
        float(scale),
        float(dropout_p),
        dropout_key(seed, offset),  #
        BLOCK_N=block_n,
        ROWS=rows,
        HAS_DROPOUT=has_dropout,
        LOAD_KEEP=load_keep,  #
        num_warps=num_warps,
    )
    return dx


def _strides(prefix: str) -> list[str]:
    return [f"stride_{prefix}{d}" for d in "bhqk"]


def _fwd_spec(dt: str, s_k: int) -> AotSpec:
    block_n, rows, num_warps = _config(s_k)
    sig = dict(X_ptr=dt, M_ptr=dt, P_ptr=dt, Out_ptr=dt, Keep_ptr="*i8")
    sig.update({k: "i32" for k in (*_strides("x"), *_strides("m"))})
    sig.update(n_rows="i32", H="i32", S_q="i32", S_k="i32", scale="fp32", dropout_p="fp32", seed="i64")
    flags = dict(HAS_MASK=True, HAS_DROPOUT=True, STORE_KEEP=True)
    sig.update({k: "constexpr" for k in ("BLOCK_N", "ROWS", *flags)})
    return AotSpec(
        name=f"masked_softmax_fwd[{dt[1:]},S_k={s_k},mask+dropout+keep]",
        kernel=_masked_softmax_fwd_kernel,
        signature=sig,
        constexprs=dict(BLOCK_N=block_n, ROWS=rows, **flags),
        num_warps=num_warps,
    )


def _bwd_spec(dt: str, s_k: int, load_keep: bool) -> AotSpec:
    block_n, rows, num_warps = _config(s_k)
    sig = dict(G_ptr=dt, P_ptr=dt, Keep_ptr="*i8", DX_ptr=dt)
    sig.update({k: "i32" for k in _strides("g")})
    sig.update(n_rows="i32", H="i32", S_q="i32", S_k="i32", scale="fp32", dropout_p="fp32", seed="i64")
    flags = dict(HAS_DROPOUT=True, LOAD_KEEP=load_keep)
    sig.update({k: "constexpr" for k in ("BLOCK_N", "ROWS", *flags)})
    return AotSpec(
        name=f"masked_softmax_bwd[{dt[1:]},S_k={s_k},dropout{'+keep' if load_keep else ''}]",
        kernel=_masked_softmax_bwd_kernel,
        signature=sig,
        constexprs=dict(BLOCK_N=block_n, ROWS=rows, **flags),
        num_warps=num_warps,
    )


# Default configs: BERT's S = 128 (16 rows per program) and the longest row kept in registers (4096, 16 warps);
# every feature on (the most registers).
AOT_SPECS = [
    spec
    for dt in ("*fp32", "*fp16", "*bf16")
    for spec in (
        *(_fwd_spec(dt, s) for s in (128, MAX_S_K)),
        *(_bwd_spec(dt, s, False) for s in (128, MAX_S_K)),
        _bwd_spec(dt, 128, True),
    )
]
