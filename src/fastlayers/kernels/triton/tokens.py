"""Triton token gather / scatter of Random-LTD: row copies, one program per (token row, C tile).

Both activation layouts, (B, S, C) and (S, B, C), are passed as a (B, S, C) view with its strides, so
seq-first, transposed and padded tensors are read and written in place; only a non-unit stride along C is
copied first. Offsets are int64 (b·stride_b + s·stride_s overflows int32 beyond 2^31 elements).

- gather: out[b, r] = act[b, idx[b, r]]; one program per (b, r) copies a BLOCK_C slice of the row.
- scatter: all[b, idx[b, r]] = part[b, r], in place (a repeated position keeps one of its values).
- gather backward: dact[b, s] = Σ_{r: idx[b, r] = s} grad[b, r] (index_add semantics, fp32 sum), zeros at
  dropped positions. One program per *destination* row (b, s) sums its sources, found through a per-row
  argsort of idx and the bounds of each position's run (`searchsorted`): no atomics, deterministic, and
  the zero fill is fused into the same pass. For Random-LTD's distinct indices each run has 0 or 1 entries.

An index outside [0, S) is skipped (gather writes zeros, scatter writes nothing, backward drops it), so a bad
index cannot touch memory outside the tensors; the functional layer rejects such indices on CPU.
"""

import torch
import triton
import triton.language as tl

from fastlayers.kernels.triton._common import TORCH_TO_SIG
from fastlayers.kernels.triton.aot import AotSpec
from fastlayers.utils import cdiv, next_pow2


@triton.jit
def _token_copy_kernel(
    SRC_ptr,  # gather: activations (B, S, C) view; scatter: part (B, R, C) view; unit stride along C
    IDX_ptr,  # indices (B, R), int32 or int64
    DST_ptr,  # gather: output (B, R, C) view; scatter: all (B, S, C) view, written in place; unit stride along C
    stride_srcb,
    stride_srcn,  # along S (gather) or R (scatter)
    stride_dstb,
    stride_dstn,  # along R (gather) or S (scatter)
    stride_ib,
    stride_ir,
    S,
    R,
    C,
    BLOCK_C: tl.constexpr,
    IS_SCATTER: tl.constexpr,  # False: dst[b, r] = src[b, idx[b, r]]; True: dst[b, idx[b, r]] = src[b, r]
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // R
    r = pid % R
    s = tl.load(IDX_ptr + b * stride_ib + r * stride_ir).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s_tile = tl.zeros((BLOCK_C,), dtype=tl.int64) + s  # as a tile: the interpreter cannot AND a scalar mask in
    mask = (cols < C) & (s_tile >= 0) & (s_tile < S)
    if IS_SCATTER:  # an out-of-range index writes nothing
        v = tl.load(SRC_ptr + b * stride_srcb + r * stride_srcn + cols, mask=mask)
        tl.store(DST_ptr + b * stride_dstb + s * stride_dstn + cols, v, mask=mask)
    else:  # an out-of-range index writes zeros
        v = tl.load(SRC_ptr + b * stride_srcb + s * stride_srcn + cols, mask=mask, other=0.0)
        tl.store(DST_ptr + b * stride_dstb + r * stride_dstn + cols, v, mask=cols < C)


@triton.jit
def _token_gather_bwd_kernel(
    G_ptr,  # upstream gradient (B, R, C) view, unit stride along C
    ORDER_ptr,  # (B, R) int32: argsort of each index row (positions r in increasing idx[b, r])
    BOUNDS_ptr,  # (B, S + 1) int32: sources of (b, s) are ORDER[b, BOUNDS[b, s] : BOUNDS[b, s + 1]]
    DX_ptr,  # output gradient (B, S, C) view, unit stride along C
    stride_gb,
    stride_gr,
    stride_dxb,
    stride_dxs,
    S,
    R,
    C,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // S
    s = pid % S
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    lo = tl.load(BOUNDS_ptr + b * (S + 1) + s)
    hi = tl.load(BOUNDS_ptr + b * (S + 1) + s + 1)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)  # a dropped position (empty run) gets zeros
    for j in range(lo, hi):
        r = tl.load(ORDER_ptr + b * R + j).to(tl.int64)
        acc += tl.load(G_ptr + b * stride_gb + r * stride_gr + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(DX_ptr + b * stride_dxb + s * stride_dxs + cols, acc.to(DX_ptr.dtype.element_ty), mask=cmask)


def _config(c: int) -> tuple[int, int]:
    """(BLOCK_C, num_warps): a row tile of up to 2048 elements (16 per thread with 4 warps), wider C tiled
    over the grid's second axis."""
    return min(2048, max(16, next_pow2(c))), 4


def _bsc(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return x if batch_first else x.transpose(0, 1)


def _unit_c(x: torch.Tensor) -> torch.Tensor:
    """The kernels need a unit stride along C; copy only when it is missing."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _launch(kernel, rows: int, c: int, *args, **constexprs) -> None:
    """One program per (row, BLOCK_C tile of C); `args` are the kernel's arguments before C."""
    block_c, num_warps = _config(c)
    kernel[(rows, cdiv(c, block_c))](*args, c, BLOCK_C=block_c, num_warps=num_warps, **constexprs)


def _copy_rows(src: torch.Tensor, indices: torch.Tensor, dst: torch.Tensor, nb: int, ns: int, scatter: bool) -> None:
    """`_token_copy_kernel` on (B, *, C) views: gather (src (B, S, C) -> dst (B, R, C)) or scatter (the reverse)."""
    nr = indices.shape[1]
    strides = (*src.stride()[:2], *dst.stride()[:2], *indices.stride())
    _launch(_token_copy_kernel, nb * nr, dst.shape[-1], src, indices, dst, *strides, ns, nr, IS_SCATTER=scatter)


def token_gather(activations: torch.Tensor, indices: torch.Tensor, batch_first: bool = True) -> torch.Tensor:
    """out[b, r] = act[b, idx[b, r]]: (B, S, C) -> (B, R, C) (or (S, B, C) -> (R, B, C)), a new contiguous tensor."""
    x = _bsc(_unit_c(activations), batch_first)  # (B, S, C) view
    nb, ns, c = x.shape
    nr = indices.shape[1]
    out = torch.empty((nb, nr, c) if batch_first else (nr, nb, c), dtype=x.dtype, device=x.device)
    if out.numel():
        _copy_rows(x, indices, _bsc(out, batch_first), nb, ns, scatter=False)
    return out


def token_scatter_(
    all_activations: torch.Tensor, part_activations: torch.Tensor, indices: torch.Tensor, batch_first: bool = True
) -> torch.Tensor:
    """In place all[b, idx[b, r]] = part[b, r]; returns `all_activations`. A repeated position keeps one value."""
    dst = _unit_c(all_activations)  # a copy only when C is strided; written back below
    y = _bsc(dst, batch_first)  # (B, S, C) view
    nb, ns, c = y.shape
    if nb * indices.shape[1] * c:
        _copy_rows(_bsc(_unit_c(part_activations), batch_first), indices, y, nb, ns, scatter=True)
    if dst is not all_activations:
        all_activations.copy_(dst)
    return all_activations


def gather_bwd_plan(indices: torch.Tensor, seq_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order (B, R) int32, bounds (B, S + 1) int32) for `_token_gather_bwd_kernel`: the sources of position s in
    row b are order[b, bounds[b, s]:bounds[b, s + 1]]. An out-of-range index falls outside every run."""
    idx = indices.long()
    sorted_idx, order = torch.sort(idx, dim=1, stable=True)
    pos = torch.arange(seq_length + 1, device=idx.device).expand(idx.shape[0], -1).contiguous()
    bounds = torch.searchsorted(sorted_idx.contiguous(), pos)  # (B, S + 1): #(idx[b] < s)
    return order.to(torch.int32), bounds.to(torch.int32)


def token_gather_bwd(
    grad_out: torch.Tensor, indices: torch.Tensor, seq_length: int, batch_first: bool = True
) -> torch.Tensor:
    """d act: zeros (B, S, C) (or (S, B, C)) plus grad_out[b, r] summed into row idx[b, r] (fp32 sums)."""
    g = _bsc(_unit_c(grad_out), batch_first)  # (B, R, C) view
    nb, nr, c = g.shape
    dact = torch.empty((nb, seq_length, c) if batch_first else (seq_length, nb, c), dtype=g.dtype, device=g.device)
    if dact.numel():
        dx = _bsc(dact, batch_first)  # (B, S, C) view
        order, bounds = gather_bwd_plan(indices, seq_length)
        strides = (*g.stride()[:2], *dx.stride()[:2])
        _launch(_token_gather_bwd_kernel, nb * seq_length, c, g, order, bounds, dx, *strides, seq_length, nr)
    return dact


def _spec(name: str, kernel, types: dict[str, str], constexprs: dict, num_warps: int) -> AotSpec:
    """An AotSpec whose signature lists every argument in order: the given types, constexpr for the rest."""
    signature = {arg: types.get(arg, "constexpr") for arg in kernel.arg_names}
    return AotSpec(name=name, kernel=kernel, signature=signature, constexprs=constexprs, num_warps=num_warps)


def _aot_specs() -> list[AotSpec]:
    """The default config (BLOCK_C for C >= 2048, e.g. GPT-2 XL's 1600 rounds to 2048) for each activation dtype,
    with int32 indices (what the samplers return) and int64 indices (gather / scatter)."""
    block_c, num_warps = _config(2048)
    ints = {n: "i32" for n in ("S", "R", "C")}
    copy_strides = ("stride_srcb", "stride_srcn", "stride_dstb", "stride_dstn", "stride_ib", "stride_ir")
    bwd_strides = ("stride_gb", "stride_gr", "stride_dxb", "stride_dxs")
    consts = {"BLOCK_C": block_c}
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = TORCH_TO_SIG[dtype]
        for it in ("*i32", "*i64"):
            copy = {"SRC_ptr": t, "IDX_ptr": it, "DST_ptr": t, **ints, **dict.fromkeys(copy_strides, "i32")}
            for op, scatter in (("token_gather", False), ("token_scatter", True)):
                name = f"{op}[{t[1:]},idx={it[1:]},BLOCK_C={block_c}]"
                specs.append(_spec(name, _token_copy_kernel, copy, {**consts, "IS_SCATTER": scatter}, num_warps))
        bwd = {"G_ptr": t, "ORDER_ptr": "*i32", "BOUNDS_ptr": "*i32", "DX_ptr": t, **ints}
        bwd.update(dict.fromkeys(bwd_strides, "i32"))
        name = f"token_gather_bwd[{t[1:]},BLOCK_C={block_c}]"
        specs.append(_spec(name, _token_gather_bwd_kernel, bwd, consts, num_warps))
    return specs


AOT_SPECS = _aot_specs()
