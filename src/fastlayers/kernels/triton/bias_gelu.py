"""Triton fused bias + GELU (exact erf or tanh approximation), forward and backward.

Forward: y = gelu(x + b) on (BLOCK_M, BLOCK_N) tiles. Backward: dx = dy · gelu'(x + b), recomputing x + b
from the saved input, plus per-program fp32 partial sums of dx over rows (dbias) that the launcher reduces,
as in the Triton layer-norm tutorial (python/tutorials/05-layer-norm.py) and Liger's layer_norm backward.
"""

import torch
import triton
import triton.language as tl

from fastlayers.kernels.triton._common import TORCH_TO_SIG, num_programs_hint
from fastlayers.kernels.triton.aot import AotSpec
from fastlayers.utils import cdiv, next_pow2

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
        # 0.7071067811 = 1/sqrt(2)
        y = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
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
        # Φ(u) + u·φ(u); 0.3989422804 = 1/sqrt(2π)
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
        g = cdf + u * (0.3989422804014327 * tl.exp(-0.5 * u * u))
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
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows[:, None] < M) & col_mask[None, :]
    # all maths in fp32; cast to the output dtype at the store
    u = tl.load(X_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        u += b[None, :]
    y = _bias_gelu_act_inner(u, APPROX_TANH)
    tl.store(Y_ptr + rows[:, None] * stride_y_row + cols[None, :], y.to(Y_ptr.dtype.element_ty), mask=mask)


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
    pid_m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_BIAS:
        b = tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row0 = pid_m * rows_per_prog
    # -- walk this program's rows one tile at a time, all maths in fp32 --
    for r in range(0, rows_per_prog, BLOCK_M):
        rows = row0 + r + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & col_mask[None, :]
        dy = tl.load(DY_ptr + rows[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(X_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            u += b[None, :]
        dx = dy * _bias_gelu_grad_inner(u, APPROX_TANH)
        tl.store(DX_ptr + rows[:, None] * stride_dx_row + cols[None, :], dx.to(DX_ptr.dtype.element_ty), mask=mask)
        if HAS_DBIAS:
            # masked entries have dy = 0, hence dx = 0: they add nothing to the column sums
            db += tl.sum(dx, axis=0)
    if HAS_DBIAS:
        tl.store(DB_ptr + pid_m * stride_db_row + cols, db, mask=col_mask)


def _config(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 2048-element tiles (16 per thread; no bwd spills), at most 1024 wide."""
    block_n = min(1024, max(16, next_pow2(n)))
    return 2048 // block_n, block_n, 4


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(M, N) view of t; the kernels need a unit stride along N, so copy only when it is missing."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or t2.shape[0] == 0 else t2.contiguous()


def _vec(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels read the bias with unit stride."""
    return None if bias is None else bias.contiguous()


def _check_approximate(approximate: str) -> bool:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    return approximate == "tanh"


def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """y = gelu(x + bias): x (..., N), bias (N,) or None; returns y with the shape and dtype of x."""
    approx_tanh = _check_approximate(approximate)
    bias = _vec(bias)
    n = x.shape[-1]
    x2 = _rows(x, n)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.view(x.shape)
    block_m, block_n, num_warps = _config(n)
    grid = (cdiv(m, block_m), cdiv(n, block_n))
    _bias_gelu_fwd_kernel[grid](
        x2,
        x2 if bias is None else bias,
        y,
        x2.stride(0),
        y.stride(0),
        m,
        n,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_BIAS=bias is not None,
        APPROX_TANH=approx_tanh,
        num_warps=num_warps,
    )
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
    bias = _vec(bias)
    n = x.shape[-1]
    x2, dy2 = _rows(x, n), _rows(dy, n)
    m = x2.shape[0]
    has_db = bias is not None and need_dbias
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        dbias = torch.zeros_like(bias) if has_db else None
        return dx.view(x.shape), dbias
    block_m, block_n, num_warps = _config(n)
    n_col = cdiv(n, block_n)
    # about 4 programs per SM in all (a small constant under the interpreter); each owns a run of rows
    n_row_progs = max(1, min(cdiv(m, block_m), 4 * num_programs_hint(x.device) // n_col))
    rows_per_prog = cdiv(cdiv(m, block_m), n_row_progs) * block_m
    n_row_progs = cdiv(m, rows_per_prog)
    partial = torch.empty((n_row_progs, n), dtype=torch.float32, device=x.device) if has_db else dx
    _bias_gelu_bwd_kernel[(n_row_progs, n_col)](
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
        n,
        rows_per_prog,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_BIAS=bias is not None,
        HAS_DBIAS=has_db,
        APPROX_TANH=approx_tanh,
        num_warps=num_warps,
    )
    dbias = partial.sum(0).to(bias.dtype) if has_db else None
    return dx.view(x.shape), dbias


def _signature(kernel, types: dict[str, str]) -> dict[str, str]:
    """Every argument in order: the given types, constexpr for the rest."""
    return {name: types.get(name, "constexpr") for name in kernel.arg_names}


def _aot_specs() -> list[AotSpec]:
    """The default (BERT-width, N >= 1024) config for each dtype and approximation, with a bias (and dbias)."""
    block_m, block_n, num_warps = _config(3072)
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = TORCH_TO_SIG[dtype]
        for approx_tanh in (False, True):
            consts = {"BLOCK_M": block_m, "BLOCK_N": block_n, "HAS_BIAS": True, "APPROX_TANH": approx_tanh}
            tag = f"{t[1:]},{'tanh' if approx_tanh else 'erf'},BLOCK_M={block_m},BLOCK_N={block_n}"
            fwd_types = {
                "X_ptr": t,
                "B_ptr": t,
                "Y_ptr": t,
                "stride_x_row": "i32",
                "stride_y_row": "i32",
                "M": "i32",
                "N": "i32",
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
                "N": "i32",
                "rows_per_prog": "i32",
            }
            specs += [
                AotSpec(
                    name=f"bias_gelu_fwd[{tag}]",
                    kernel=_bias_gelu_fwd_kernel,
                    signature=_signature(_bias_gelu_fwd_kernel, fwd_types),
                    constexprs=consts,
                    num_warps=num_warps,
                ),
                AotSpec(
                    name=f"bias_gelu_bwd[{tag}]",
                    kernel=_bias_gelu_bwd_kernel,
                    signature=_signature(_bias_gelu_bwd_kernel, bwd_types),
                    constexprs={**consts, "HAS_DBIAS": True},
                    num_warps=num_warps,
                ),
            ]
    return specs


AOT_SPECS = _aot_specs()
