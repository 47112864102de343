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

from fastlayers.kernels.triton._common import TORCH_TO_SIG, num_programs_hint
from fastlayers.kernels.triton.aot import AotSpec
from fastlayers.utils import cdiv, next_pow2

ACTIVATIONS = ("gelu", "silu")


@triton.jit
def _bias_geglu_act_inner(g, ACT_SILU: tl.constexpr):
    """act(g) for fp32 g."""
    if ACT_SILU:
        a = g / (1.0 + tl.exp(-g))  # g·sigmoid(g); exp overflow to inf gives -0, not NaN
    else:
        # 0.7071067811 = 1/sqrt(2)
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    return a


@triton.jit
def _bias_geglu_act_grad_inner(g, ACT_SILU: tl.constexpr):
    """(act(g), act'(g)) for fp32 g."""
    if ACT_SILU:
        s = 1.0 / (1.0 + tl.exp(-g))
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    else:
        # Φ(g) + g·φ(g); 0.3989422804 = 1/sqrt(2π)
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * (0.3989422804014327 * tl.exp(-0.5 * g * g))
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
    # -- one (BLOCK_M, BLOCK_N) output tile per program; int64 rows so row * stride cannot overflow --
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of the value half; gate is C + cols
    col_mask = cols < C
    mask = (rows[:, None] < M) & col_mask[None, :]
    x_ptrs = X_ptr + rows[:, None] * stride_x_row + cols[None, :]
    # all maths in fp32; cast to the output dtype at the store
    h = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_ptrs + C, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        g += tl.load(B_ptr + C + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y = h * _bias_geglu_act_inner(g, ACT_SILU)
    tl.store(Y_ptr + rows[:, None] * stride_y_row + cols[None, :], y.to(Y_ptr.dtype.element_ty), mask=mask)


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
    pid_m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < C
    if HAS_BIAS:
        bh = tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        bg = tl.load(B_ptr + C + cols, mask=col_mask, other=0.0).to(tl.float32)
    dbh = tl.zeros((BLOCK_N,), dtype=tl.float32)
    dbg = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row0 = pid_m * rows_per_prog
    # -- walk this program's rows one tile at a time, all maths in fp32 --
    for r in range(0, rows_per_prog, BLOCK_M):
        rows = row0 + r + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & col_mask[None, :]
        x_ptrs = X_ptr + rows[:, None] * stride_x_row + cols[None, :]
        dy = tl.load(DY_ptr + rows[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(x_ptrs + C, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h += bh[None, :]
            g += bg[None, :]
        a, da = _bias_geglu_act_grad_inner(g, ACT_SILU)
        dh = dy * a
        dg = dy * h * da
        dx_ptrs = DX_ptr + rows[:, None] * stride_dx_row + cols[None, :]
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


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(M, n) view of t; the kernels need a unit stride along the last dim, so copy only when it is missing."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or t2.shape[0] == 0 else t2.contiguous()


def _vec(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels read the bias with unit stride."""
    return None if bias is None else bias.contiguous()


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
    bias = _vec(bias)
    x2 = _rows(x, 2 * c)
    m = x2.shape[0]
    y = torch.empty((m, c), dtype=x.dtype, device=x.device)
    out_shape = (*x.shape[:-1], c)
    if m == 0 or c == 0:
        return y.view(out_shape)
    block_m, block_n, num_warps = _config(c)
    grid = (cdiv(m, block_m), cdiv(c, block_n))
    _bias_geglu_fwd_kernel[grid](
        x2,
        x2 if bias is None else bias,
        y,
        x2.stride(0),
        y.stride(0),
        m,
        c,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_BIAS=bias is not None,
        ACT_SILU=act_silu,
        num_warps=num_warps,
    )
    return y.view(out_shape)


def bias_geglu_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str = "gelu",
    need_dbias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dx = [dy · act(gate), dy · h · act'(gate)] and dbias = Σ_rows dx (fp32 partials per program, summed here).

    Returns (dx with the shape and dtype of x, dbias (2C,) in bias.dtype, or None without bias / need_dbias).
    """
    act_silu = _check_activation(activation)
    c = _check_even(x)
    bias = _vec(bias)
    x2, dy2 = _rows(x, 2 * c), _rows(dy, c)
    m = x2.shape[0]
    has_db = bias is not None and need_dbias
    dx = torch.empty((m, 2 * c), dtype=x.dtype, device=x.device)
    if m == 0 or c == 0:
        dbias = torch.zeros_like(bias) if has_db else None
        return dx.view(x.shape), dbias
    block_m, block_n, num_warps = _config(c)
    n_col = cdiv(c, block_n)
    # about 4 programs per SM in all (a small constant under the interpreter); each owns a run of rows
    n_row_progs = max(1, min(cdiv(m, block_m), 4 * num_programs_hint(x.device) // n_col))
    rows_per_prog = cdiv(cdiv(m, block_m), n_row_progs) * block_m
    n_row_progs = cdiv(m, rows_per_prog)
    partial = torch.empty((n_row_progs, 2 * c), dtype=torch.float32, device=x.device) if has_db else dx
    _bias_geglu_bwd_kernel[(n_row_progs, n_col)](
        dy2,
        x2,
        x2 if bias is None else bias,
        dx,
        partial,
        dy2.stride(0),
        x2.stride(0),
        dx.stride(0),
        partial.stride(0),
        m,
        c,
        rows_per_prog,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_BIAS=bias is not None,
        HAS_DBIAS=has_db,
        ACT_SILU=act_silu,
        num_warps=num_warps,
    )
    dbias = partial.sum(0).to(bias.dtype) if has_db else None
    return dx.view(x.shape), dbias


def _signature(kernel, types: dict[str, str]) -> dict[str, str]:
    """Every argument in order: the given types, constexpr for the rest."""
    return {name: types.get(name, "constexpr") for name in kernel.arg_names}


def _aot_specs() -> list[AotSpec]:
    """The default (Stable Diffusion FF width, C >= 1024) config for each dtype and activation, with a bias
    (and dbias)."""
    block_m, block_n, num_warps = _config(1280)
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = TORCH_TO_SIG[dtype]
        for act_silu in (False, True):
            consts = {"BLOCK_M": block_m, "BLOCK_N": block_n, "HAS_BIAS": True, "ACT_SILU": act_silu}
            tag = f"{t[1:]},{'silu' if act_silu else 'gelu'},BLOCK_M={block_m},BLOCK_N={block_n}"
            fwd_types = {
                "X_ptr": t,
                "B_ptr": t,
                "Y_ptr": t,
                "stride_x_row": "i32",
                "stride_y_row": "i32",
                "M": "i32",
                "C": "i32",
            }
            bwd_types = {
                "DY_ptr": t,
                "X_ptr": t,
                "B_ptr": t,
                "DX_ptr": t,
                "DB_ptr": "*fp32",
                "stride_dy_row": "i32",
                "stride_x_row": "i32",
                "stride_dx_row": "i32",
                "stride_db_row": "i32",
                "M": "i32",
                "C": "i32",
                "rows_per_prog": "i32",
            }
            specs += [
                AotSpec(
                    name=f"bias_geglu_fwd[{tag}]",
                    kernel=_bias_geglu_fwd_kernel,
                    signature=_signature(_bias_geglu_fwd_kernel, fwd_types),
                    constexprs=consts,
                    num_warps=num_warps,
                ),
                AotSpec(
                    name=f"bias_geglu_bwd[{tag}]",
                    kernel=_bias_geglu_bwd_kernel,
                    signature=_signature(_bias_geglu_bwd_kernel, bwd_types),
                    constexprs={**consts, "HAS_DBIAS": True},
                    num_warps=num_warps,
                ),
            ]
    return specs


AOT_SPECS = _aot_specs()
