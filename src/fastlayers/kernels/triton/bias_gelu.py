"""Triton fused bias + GELU (exact erf or tanh approximation), forward and backward.

Forward: y = gelu(x + b) on (BLOCK_M, BLOCK_N) tiles. Backward: dx = dy · gelu'(x + b), recomputing x + b
from the saved input, plus per-program fp32 partial sums of dx over rows (dbias) that the launcher reduces,
as in the Triton layer-norm tutorial (python/tutorials/05-layer-norm.py) and Liger's layer_norm backward.
"""

import torch
import triton
import triton.language as tl

from fastlayers.kernels.triton import _common
from fastlayers.kernels.triton._common import gelu_erf, gelu_erf_cdf_grad, row_block, row_run, tile_ptrs
from fastlayers.utils import next_pow2

APPROXIMATIONS = ("none", "tanh")


@triton.jit
def _bias_gelu_tanh_inner(z):
    # tanh(z) = sign(z)·(1 − e^{−2|z|}) / (1 + e^{−2|z|}): e ∈ (0, 1], so nothing overflows for large |z|
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z >= 0, t, -t)


@triton.jit
def _bias_gelu_act_inner(u, APPROX_TANH: tl.constexpr):
    """gelu(u) for fp32 u."""
    if APPROX_TANH:
        # 0.7978845608 = sqrt(2/pi)
        t = _bias_gelu_tanh_inner(0.7978845608028654 * (u + 0.044715 * u * u * u))
        y = 0.5 * u * (1.0 + t)
    else:
        y = gelu_erf(u)
    return y


@triton.jit
def _bias_gelu_grad_inner(u, APPROX_TANH: tl.constexpr):
    """gelu'(u) for fp32 u."""
    if APPROX_TANH:
        # d/du 0.5·u·(1 + tanh(k(u + c·u³))) = 0.5(1 + t) + 0.5·u·(1 − t²)·k·(1 + 3c·u²)
        u2 = u * u
        t = _bias_gelu_tanh_inner(0.7978845608028654 * (u + 0.044715 * u2 * u))
        g = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * (0.7978845608028654 * (1.0 + 0.134145 * u2))
    else:
        _, g = gelu_erf_cdf_grad(u)  # Φ(u) + u·φ(u)
    return g


@triton.jit
def _bias_gelu_fwd_kernel(
    X_ptr,  # input (M, N), unit stride along N
    B_ptr,  # bias (N,); not read unless HAS_BIAS
    Y_ptr,  # output (M, N), unit stride along N
    stride_x_row,
    stride_y_row,
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    APPROX_TANH: tl.constexpr,
):
    # -- one (BLOCK_M, BLOCK_N) tile per program; int64 rows so row * stride cannot overflow --
    _, row0, cols, col_mask = row_run(BLOCK_M, N, BLOCK_N)
    rows, mask = row_block(row0, M, col_mask, BLOCK_M)
    # all maths in fp32; cast to the output dtype at the store
    u = tl.load(tile_ptrs(X_ptr, rows, cols, stride_x_row), mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        u += b[None, :]
    y = _bias_gelu_act_inner(u, APPROX_TANH)
    tl.store(tile_ptrs(Y_ptr, rows, cols, stride_y_row), y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    DY_ptr,  # upstream gradient (M, N), unit stride along N
    X_ptr,  # saved input (M, N), unit stride along N
    B_ptr,  # bias (N,); not read unless HAS_BIAS
    DX_ptr,  # output gradient (M, N), unit stride along N
    DB_ptr,  # fp32 partial dbias (number of row programs, N); not written unless HAS_DBIAS
    stride_dy_row,
    stride_x_row,
    stride_dx_row,
    stride_db_row,
    M,
    N,
    rows_per_prog,  # a multiple of BLOCK_M: each program owns one contiguous run of rows
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DBIAS: tl.constexpr,  # write the partial column sums of dx (bias present and its grad wanted)
    APPROX_TANH: tl.constexpr,
):
    pid_m, row0, cols, col_mask = row_run(rows_per_prog, N, BLOCK_N)
    if HAS_BIAS:
        b = tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # -- walk this program's rows one tile at a time, all maths in fp32 --
    for r in range(0, rows_per_prog, BLOCK_M):
        rows, mask = row_block(row0 + r, M, col_mask, BLOCK_M)
        dy = tl.load(tile_ptrs(DY_ptr, rows, cols, stride_dy_row), mask=mask, other=0.0).to(tl.float32)
        u = tl.load(tile_ptrs(X_ptr, rows, cols, stride_x_row), mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            u += b[None, :]
        dx = dy * _bias_gelu_grad_inner(u, APPROX_TANH)
        tl.store(tile_ptrs(DX_ptr, rows, cols, stride_dx_row), dx.to(DX_ptr.dtype.element_ty), mask=mask)
        if HAS_DBIAS:
            # masked entries have dy = 0, hence dx = 0: they add nothing to the column sums
            db += tl.sum(dx, axis=0)
    if HAS_DBIAS:
        tl.store(DB_ptr + pid_m * stride_db_row + cols, db, mask=col_mask)


def _config(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 2048-element tiles (16 per thread; no bwd spills), at most 1024 wide."""
    block_n = min(1024, max(16, next_pow2(n)))
    return 2048 // block_n, block_n, 4


def _check_approximate(approximate: str) -> bool:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    return approximate == "tanh"


def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """y = gelu(x + bias): x (..., N), bias (N,) or None; returns y with the shape and dtype of x."""
    approx_tanh = _check_approximate(approximate)
    y = _common.bias_act_fwd(_bias_gelu_fwd_kernel, x, bias, x.shape[-1], _config, APPROX_TANH=approx_tanh)
    return y.view(x.shape)


def bias_gelu_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    approximate: str = "none",
    need_dbias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dx = dy · gelu'(x + bias) and dbias = Σ_rows dx (fp32 partials per program, summed here).

    Returns (dx with the shape and dtype of x, dbias (N,) in bias.dtype, or None without bias / need_dbias).
    """
    approx_tanh = _check_approximate(approximate)
    return _common.bias_act_bwd(
        _bias_gelu_bwd_kernel, dy, x, bias, x.shape[-1], _config, need_dbias, APPROX_TANH=approx_tanh
    )


# the default (BERT-width, N >= 1024) config for each dtype and approximation, with a bias (and dbias)
AOT_SPECS = _common.bias_act_aot_specs(
    "bias_gelu", _bias_gelu_fwd_kernel, _bias_gelu_bwd_kernel, _config(3072), "N", "APPROX_TANH", ("erf", "tanh")
)
