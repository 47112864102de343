"""Triton "bias + dropout + residual add + LayerNorm", forward and backward, one row in registers per step.

Design after the Triton tutorial 05 (layer-norm), flash-attn `ops/triton/layer_norm.py` (feature constexprs
on one kernel, dropout regenerated from a seed) and Liger-Kernel `ops/layer_norm.py` (each backward program
owns a block of rows and writes fp32 partial sums of dweight / dln_bias / dbias, reduced on the host):
- https://triton-lang.org/main/getting-started/tutorials/05-layer-norm.html
- https://github.com/Dao-AILab/flash-attention/blob/main/flash_attn/ops/triton/layer_norm.py
- https://github.com/linkedin/Liger-Kernel/blob/main/src/liger_kernel/ops/layer_norm.py
"""

import torch
import triton
import triton.language as tl

from fastlayers.kernels.triton._common import block_for, interpreting, num_programs_hint
from fastlayers.kernels.triton.aot import AotSpec
from fastlayers.utils import cdiv

# A row lives in registers: beyond this the kernels would spill (see AOT_SPECS); the torch backend takes over.
MAX_N = 4096


def _num_warps(block_n: int) -> int:
    # ~8-16 fp32 elements per thread per row vector keeps the backward (3 accumulators) spill-free.
    return min(max(block_n // 256, 1), 16)


def dropout_seed(seed: int, offset: int) -> int:
    """Fold the call's (seed, offset) into one Philox key, as `fastlayers.utils.keep_mask` does."""
    return (int(seed) + 0x9E3779B97F4A7C15 * int(offset)) % (2**63)


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # x, (M, N), unit column stride
    BIAS,  # bias added to x before dropout, (N,)
    RES,  # residual, (M, N)
    W,  # LayerNorm weight, (N,)
    B,  # LayerNorm bias, (N,)
    Y,  # output, (M, N)
    PRE,  # LN input residual + dropout(x + bias), (M, N), written when STORE_PRE
    KEEP,  # keep mask, (M, N) int8, written when STORE_MASK
    MEAN,  # (M,) fp32
    RSTD,  # (M,) fp32, 1 / sqrt(var + eps)
    stride_x_row,
    stride_res_row,
    stride_y_row,
    stride_pre_row,
    stride_keep_row,  #
    M,
    N,
    rows_per_program,  #
    eps,
    dropout_p,
    dropout_scale,  # 1 / (1 - dropout_p)
    seed,  # Philox key; element (row, col) draws tl.rand(seed, row * N + col)
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_PRE: tl.constexpr,
    STORE_MASK: tl.constexpr,
):
    # All maths in fp32; values are cast to the output element type at tl.store.
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        # -- pre = residual + dropout(x + bias) --
        z = tl.load(X + row * stride_x_row + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += bias
        if HAS_DROPOUT:
            # int64 element index: randint4x splits it into two 32-bit Philox counter words
            keep = tl.rand(seed, row * N + cols) >= dropout_p
            z = tl.where(keep, z * dropout_scale, 0.0)
            if STORE_MASK:
                tl.store(KEEP + row * stride_keep_row + cols, keep.to(tl.int8), mask=col_ok)
        if HAS_RESIDUAL:
            z += tl.load(RES + row * stride_res_row + cols, mask=col_ok, other=0.0).to(tl.float32)
        if STORE_PRE:
            tl.store(PRE + row * stride_pre_row + cols, z.to(PRE.dtype.element_ty), mask=col_ok)
        # -- LayerNorm: two-pass mean / biased variance on the row in registers --
        mean = tl.sum(z, axis=0) / N
        zc = tl.where(col_ok, z - mean, 0.0)  # padding lanes must not enter the variance
        var = tl.sum(zc * zc, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)
        y = zc * rstd * w + b
        tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=col_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # gradient of y, (M, N)
    DPRE_OUT,  # gradient of the returned pre, (M, N), read when HAS_DPRE_OUT
    SAVED,  # LN input pre (IS_INVERTIBLE=False) or LN output y (IS_INVERTIBLE=True), (M, N)
    W,  # LayerNorm weight, (N,)
    B,  # LayerNorm bias, (N,), read when IS_INVERTIBLE
    MEAN,  # (M,) fp32, read when not IS_INVERTIBLE
    RSTD,  # (M,) fp32
    DX,  # gradient of x, (M, N)
    DRES,  # gradient of residual, (M, N), written when HAS_RESIDUAL and HAS_DROPOUT (else it equals DX)
    DW_PART,  # (num_programs, N) fp32 partial sums of dweight
    DB_PART,  # (num_programs, N) fp32 partial sums of dln_bias
    DBIAS_PART,  # (num_programs, N) fp32 partial sums of dbias, written when HAS_BIAS
    stride_dy_row,
    stride_dpre_row,
    stride_saved_row,
    stride_dx_row,
    stride_dres_row,  #
    M,
    N,
    rows_per_program,  #
    dropout_p,
    dropout_scale,
    seed,
    BLOCK_N: tl.constexpr,
    HAS_DPRE_OUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    IS_INVERTIBLE: tl.constexpr,
):
    # All maths in fp32; values are cast to the output element type at tl.store.
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    if IS_INVERTIBLE:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        # padding lanes divide by 1, not 0; x̂ there is 0 because y and b load as 0
        w_div = tl.where(col_ok, w, 1.0)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        dy = tl.load(DY + row * stride_dy_row + cols, mask=col_ok, other=0.0).to(tl.float32)
        s = tl.load(SAVED + row * stride_saved_row + cols, mask=col_ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        # -- x̂: rebuilt from y (normalize_invertible) or from the LN input --
        if IS_INVERTIBLE:
            xhat = (s - b) / w_div
        else:
            mean = tl.load(MEAN + row)
            xhat = tl.where(col_ok, (s - mean) * rstd, 0.0)
        # -- dpre = rstd * (w·dy - mean(w·dy) - x̂ · mean(w·dy·x̂)) --
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        c2 = tl.sum(wdy, axis=0) / N
        dpre = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DPRE_OUT:
            dpre += tl.load(DPRE_OUT + row * stride_dpre_row + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw += dy * xhat
        db += dy
        # -- through dropout and the bias add --
        if HAS_DROPOUT:
            keep = tl.rand(seed, row * N + cols) >= dropout_p  # the forward's bits, regenerated
            dx = tl.where(keep, dpre * dropout_scale, 0.0)
            if HAS_RESIDUAL:
                tl.store(DRES + row * stride_dres_row + cols, dpre.to(DRES.dtype.element_ty), mask=col_ok)
        else:
            dx = dpre
        if HAS_BIAS:
            dbias += dx
        tl.store(DX + row * stride_dx_row + cols, dx.to(DX.dtype.element_ty), mask=col_ok)
    # -- per-program partial sums (fp32), reduced over programs by the launcher --
    tl.store(DW_PART + pid * N + cols, dw, mask=col_ok)
    tl.store(DB_PART + pid * N + cols, db, mask=col_ok)
    if HAS_BIAS:
        tl.store(DBIAS_PART + pid * N + cols, dbias, mask=col_ok)


def _rows_2d(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels index rows by stride and need a unit column stride."""
    if t is None:
        return None
    return t if t.stride(-1) == 1 else t.contiguous()


def _fwd_grid(m: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows per program): one row per program on GPU, a few programs under the interpreter."""
    if interpreting() or device.type != "cuda":
        progs = min(m, num_programs_hint(device))
        return progs, cdiv(m, progs)
    return m, 1


def _bwd_grid(m: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows per program): about one program per SM, each summing dW/dB over its rows."""
    progs = min(m, num_programs_hint(device))
    return progs, cdiv(m, progs)


def layer_norm_fwd(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    store_pre: bool = True,
    return_mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward on (M, N) rows; `seed` is the Philox key (see `dropout_seed`), dropout when dropout_p > 0.

    Returns (y, pre or None, mean (M,) fp32, rstd (M,) fp32, keep mask (M, N) bool or None).
    """
    m, n = x.shape
    if n > MAX_N:
        raise ValueError(f"hidden size {n} > {MAX_N} is not supported by the Triton LayerNorm")
    x, residual = _rows_2d(x), _rows_2d(residual)
    has_dropout = dropout_p > 0.0
    y = torch.empty_like(x)
    pre = torch.empty_like(x) if store_pre else None
    keep = torch.empty((m, n), dtype=torch.int8, device=x.device) if (return_mask and has_dropout) else None
    mean = torch.empty((m,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m > 0:
        block_n = block_for(n)
        progs, rows = _fwd_grid(m, x.device)
        _layer_norm_fwd_kernel[(progs,)](
            x,
            bias if bias is not None else x,
            residual if residual is not None else x,
            weight,
            ln_bias,  #
            y,
            pre if pre is not None else y,
            keep if keep is not None else y,
            mean,
            rstd,  #
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            y.stride(0),  #
            pre.stride(0) if pre is not None else 0,
            keep.stride(0) if keep is not None else 0,  #
            m,
            n,
            rows,  #
            eps,
            dropout_p,
            1.0 / (1.0 - dropout_p),
            seed,  #
            BLOCK_N=block_n,
            HAS_BIAS=bias is not None,
            HAS_RESIDUAL=residual is not None,  #
            HAS_DROPOUT=has_dropout,
            STORE_PRE=store_pre,
            STORE_MASK=keep is not None,  #
            num_warps=_num_warps(block_n),
        )
    if return_mask and keep is None:
        keep = torch.ones((m, n), dtype=torch.bool, device=x.device)
    elif keep is not None:
        keep = keep.bool()
    return y, pre, mean, rstd, keep


def layer_norm_bwd(
    dy: torch.Tensor,
    saved: torch.Tensor,
    weight: torch.Tensor,
    ln_bias: torch.Tensor,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    *,
    invertible: bool,
    dpre_out: torch.Tensor | None = None,
    has_bias: bool = False,
    has_residual: bool = False,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward on (M, N) rows. `saved` is pre (invertible=False, with `mean`) or y (invertible=True).

    Returns (dx (M, N), dbias (N,) or None, dresidual (M, N), dweight (N,), dln_bias (N,)); dresidual is
    dx itself when there is no dropout.
    """
    m, n = dy.shape
    dy, saved, dpre_out = _rows_2d(dy), _rows_2d(saved), _rows_2d(dpre_out)
    has_dropout = dropout_p > 0.0
    dx = torch.empty_like(dy)
    dres = torch.empty_like(dy) if (has_residual and has_dropout) else None
    progs, rows = _bwd_grid(max(m, 1), dy.device)
    part = torch.zeros((3 if has_bias else 2, progs, n), dtype=torch.float32, device=dy.device)
    if m > 0:
        block_n = block_for(n)
        _layer_norm_bwd_kernel[(progs,)](
            dy,
            dpre_out if dpre_out is not None else dy,
            saved,
            weight,
            ln_bias,  #
            mean if mean is not None else rstd,
            rstd,  #
            dx,
            dres if dres is not None else dx,
            part[0],
            part[1],
            part[2] if has_bias else part[0],  #
            dy.stride(0),
            dpre_out.stride(0) if dpre_out is not None else 0,
            saved.stride(0),  #
            dx.stride(0),
            dres.stride(0) if dres is not None else 0,  #
            m,
            n,
            rows,  #
            dropout_p,
            1.0 / (1.0 - dropout_p),
            seed,  #
            BLOCK_N=block_n,
            HAS_DPRE_OUT=dpre_out is not None,
            HAS_BIAS=has_bias,  #
            HAS_RESIDUAL=has_residual,
            HAS_DROPOUT=has_dropout,
            IS_INVERTIBLE=invertible,  #
            num_warps=_num_warps(block_n),
        )
    sums = part.sum(1)  # (2 or 3, N) fp32: the reduction over programs
    dw, db = sums[0].to(weight.dtype), sums[1].to(ln_bias.dtype)
    dbias = sums[2].to(dy.dtype) if has_bias else None
    return dx, dbias, dres if dres is not None else dx, dw, db


def _fwd_spec(dt: str, n: int) -> AotSpec:
    block_n = block_for(n)
    sig = {k: dt for k in ("X", "BIAS", "RES", "W", "B", "Y", "PRE")}
    sig.update(KEEP="*i8", MEAN="*fp32", RSTD="*fp32")
    sig.update({k: "i32" for k in ("stride_x_row", "stride_res_row", "stride_y_row", "stride_pre_row")})
    sig.update(stride_keep_row="i32", M="i32", N="i32", rows_per_program="i32")
    sig.update(eps="fp32", dropout_p="fp32", dropout_scale="fp32", seed="i64")
    flags = dict(HAS_BIAS=True, HAS_RESIDUAL=True, HAS_DROPOUT=True, STORE_PRE=True, STORE_MASK=False)
    sig.update({k: "constexpr" for k in ("BLOCK_N", *flags)})
    return AotSpec(
        name=f"layer_norm_fwd[{dt[1:]},N={n},bias+res+dropout]",
        kernel=_layer_norm_fwd_kernel,
        signature=sig,
        constexprs=dict(BLOCK_N=block_n, **flags),
        num_warps=_num_warps(block_n),
    )


def _bwd_spec(dt: str, n: int, invertible: bool) -> AotSpec:
    block_n = block_for(n)
    sig = {k: dt for k in ("DY", "DPRE_OUT", "SAVED", "W", "B")}
    sig.update(MEAN="*fp32", RSTD="*fp32", DX=dt, DRES=dt, DW_PART="*fp32", DB_PART="*fp32", DBIAS_PART="*fp32")
    sig.update({k: "i32" for k in ("stride_dy_row", "stride_dpre_row", "stride_saved_row", "stride_dx_row")})
    sig.update(stride_dres_row="i32", M="i32", N="i32", rows_per_program="i32")
    sig.update(dropout_p="fp32", dropout_scale="fp32", seed="i64")
    flags = dict(HAS_DPRE_OUT=False, HAS_BIAS=True, HAS_RESIDUAL=True, HAS_DROPOUT=True, IS_INVERTIBLE=invertible)
    sig.update({k: "constexpr" for k in ("BLOCK_N", *flags)})
    return AotSpec(
        name=f"layer_norm_bwd[{dt[1:]},N={n},bias+res+dropout{',invertible' if invertible else ''}]",
        kernel=_layer_norm_bwd_kernel,
        signature=sig,
        constexprs=dict(BLOCK_N=block_n, **flags),
        num_warps=_num_warps(block_n),
    )


# Default configs: BERT-base/large hidden sizes and the largest supported one (MAX_N = 4096), all with every
# feature on (the most registers). At 8192 the backward spills even with 32 warps, hence MAX_N.
AOT_SPECS = [
    spec
    for dt in ("*fp32", "*fp16", "*bf16")
    for spec in (
        *(_fwd_spec(dt, n) for n in (768, 1024, MAX_N)),
        *(_bwd_spec(dt, n, False) for n in (768, 1024, MAX_N)),
        *(_bwd_spec(dt, n, True) for n in (1024, MAX_N)),
    )
]
