"""Triton flash attention for training: forward (online softmax, lse) and backward (dK/dV, dQ), seeded dropout.

Design after the Triton tutorial 06 (fused attention: online softmax in exp2, lse saved for the backward,
delta = rowsum(dO ⊙ O) preprocessing, separate dK/dV and dQ passes) and flash-attention v2:
- https://triton-lang.org/main/getting-started/tutorials/06-fused-attention.html
- https://arxiv.org/abs/2307.08691 (FlashAttention-2)
Additions: an additive bias read per tile through its strides (stride 0 on broadcast dims), ragged S_q/S_k by
bounds masks (no padding), head dims padded to a power of two inside the kernel (D = 80 -> BLOCK_D = 128),
dropout from `tl.rand(key, element index (b, h, i, j))` regenerated in the backward, and a guard for fully
masked rows (lse = -inf -> output 0, gradients 0). Layout (B, S, H, D) with any strides.
"""

import torch
import triton
import triton.language as tl

from fastlayers.kernels.triton._common import interpreting
from fastlayers.kernels.triton.aot import AotSpec
from fastlayers.utils import cdiv, next_pow2

LOG2E = 1.4426950408889634  # 1/ln(2): the kernels work in base 2 (exp2)
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 128


def dropout_key(seed: int, offset: int) -> int:
    """Fold (seed, offset) into one 62-bit Philox key base (the kernels add b*H + h, so it cannot overflow)."""
    return (int(seed) + 0x9E3779B97F4A7C15 * int(offset)) % (2**62)


def _check_int32_offsets(**extents: int) -> None:
    """Offsets inside one (b, h) head are int32 in the kernels: each extent·stride sum must stay below 2**31."""
    for name, value in extents.items():
        if value >= 2**31:
            raise ValueError(f"attention (triton): per-head offset range {name}={value} does not fit int32")


def _block_d(d: int) -> int:
    return max(16, next_pow2(d))


# Default GPU configs (BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim; all compile for sm_80 and
# sm_90 without spills with every feature on (see AOT_SPECS). tl.rand's Philox state is what bounds the tiles.
GPU_FWD_CONFIGS = {64: (64, 32, 4, 2), 128: (64, 32, 8, 2)}
GPU_BWD_CONFIGS = {64: (32, 32, 4, 2), 128: (32, 32, 8, 2)}
INTERPRETER_CONFIG = (64, 64, 4, 1)  # fewer, larger programs: the interpreter pays per program and per tl.dot


def _fwd_config(block_d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward."""
    return INTERPRETER_CONFIG if interpreting() else GPU_FWD_CONFIGS[max(64, block_d)]


def _bwd_config(block_d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of both backward kernels (and the preprocess's BLOCK_M)."""
    return INTERPRETER_CONFIG if interpreting() else GPU_BWD_CONFIGS[max(64, block_d)]


@triton.jit
def _attn_fwd_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,
    Bias_ptr,
    Out_ptr,
    Lse_ptr,  # Lse: (B*H, S_q) fp32, natural log
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,  #
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,  #
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,  #
    stride_biasb,
    stride_biash,
    stride_biasq,
    stride_biask,  # 0 on broadcast dims
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,  #
    H,
    S_q,
    S_k,
    D,  #
    sm_scale,
    dropout_p,
    seed,  # seed: Philox key base; element (b, h, i, j) draws tl.rand(seed + b*H + h, i*S_k + j)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  #
    HAS_BIAS: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # fp32 accumulation throughout; P is cast to V's type for the second GEMM, the output at tl.store.
    # Offsets: the (b, h) base is int64; offsets inside one head are int32 (the launcher checks they fit),
    # which keeps the tile address arithmetic -- and the register budget -- at 32 bits.
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1).to(tl.int64)
    b = off_bh // H
    h = off_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S_q
    d_ok = offs_d < D
    q_ptrs = Q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K_ptr + b * stride_kb + h * stride_kh
    v_base = V_ptr + b * stride_vb + h * stride_vh
    bias_base = Bias_ptr + b * stride_biasb + h * stride_biash + offs_m[:, None] * stride_biasq
    seed_bh = seed + off_bh  # one Philox key per (b, h); element (i, j) draws tl.rand(seed_bh, i*S_k + j)
    rng_rows = (offs_m * S_k)[:, None]  # int32 element index of (i, 0) within the head
    qk_scale = sm_scale * 1.4426950408889634  # 1/ln(2): use exp2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hi = S_k
    if IS_CAUSAL:
        hi = tl.minimum(S_k, (start_m + 1) * BLOCK_M)  # top-left aligned: key j <= query i
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < S_k
        # -- s = q kᵀ·scale (+ bias), base 2 --
        kt = tl.load(
            k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd,
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_base + cols[None, :] * stride_biask, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        valid = n_ok[None, :]
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        # -- online softmax; an all -inf row keeps m = -inf, so subtract 0 instead (no NaN) --
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = tl.rand(seed_bh, rng_rows + cols[None, :]) >= dropout_p
            p = tl.where(keep, p, 0.0)  # l_i keeps the undropped sum; 1/(1-p) is applied once at the end
        v = tl.load(
            v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    # -- epilogue: normalise; fully masked rows (l = 0) give 0 and lse = -inf --
    dead = l_i == 0.0
    inv_l = tl.where(dead, 0.0, 1.0 / tl.where(dead, 1.0, l_i))
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    acc = acc * inv_l[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.log2(tl.where(dead, 1.0, l_i))) * 0.6931471805599453)
    tl.store(Lse_ptr + off_bh * S_q + offs_m, lse, mask=m_ok)
    o_ptrs = Out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_preprocess_kernel(
    Out_ptr,
    DO_ptr,
    Delta_ptr,  # Delta: (B*H, S_q) fp32
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,  #
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dod,  #
    H,
    S_q,
    D,  #
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # delta_i = rowsum(dO ⊙ O) = sum_j P_ij dP_ij (dropout included), in fp32
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1).to(tl.int64)
    b = off_bh // H
    h = off_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < S_q)[:, None] & (offs_d < D)[None, :]
    rows = offs_m[:, None]
    o = tl.load(
        Out_ptr + b * stride_ob + h * stride_oh + rows * stride_os + offs_d[None, :] * stride_od, mask=ok, other=0.0
    ).to(tl.float32)
    do = tl.load(
        DO_ptr + b * stride_dob + h * stride_doh + rows * stride_dos + offs_d[None, :] * stride_dod, mask=ok, other=0.0
    ).to(tl.float32)
    tl.store(Delta_ptr + off_bh * S_q + offs_m, tl.sum(o * do, 1), mask=offs_m < S_q)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,
    Bias_ptr,
    DO_ptr,
    Lse_ptr,
    Delta_ptr,
    DK_ptr,
    DV_ptr,  #
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,  #
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,  #
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,  #
    stride_biasb,
    stride_biash,
    stride_biasq,
    stride_biask,  #
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dod,  #
    stride_dkb,
    stride_dks,
    stride_dkh,
    stride_dkd,  # dK and dV share this layout
    H,
    S_q,
    S_k,
    D,  #
    sm_scale,
    dropout_p,
    seed,  #
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  #
    HAS_BIAS: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program owns a block of keys and walks the queries, in the transposed (key-major) orientation:
    # Pᵀ = exp2(s ᵀ - lse), dV += P_dᵀ dO, dPᵀ = V dOᵀ, dSᵀ = Pᵀ ⊙ (dP_dropᵀ - delta), dK += dSᵀ Q·scale.
    start_n = tl.program_id(0)
    off_bh = tl.program_id(1).to(tl.int64)
    b = off_bh // H
    h = off_bh % H
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < S_k
    d_ok = offs_d < D
    cols = offs_n[:, None]
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(
        K_ptr + b * stride_kb + h * stride_kh + cols * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0
    )  # (BLOCK_N, BLOCK_D)
    v = tl.load(
        V_ptr + b * stride_vb + h * stride_vh + cols * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # 1/ln(2): use exp2
    q_base = Q_ptr + b * stride_qb + h * stride_qh
    do_base = DO_ptr + b * stride_dob + h * stride_doh
    bias_base = Bias_ptr + b * stride_biasb + h * stride_biash + cols * stride_biask
    lo = 0
    if IS_CAUSAL:
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M  # queries above the key block see none of it
    for start_m in range(lo, S_q, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < S_q
        rows = offs_m[None, :]
        qt = tl.load(
            q_base + rows * stride_qs + offs_d[:, None] * stride_qd, mask=m_ok[None, :] & d_ok[:, None], other=0.0
        )  # (BLOCK_D, BLOCK_M)
        lse = tl.load(Lse_ptr + off_bh * S_q + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # fully masked rows: P = exp2(-inf) = 0
        st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if HAS_BIAS:
            bias = tl.load(bias_base + rows * stride_biasq, mask=n_ok[:, None] & m_ok[None, :], other=0.0)
            st += bias.to(tl.float32) * 1.4426950408889634
        valid = n_ok[:, None] & m_ok[None, :]
        if IS_CAUSAL:
            valid = valid & (offs_n[:, None] <= offs_m[None, :])
        pt = tl.exp2(tl.where(valid, st, float("-inf")) - lse[None, :])  # masked entries -> exp2(-inf) = 0
        do = tl.load(
            do_base + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
            mask=m_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_D)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if HAS_DROPOUT:
            keep = tl.rand(seed + off_bh, rows * S_k + cols) >= dropout_p  # same stream as forward
            scale_d = 1.0 / (1.0 - dropout_p)
            pdt = tl.where(keep, pt * scale_d, 0.0)
            dpt = tl.where(keep, dpt * scale_d, 0.0)
        else:
            pdt = pt
        dv = tl.dot(pdt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(Delta_ptr + off_bh * S_q + offs_m, mask=m_ok, other=0.0)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)
    dk = dk * sm_scale
    out_off = b * stride_dkb + h * stride_dkh + cols * stride_dks + offs_d[None, :] * stride_dkd
    tl.store(DK_ptr + out_off, dk.to(DK_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(DV_ptr + out_off, dv.to(DV_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q_ptr,
    K_ptr,
    V_ptr,
    Bias_ptr,
    DO_ptr,
    Lse_ptr,
    Delta_ptr,
    DQ_ptr,  #
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,  #
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,  #
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,  #
    stride_biasb,
    stride_biash,
    stride_biasq,
    stride_biask,  #
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dod,  #
    stride_dqb,
    stride_dqs,
    stride_dqh,
    stride_dqd,  #
    H,
    S_q,
    S_k,
    D,  #
    sm_scale,
    dropout_p,
    seed,  #
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  #
    HAS_BIAS: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program owns a block of queries and walks the keys: dQ += dS K·scale, dS = P ⊙ (dP_drop - delta).
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1).to(tl.int64)
    b = off_bh // H
    h = off_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S_q
    d_ok = offs_d < D
    rows = offs_m[:, None]
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q_ptr + b * stride_qb + h * stride_qh + rows * stride_qs + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0
    )
    do = tl.load(
        DO_ptr + b * stride_dob + h * stride_doh + rows * stride_dos + offs_d[None, :] * stride_dod,
        mask=q_mask,
        other=0.0,
    )
    lse = tl.load(Lse_ptr + off_bh * S_q + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # fully masked rows: P = 0
    delta = tl.load(Delta_ptr + off_bh * S_q + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # 1/ln(2): use exp2
    k_base = K_ptr + b * stride_kb + h * stride_kh
    v_base = V_ptr + b * stride_vb + h * stride_vh
    bias_base = Bias_ptr + b * stride_biasb + h * stride_biash + rows * stride_biasq
    rng_rows = rows * S_k
    hi = S_k
    if IS_CAUSAL:
        hi = tl.minimum(S_k, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n0
        n_ok = cols < S_k
        kt_mask = n_ok[None, :] & d_ok[:, None]
        kt = tl.load(
            k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd, mask=kt_mask, other=0.0
        )  # (BLOCK_D, BLOCK_N)
        vt = tl.load(v_base + cols[None, :] * stride_vs + offs_d[:, None] * stride_vd, mask=kt_mask, other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            bias = tl.load(bias_base + cols[None, :] * stride_biask, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        valid = m_ok[:, None] & n_ok[None, :]
        if IS_CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        p = tl.exp2(tl.where(valid, s, float("-inf")) - lse[:, None])  # masked entries -> exp2(-inf) = 0
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if HAS_DROPOUT:
            keep = tl.rand(seed + off_bh, rng_rows + cols[None, :]) >= dropout_p  # same stream as forward
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(
        DQ_ptr + b * stride_dqb + h * stride_dqh + rows * stride_dqs + offs_d[None, :] * stride_dqd,
        dq.to(DQ_ptr.dtype.element_ty),
        mask=q_mask,
    )


@triton.jit
def _attn_dropout_mask_kernel(
    Keep_ptr,  # int8 (B, H, S_q, S_k) contiguous
    S_q,
    S_k,  #
    dropout_p,
    seed,  #
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # The keep mask the attention kernels draw, for tests: same key, same element index, same comparison.
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < S_q
    rng_rows = (offs_m * S_k)[:, None]
    keep_base = Keep_ptr + off_bh * S_q * S_k
    for start_n in range(0, S_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = tl.rand(seed + off_bh, rng_rows + cols[None, :]) >= dropout_p
        tl.store(keep_base + rng_rows + cols[None, :], keep.to(tl.int8), mask=m_ok[:, None] & (cols < S_k)[None, :])


def _bias_args(attn_bias: torch.Tensor | None, q: torch.Tensor, shape: tuple[int, int, int, int]):
    if attn_bias is None:
        return q, (0, 0, 0, 0)
    bias = attn_bias.to(q.dtype)
    return bias, tuple(bias.expand(shape).stride())  # broadcast dims get stride 0


def _check_offsets(q, k, v, bias, bias_strides, *others) -> None:
    s_q, s_k = q.shape[1], k.shape[1]
    extents = {"S_q*S_k": s_q * s_k}
    for name, t in (("q", q), ("k", k), ("v", v), *((f"t{i}", t) for i, t in enumerate(others))):
        extents[name] = (t.shape[1] - 1) * abs(t.stride(1)) + (t.shape[3] - 1) * abs(t.stride(3)) + 1
    if bias is not None:
        extents["attn_bias"] = (s_q - 1) * bias_strides[2] + (s_k - 1) * bias_strides[3] + 1
    _check_int32_offsets(**extents)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32 products, no TF32 rounding


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_bias: torch.Tensor | None,
    softmax_scale: float,
    dropout_p: float,
    seed: int,
    offset: int,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention forward.

    Args:
        q: (B, S_q, H, D); k, v: (B, S_k, H, D), any strides, D <= 128; attn_bias broadcastable to
        (B, H, S_q, S_k) or None; softmax_scale resolved by the caller; dropout_p 0 disables dropout.

    Returns:
        (out, lse): out (B, S_q, H, D) contiguous in q's dtype; lse (B, H, S_q) fp32 natural-log row logsumexp
        (-inf for fully masked rows).
    """
    b, s_q, h, d = q.shape
    s_k = k.shape[1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"attention_fwd: head dim D={d} > {MAX_HEAD_DIM}")
    block_d = _block_d(d)
    block_m, block_n, num_warps, num_stages = _fwd_config(block_d)
    out = torch.empty((b, s_q, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    bias, bias_strides = _bias_args(attn_bias, q, (b, h, s_q, s_k))
    _check_offsets(q, k, v, bias, bias_strides, out)
    _attn_fwd_kernel[(cdiv(s_q, block_m), b * h)](
        q,
        k,
        v,
        bias,
        out,
        lse,  #
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *bias_strides,
        *out.stride(),  #
        h,
        s_q,
        s_k,
        d,  #
        float(softmax_scale),
        float(dropout_p),
        dropout_key(seed, offset),  #
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,  #
        HAS_BIAS=attn_bias is not None,
        IS_CAUSAL=bool(causal),
        HAS_DROPOUT=dropout_p > 0.0,  #
        DOT_PRECISION=_precision(q.dtype),  #
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, lse


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_bias: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    dropout_p: float,
    seed: int,
    offset: int,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash attention backward; the dropout mask is regenerated from (seed, offset).

    Args:
        dout: (B, S_q, H, D), any strides; q, k, v, attn_bias, out, lse as given to / returned by attention_fwd.

    Returns:
        (dq, dk, dv): contiguous (B, S_q, H, D), (B, S_k, H, D), (B, S_k, H, D) in q's dtype.
    """
    b, s_q, h, d = q.shape
    s_k = k.shape[1]
    block_d = _block_d(d)
    block_m, block_n, num_warps, num_stages = _bwd_config(block_d)
    delta = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    _attn_bwd_preprocess_kernel[(cdiv(s_q, block_m), b * h)](
        out,
        dout,
        delta,  #
        *out.stride(),
        *dout.stride(),  #
        h,
        s_q,
        d,  #
        BLOCK_M=block_m,
        BLOCK_D=block_d,
    )
    dq = torch.empty((b, s_q, h, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, s_k, h, d), dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    bias, bias_strides = _bias_args(attn_bias, q, (b, h, s_q, s_k))
    _check_offsets(q, k, v, bias, bias_strides, dout, dq, dk)
    common = dict(
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        HAS_BIAS=attn_bias is not None,
        IS_CAUSAL=bool(causal),
        HAS_DROPOUT=dropout_p > 0.0,
        DOT_PRECISION=_precision(q.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    scalars = (float(softmax_scale), float(dropout_p), dropout_key(seed, offset))
    _attn_bwd_dkdv_kernel[(cdiv(s_k, block_n), b * h)](
        q,
        k,
        v,
        bias,
        dout,
        lse,
        delta,
        dk,
        dv,  #
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *bias_strides,
        *dout.stride(),
        *dk.stride(),  #
        h,
        s_q,
        s_k,
        d,  #
        *scalars,  #
        **common,
    )
    _attn_bwd_dq_kernel[(cdiv(s_q, block_m), b * h)](
        q,
        k,
        v,
        bias,
        dout,
        lse,
        delta,
        dq,  #
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *bias_strides,
        *dout.stride(),
        *dq.stride(),  #
        h,
        s_q,
        s_k,
        d,  #
        *scalars,  #
        **common,
    )
    return dq, dk, dv


def attention_dropout_mask(
    b: int, h: int, s_q: int, s_k: int, dropout_p: float, seed: int, offset: int, device: torch.device
) -> torch.Tensor:
    """The bool keep mask (B, H, S_q, S_k) that attention_fwd/attention_bwd draw for (seed, offset) (for tests)."""
    keep = torch.empty((b, h, s_q, s_k), dtype=torch.int8, device=device)
    _check_int32_offsets(**{"S_q*S_k": s_q * s_k})
    _attn_dropout_mask_kernel[(cdiv(s_q, 32), b * h)](
        keep, s_q, s_k, float(dropout_p), dropout_key(seed, offset), BLOCK_M=32, BLOCK_N=64
    )
    return keep.view(torch.bool)


# ---- ahead-of-time compile specs: the default GPU configs, every feature on (the most registers) ----
def _strides(*names: str) -> list[str]:
    return [f"stride_{n}{x}" for n in names for x in "bshd"]


_BIAS_STRIDES = [f"stride_bias{x}" for x in "bhqk"]


def _fwd_spec(dt: str, d: int) -> AotSpec:
    block_d = _block_d(d)
    block_m, block_n, num_warps, num_stages = GPU_FWD_CONFIGS[block_d]
    sig = dict(Q_ptr=dt, K_ptr=dt, V_ptr=dt, Bias_ptr=dt, Out_ptr=dt, Lse_ptr="*fp32")
    sig.update({k: "i32" for k in (*_strides("q", "k", "v"), *_BIAS_STRIDES, *_strides("o"))})
    sig.update(H="i32", S_q="i32", S_k="i32", D="i32", sm_scale="fp32", dropout_p="fp32", seed="i64")
    flags = dict(HAS_BIAS=True, IS_CAUSAL=True, HAS_DROPOUT=True, DOT_PRECISION="tf32")
    sig.update({k: "constexpr" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", *flags)})
    return AotSpec(
        name=f"attn_fwd[{dt[1:]},D={d},M{block_m}N{block_n},bias+causal+dropout]",
        kernel=_attn_fwd_kernel,
        signature=sig,
        constexprs=dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **flags),
        num_warps=num_warps,
        num_stages=num_stages,
    )


def _bwd_spec(dt: str, d: int, kernel, which: str) -> AotSpec:
    block_d = _block_d(d)
    block_m, block_n, num_warps, num_stages = GPU_BWD_CONFIGS[block_d]
    ptrs = ["Q_ptr", "K_ptr", "V_ptr", "Bias_ptr", "DO_ptr", "Lse_ptr", "Delta_ptr"]
    ptrs += ["DK_ptr", "DV_ptr"] if which == "dkdv" else ["DQ_ptr"]
    sig = {p: ("*fp32" if p in ("Lse_ptr", "Delta_ptr") else dt) for p in ptrs}
    out_strides = _strides("dk") if which == "dkdv" else _strides("dq")
    sig.update({k: "i32" for k in (*_strides("q", "k", "v"), *_BIAS_STRIDES, *_strides("do"), *out_strides)})
    sig.update(H="i32", S_q="i32", S_k="i32", D="i32", sm_scale="fp32", dropout_p="fp32", seed="i64")
    flags = dict(HAS_BIAS=True, IS_CAUSAL=True, HAS_DROPOUT=True, DOT_PRECISION="tf32")
    sig.update({k: "constexpr" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", *flags)})
    return AotSpec(
        name=f"attn_bwd_{which}[{dt[1:]},D={d},M{block_m}N{block_n},bias+causal+dropout]",
        kernel=kernel,
        signature=sig,
        constexprs=dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, **flags),
        num_warps=num_warps,
        num_stages=num_stages,
    )


def _preprocess_spec(dt: str, d: int) -> AotSpec:
    sig = dict(Out_ptr=dt, DO_ptr=dt, Delta_ptr="*fp32")
    sig.update({k: "i32" for k in _strides("o", "do")})
    sig.update(H="i32", S_q="i32", D="i32", BLOCK_M="constexpr", BLOCK_D="constexpr")
    return AotSpec(
        name=f"attn_bwd_preprocess[{dt[1:]},D={d}]",
        kernel=_attn_bwd_preprocess_kernel,
        signature=sig,
        constexprs=dict(BLOCK_M=GPU_BWD_CONFIGS[_block_d(d)][0], BLOCK_D=_block_d(d)),
    )


def _mask_spec() -> AotSpec:
    sig = dict(
        Keep_ptr="*i8", S_q="i32", S_k="i32", dropout_p="fp32", seed="i64", BLOCK_M="constexpr", BLOCK_N="constexpr"
    )
    return AotSpec(
        name="attn_dropout_mask[M32N64]",
        kernel=_attn_dropout_mask_kernel,
        signature=sig,
        constexprs=dict(BLOCK_M=32, BLOCK_N=64),
    )


# fp16/bf16 only: on CUDA the dispatcher sends fp32 attention to the torch backend (cuBLAS); fp32 runs here
# only under the interpreter, for tests.
AOT_SPECS = [
    spec
    for dt in ("*fp16", "*bf16")
    for d in (64, 128)
    for spec in (
        _fwd_spec(dt, d),
        _preprocess_spec(dt, d),
        _bwd_spec(dt, d, _attn_bwd_dkdv_kernel, "dkdv"),
        _bwd_spec(dt, d, _attn_bwd_dq_kernel, "dq"),
    )
] + [_mask_spec()]
