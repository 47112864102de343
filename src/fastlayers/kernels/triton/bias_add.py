"""Triton `nhwc_bias_add`: out = act + bias[c] (+ other (+ other_bias[c])), forward only (inference).

The activation is read as a row-major (rows, C) matrix: a channels_last NCHW tensor is [N·H·W, C] with unit
channel stride, a (B, S, C) tensor is [B·S, C]. One elementwise kernel over (BLOCK_M, BLOCK_N) tiles of that
matrix, a 2-D grid (row blocks, column blocks); HAS_OTHER / HAS_OTHER_BIAS select the three DeepSpeed
variants. Loads are widened to fp32, summed as (act + bias) + (other + other_bias) and rounded once at the
store.
"""

import torch
import triton
import triton.language as tl

from fastlayers.kernels.triton._common import TORCH_TO_SIG, row_block, row_run, tile_ptrs
from fastlayers.kernels.triton.aot import AotSpec
from fastlayers.utils import cdiv, next_pow2


@triton.jit
def _nhwc_bias_add_fwd_kernel(
    A_ptr,  # activation (M, C), unit stride along C
    B_ptr,  # bias (C,), unit stride
    O_ptr,  # other (M, C), unit stride along C; not read unless HAS_OTHER
    OB_ptr,  # other_bias (C,), unit stride; not read unless HAS_OTHER_BIAS
    Y_ptr,  # output (M, C), unit stride along C
    stride_a_row,
    stride_o_row,
    stride_y_row,
    M,
    C,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_OTHER: tl.constexpr,
    HAS_OTHER_BIAS: tl.constexpr,
):
    # one (BLOCK_M, BLOCK_N) tile per program; rows are int64 (row0 comes from an int64 program id)
    _, row0, cols, col_mask = row_run(BLOCK_M, C, BLOCK_N)
    rows, mask = row_block(row0, M, col_mask, BLOCK_M)
    y = tl.load(tile_ptrs(A_ptr, rows, cols, stride_a_row), mask=mask, other=0.0).to(tl.float32)
    y += tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_OTHER:
        o = tl.load(tile_ptrs(O_ptr, rows, cols, stride_o_row), mask=mask, other=0.0).to(tl.float32)
        if HAS_OTHER_BIAS:
            o += tl.load(OB_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        y += o
    tl.store(tile_ptrs(Y_ptr, rows, cols, stride_y_row), y.to(Y_ptr.dtype.element_ty), mask=mask)


def _config(c: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 2048-element tiles, at most 256 wide, preferring a width that divides C so
    no column is masked (SD widths 320 / 640 / 1280 / 1600 are multiples of 64, not all of 256)."""
    block_n = min(256, max(16, next_pow2(c)))
    while block_n > 64 and c % block_n:
        block_n //= 2
    return max(1, 2048 // block_n), block_n, 4


def _channels(activation: torch.Tensor) -> int:
    if activation.dim() == 4:
        return activation.shape[1]
    if activation.dim() == 3:
        return activation.shape[2]
    raise ValueError(f"activation must be 4-D NCHW or 3-D (B, S, C), got shape {tuple(activation.shape)}")


def _rows(t: torch.Tensor, c: int) -> torch.Tensor:
    """(rows, C) view of a channels_last NCHW or a (B, S, C) tensor with unit channel stride; a tensor in another
    layout (an NCHW-contiguous `other`, a transposed 3-D view) is copied once."""
    if t.dim() == 4:
        t = t.permute(0, 2, 3, 1)  # NHWC: a contiguous view for a channels_last tensor
    t2 = t.reshape(-1, c)
    return t2 if t2.stride(-1) == 1 or t2.shape[0] == 0 else t2.contiguous()


def nhwc_bias_add_fwd(
    activation: torch.Tensor,
    bias: torch.Tensor,
    other: torch.Tensor | None = None,
    other_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = activation + bias[c] (+ other (+ other_bias[c])), fp32 maths, rounded once to activation.dtype.

    activation: (N, C, H, W) (channels_last, else it is copied to channels_last first) or (B, S, C);
    bias / other_bias: (C,); other: activation's shape, any layout (copied once unless it is laid out like the
    activation's rows). Returns a new channels_last (N, C, H, W) tensor, or a contiguous (B, S, C) one.
    """
    if other_bias is not None and other is None:
        raise ValueError("other_bias was given without other: it is the bias of `other`")
    c = _channels(activation)
    fmt = torch.channels_last if activation.dim() == 4 else torch.contiguous_format
    y = torch.empty_like(activation, memory_format=fmt)
    if y.numel() == 0:
        return y
    a2, y2 = _rows(activation, c), _rows(y, c)
    m = a2.shape[0]
    o2 = _rows(other, c) if other is not None else a2
    b = bias.contiguous()
    ob = other_bias.contiguous() if other_bias is not None else b
    block_m, block_n, num_warps = _config(c)
    grid = (cdiv(m, block_m), cdiv(c, block_n))
    _nhwc_bias_add_fwd_kernel[grid](
        a2,
        b,
        o2,
        ob,
        y2,
        a2.stride(0),
        o2.stride(0),
        y2.stride(0),
        m,
        c,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_OTHER=other is not None,
        HAS_OTHER_BIAS=other_bias is not None,
        num_warps=num_warps,
    )
    return y


def _aot_specs() -> list[AotSpec]:
    """The three variants (bias; + other; + other + other_bias) for fp32 / fp16 / bf16, in the config of the
    Stable Diffusion widths 320 / 640 / 1280 (BLOCK_N = 64 for 320, 128 for 640, 256 for 1280: the 1280 one)."""
    block_m, block_n, num_warps = _config(1280)
    variants = {"bias": (False, False), "other": (True, False), "other_bias": (True, True)}
    specs = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = TORCH_TO_SIG[dtype]
        types = {"A_ptr": t, "B_ptr": t, "O_ptr": t, "OB_ptr": t, "Y_ptr": t}
        types |= {"stride_a_row": "i32", "stride_o_row": "i32", "stride_y_row": "i32", "M": "i32", "C": "i32"}
        for tag, (has_other, has_other_bias) in variants.items():
            specs.append(
                AotSpec(
                    name=f"nhwc_bias_add_fwd[{t[1:]},{tag},BLOCK_M={block_m},BLOCK_N={block_n}]",
                    kernel=_nhwc_bias_add_fwd_kernel,
                    signature={n: types.get(n, "constexpr") for n in _nhwc_bias_add_fwd_kernel.arg_names},
                    constexprs={
                        "BLOCK_M": block_m,
                        "BLOCK_N": block_n,
                        "HAS_OTHER": has_other,
                        "HAS_OTHER_BIAS": has_other_bias,
                    },
                    num_warps=num_warps,
                )
            )
    return specs


AOT_SPECS = _aot_specs()
