"""Triton fused bias + GEGLU (exact erf GELU or SiLU gate), forward and backward.

x (M, 2C) is read as two (M, C) halves, value h = x[:, :C] + b[:C] and gate g = x[:, C:] + b[C:].
Forward: out = h · act(g) on (BLOCK_M, BLOCK_N) tiles of the (M, C) output, a 2-D grid over (row blocks,
column blocks): elementwise, so any C works (C = 5120 is five 1024-wide column blocks).
Backward: dh = dy · act(g) and dg = dy · h · act'(g), recomputing x + b from the saved input, plus per-program
fp32 partial column sums of [dh, dg] (dbias) that the launcher reduces in torch, as in bias_gelu and the
Triton layer-norm tutorial (python/tutorials/05-layer-norm.py).
"""

import torch
import triton
import triton.language as tl

from fastlayers.kernels.triton import _common
from fastlayers.kernels.triton._common import gelu_erf, gelu_erf_cdf_grad, row_block, row_run, tile_ptrs
from fastlayers.utils import next_pow2

ACTIVATIONS = ("gelu", "silu")


@triton.jit
def _bias_geglu_act_inner(g, ACT_SILU: tl.constexpr):
    """act(g) for fp32 g."""
    if ACT_SILU:
        a = g / (1.0 + tl.exp(-g))  # g·sigmoid(g); exp overflow to inf gives -0, not NaN
    else:
        a = gelu_erf(g)
    return a


@triton.jit
def _bias_geglu_act_grad_inner(g, ACT_SILU: tl.constexpr):
    """(act(g), act'(g)) for fp32 g."""
    if ACT_SILU:
        s = 1.0 / (1.0 + tl.exp(-g))
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    else:
        cdf, da = gelu_erf_cdf_grad(g)  # Φ(g), Φ(g) + g·φ(g)
        a = g * cdf
    return a, da


@triton.jit
def _bias_geglu_fwd_kernel(
    X_ptr,  # input (M, 2C), unit stride along the last dim
    B_ptr,  # bias (2C,); not read unless HAS_BIAS
    Y_ptr,  # output (M, C), unit stride along C
    stride_x_row,
    stride_y_row,
    M,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT_SILU: tl.constexpr,
):
    # -- one (BLOCK_M, BLOCK_N) output tile per program; columns of the value half, the gate is C + cols --
    _, row0, cols, col_mask = row_run(BLOCK_M, C, BLOCK_N)
    rows, mask = row_block(row0, M, col_mask, BLOCK_M)
    x_ptrs = tile_ptrs(X_ptr, rows, cols, stride_x_row)
    # all maths in fp32; cast to the output dtype at the store
    h = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_ptrs + C, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        g += tl.load(B_ptr + C + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y = h * _bias_geglu_act_inner(g, ACT_SILU)
    tl.store(tile_ptrs(Y_ptr, rows, cols, stride_y_row), y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_geglu_bwd_kernel(
    DY_ptr,  # upstream gradient (M, C), unit stride along C
    X_ptr,  # saved input (M, 2C), unit stride along the last dim
    B_ptr,  # bias (2C,); not read unless HAS_BIAS
    DX_ptr,  # output gradient (M, 2C), unit stride along the last dim
    DB_ptr,  # fp32 partial dbias (number of row programs, 2C); not written unless HAS_DBIAS
    stride_dy_row,
    stride_x_row,
    stride_dx_row,
    stride_db_row,
    M,
    C,
    rows_per_prog,  # a multiple of BLOCK_M: each program owns one contiguous run of rows
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DBIAS: tl.constexpr,  # write the partial column sums of dx (bias present and its grad wanted)
    ACT_SILU: tl.constexpr,
):
    pid_m, row0, cols, col_mask = row_run(rows_per_prog, C, BLOCK_N)
    if HAS_BIAS:
        bh = tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        bg = tl.load(B_ptr + C + cols, mask=col_mask, other=0.0).to(tl.float32)
    dbh = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dbg = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # -- walk this program's rows one tile at a time, all maths in fp32 --
    for r in range(0, rows_per_prog, BLOCK_M):
        rows, mask = row_block(row0 + r, M, col_mask, BLOCK_M)
        x_ptrs = tile_ptrs(X_ptr, rows, cols, stride_x_row)
        dy = tl.load(tile_ptrs(DY_ptr, rows, cols, stride_dy_row), mask=mask, other=0.0).to(tl.float32)
        h = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(x_ptrs + C, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h += bh[None, :]
            g += bg[None, :]
        a, da = _bias_geglu_act_grad_inner(g, ACT_SILU)
        dh = dy * a
        dg = dy * h * da
        dx_ptrs = tile_ptrs(DX_ptr, rows, cols, stride_dx_row)
        tl.store(dx_ptrs, dh.to(DX_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptrs + C, dg.to(DX_ptr.dtype.element_ty), mask=mask)
        if HAS_DBIAS:
            # masked entries have dy = 0, hence dh = dg = 0: they add nothing to the column sums
            dbh += tl.sum(dh, axis=0)
            dbg += tl.sum(dg, axis=0)
    if HAS_DBIAS:
        db_ptrs = DB_ptr + pid_m * stride_db_row + cols
        tl.store(db_ptrs, dbh, mask=col_mask)
        tl.store(db_ptrs + C, dbg, mask=col_mask)


def _config(c: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for half-width C: 1024-element tiles (two loads of 8 per thread), at most
    1024 wide. The backward keeps dy, h, g, act, act' and two dbias accumulators live: larger tiles spill."""
    block_n = min(1024, max(16, next_pow2(c)))
    return max(1, 1024 // block_n), block_n, 4


def _check_activation(activation: str) -> bool:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation == "silu"


def _check_even(x: torch.Tensor) -> int:
    if x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dim (..., 2C), got shape {tuple(x.shape)}")
    return x.shape[-1] // 2


def bias_geglu_fwd(x: torch.Tensor, bias: torch.Tensor | None, activation: str = "gelu") -> torch.Tensor:
    """out = h · act(gate), (h, gate) = halves of x + bias: x (..., 2C), bias (2C,) or None -> (..., C), x.dtype."""
    act_silu = _check_activation(activation)
    c = _check_even(x)
    y = _common.bias_act_fwd(_bias_geglu_fwd_kernel, x, bias, c, _config, ACT_SILU=act_silu)
    return y.view(*x.shape[:-1], c)


def bias_geglu_bwd(
    dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, activation: str = "gelu", need_dbias: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dx = [dy · act(gate), dy · h · act'(gate)] and dbias = Σ_rows dx (fp32 partials per program, summed here).

    Returns (dx with the shape and dtype of x, dbias (2C,) in bias.dtype, or None without bias / need_dbias).
    """
    act_silu = _check_activation(activation)
    c = _check_even(x)
    return _common.bias_act_bwd(_bias_geglu_bwd_kernel, dy, x, bias, c, _config, need_dbias, ACT_SILU=act_silu)


# the default (Stable Diffusion FF width, C >= 1024) config for each dtype and activation, with a bias (and dbias)
AOT_SPECS = _common.bias_act_aot_specs(
    "bias_geglu", _bias_geglu_fwd_kernel, _bias_geglu_bwd_kernel, _config(1280), "C", "ACT_SILU", ("gelu", "silu")
)
