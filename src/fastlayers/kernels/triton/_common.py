"""Helpers shared by the Triton kernel modules (dtype maps, launch hints, AOT signature strings), plus the
`@triton.jit` maths and the host launchers shared by the bias + activation ops (bias_gelu, bias_geglu)."""

import torch
import triton
import triton.language as tl

from fastlayers.kernels.triton.aot import AotSpec
from fastlayers.utils import cdiv, next_pow2, triton_interpret

TORCH_TO_SIG = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int8: "*i8",
    torch.uint8: "*u8",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.bool: "*i1",
}

# dtypes compiled ahead of time for each kernel family (bf16 is GPU-only; fp16 covers the half path)
AOT_DTYPES = ("*fp32", "*fp16", "*bf16")


def interpreting() -> bool:
    return triton_interpret()


def num_programs_hint(device: torch.device) -> int:
    """Number of persistent programs to launch: SM count on CUDA, a small constant under the interpreter."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def block_for(n: int, cap: int = 65536) -> int:
    """Power-of-two block that covers a row of n elements (at least 16)."""
    return min(max(16, next_pow2(n)), cap)


# -- bias + activation ops (bias_gelu, bias_geglu): shared jit maths, tiles and launchers --


@triton.jit
def gelu_erf(u):
    """Exact (erf) gelu(u) for fp32 u."""
    # 0.7071067811 = 1/sqrt(2)
    return 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))


@triton.jit
def gelu_erf_cdf_grad(u):
    """(Φ(u), gelu'(u)) for fp32 u: gelu'(u) = Φ(u) + u·φ(u); 0.3989422804 = 1/sqrt(2π)."""
    cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
    return cdf, cdf + u * (0.3989422804014327 * tl.exp(-0.5 * u * u))


@triton.jit
def row_run(rows_per_prog, N, BLOCK_N: tl.constexpr):
    """This program's run of rows_per_prog rows (program id and first row, int64) and its BLOCK_N columns of N
    with their mask: grid (row programs, column blocks)."""
    pid_m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, pid_m * rows_per_prog, cols, cols < N


@triton.jit
def row_block(row, M, col_mask, BLOCK_M: tl.constexpr):
    """Rows row .. row + BLOCK_M (of M) and the tile mask with the columns' col_mask."""
    rows = row + tl.arange(0, BLOCK_M)
    return rows, (rows[:, None] < M) & col_mask[None, :]


@triton.jit
def tile_ptrs(ptr, rows, cols, stride_row):
    """Pointers to a (rows, cols) tile of a row-major matrix with unit column stride."""
    return ptr + rows[:, None] * stride_row + cols[None, :]


def rows_view(t: torch.Tensor, n: int) -> torch.Tensor:
    """(M, n) view of t; the kernels need a unit stride along the last dim, so copy only when it is missing."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or t2.shape[0] == 0 else t2.contiguous()


def unit_stride(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels read the bias with unit stride."""
    return None if bias is None else bias.contiguous()


def bias_act_fwd(kernel, x: torch.Tensor, bias: torch.Tensor | None, n: int, config, **flags) -> torch.Tensor:
    """The (M, n) output of a bias + activation forward kernel on x (..., K) read as M rows of K, bias (K,) or
    None: a 2-D grid of (BLOCK_M, BLOCK_N) output tiles, `config(n) -> (BLOCK_M, BLOCK_N, num_warps)`, `flags`
    the op's own constexprs."""
    bias = unit_stride(bias)
    x2 = rows_view(x, x.shape[-1])
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    block_m, block_n, num_warps = config(n)
    grid = (cdiv(m, block_m), cdiv(n, block_n))
    kernel[grid](
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
        num_warps=num_warps,
        **flags,
    )
    return y


def bias_act_bwd(
    kernel,
    dy: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    config,
    need_dbias: bool,
    **flags,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A bias + activation backward kernel on dy (..., n) and the saved x (..., K), bias (K,) or None. Returns
    (dx with the shape and dtype of x, dbias (K,) in bias.dtype, summed here from fp32 per-program partials, or
    None without bias / need_dbias). `config(n) -> (BLOCK_M, BLOCK_N, num_warps)`, `flags` the op's own
    constexprs."""
    bias = unit_stride(bias)
    k = x.shape[-1]
    x2, dy2 = rows_view(x, k), rows_view(dy, n)
    m = x2.shape[0]
    has_db = bias is not None and need_dbias
    dx = torch.empty((m, k), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return dx.view(x.shape), torch.zeros_like(bias) if has_db else None
    block_m, block_n, num_warps = config(n)
    n_col = cdiv(n, block_n)
    # about 4 programs per SM in all (a small constant under the interpreter); each owns a run of rows
    n_row_progs = max(1, min(cdiv(m, block_m), 4 * num_programs_hint(x.device) // n_col))
    rows_per_prog = cdiv(cdiv(m, block_m), n_row_progs) * block_m
    n_row_progs = cdiv(m, rows_per_prog)
    partial = torch.empty((n_row_progs, k), dtype=torch.float32, device=x.device) if has_db else dx
    kernel[(n_row_progs, n_col)](
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
        num_warps=num_warps,
        **flags,
    )
    return dx.view(x.shape), partial.sum(0).to(bias.dtype) if has_db else None


def _signature(kernel, types: dict[str, str]) -> dict[str, str]:
    """Every argument in order: the given types, constexpr for the rest."""
    return {name: types.get(name, "constexpr") for name in kernel.arg_names}


def bias_act_aot_specs(
    op: str, fwd_kernel, bwd_kernel, config: tuple[int, int, int], n_arg: str, flag: str, flag_tags: tuple[str, str]
) -> list[AotSpec]:
    """AOT specs of a bias + activation op's fwd and bwd kernels in one config, with a bias (and dbias), for each
    dtype and each value of its boolean constexpr `flag` (tagged flag_tags[False], flag_tags[True]);
    `n_arg` names the kernels' width argument."""
    block_m, block_n, num_warps = config
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = TORCH_TO_SIG[dtype]
        for value in (False, True):
            consts = {"BLOCK_M": block_m, "BLOCK_N": block_n, "HAS_BIAS": True, flag: value}
            tag = f"{t[1:]},{flag_tags[value]},BLOCK_M={block_m},BLOCK_N={block_n}"
            fwd_types = {"X_ptr": t, "B_ptr": t, "Y_ptr": t, "stride_x_row": "i32", "stride_y_row": "i32"}
            bwd_types = {"DY_ptr": t, "X_ptr": t, "B_ptr": t, "DX_ptr": t, "DB_ptr": "*fp32", "rows_per_prog": "i32"}
            bwd_types |= {f"stride_{s}_row": "i32" for s in ("dy", "x", "dx", "db")}
            sizes = {"M": "i32", n_arg: "i32"}
            specs += [
                AotSpec(
                    name=f"{op}_fwd[{tag}]",
                    kernel=fwd_kernel,
                    signature=_signature(fwd_kernel, fwd_types | sizes),
                    constexprs=consts,
                    num_warps=num_warps,
                ),
                AotSpec(
                    name=f"{op}_bwd[{tag}]",
                    kernel=bwd_kernel,
                    signature=_signature(bwd_kernel, bwd_types | sizes),
                    constexprs={**consts, "HAS_DBIAS": True},
                    num_warps=num_warps,
                ),
            ]
    return specs
