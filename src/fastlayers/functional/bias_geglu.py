"""Fused bias + GEGLU (`bias_geglu`): the gated activation of a Stable Diffusion feed-forward.

DeepSpeed's `bias_geglu` / `gated_activation` kernel (diffusers transformer block, FF step 7), with a backward
added. The autograd graph keeps only the input `x` (and `bias`); backward recomputes `x + bias`.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastlayers import backends
from fastlayers.backends import Impl
from fastlayers.kernels.torch import bias_geglu as torch_kernels
from fastlayers.utils import FLOAT_DTYPES, check_tensor, dtype_name

ACTIVATIONS = ("gelu", "silu")


def _triton_kernels():
    from fastlayers.kernels.triton import bias_geglu as triton_kernels

    return triton_kernels


# -- shared bodies of the per-backend Functions (`kern` is the L1 module: torch or Triton launchers) --


def _geglu_forward(ctx, kern, x, bias, activation):
    ctx.activation = activation
    if any(ctx.needs_input_grad[:2]):
        ctx.save_for_backward(x, bias)  # only the input: x + bias, act(gate) and the output are recomputed/not needed
    return kern.bias_geglu_fwd(x, bias, activation)


def _geglu_backward(ctx, kern, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = kern.bias_geglu_bwd(dy, x, bias, ctx.activation, need_dbias=ctx.needs_input_grad[1])
    return dx, dbias


class BiasGegluTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, activation):
        return _geglu_forward(ctx, torch_kernels, x, bias, activation)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return *_geglu_backward(ctx, torch_kernels, dy), None  # activation


class BiasGegluTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, activation):
        return _geglu_forward(ctx, _triton_kernels(), x, bias, activation)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return *_geglu_backward(ctx, _triton_kernels(), dy), None  # activation


def _torch_impl(x, bias=None, *, activation="gelu"):
    return BiasGegluTorchFunction.apply(x, bias, activation)


def _triton_impl(x, bias=None, *, activation="gelu"):
    return BiasGegluTritonFunction.apply(x, bias, activation)


_HERE = "fastlayers.functional.bias_geglu"
_CUDA = frozenset({"cuda"})  # plus CPU under TRITON_INTERPRET=1 (added by backends.py)
backends.register(Impl("bias_geglu", "reference", "fastlayers.reference.geglu:bias_geglu_ref"))
backends.register(Impl("bias_geglu", "torch", f"{_HERE}:_torch_impl"))
backends.register(Impl("bias_geglu", "triton", f"{_HERE}:_triton_impl", devices=_CUDA))


def _validate(x, bias, activation) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim (..., 2C), got a 0-dim tensor")
    if x.shape[-1] % 2:
        raise ValueError(
            f"x must have an even last dim (..., 2C) to split into value and gate halves, got shape {tuple(x.shape)}"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if bias is None:
        return
    check_tensor("bias", bias)
    n = x.shape[-1]
    if bias.shape != (n,):
        raise ValueError(
            f"bias must have shape ({n},) to match the last dim of x {tuple(x.shape)}, got {tuple(bias.shape)}"
        )
    if bias.dtype != x.dtype:
        raise TypeError(f"bias has dtype {dtype_name(bias.dtype)} but x has {dtype_name(x.dtype)}; they must match")
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}; they must be on the same device")


def bias_geglu(
    x: torch.Tensor, bias: torch.Tensor | None = None, *, activation: str = "gelu", backend: str | None = None
) -> torch.Tensor:
    """Fused bias + GEGLU: h · act(gate), where (h, gate) are the two halves of x + bias along the last dim.

    y = x + bias;  h = y[..., :C] (value);  gate = y[..., C:];  out = h · act(gate)

    The autograd graph keeps only `x` and `bias` (not `x + bias`, not act(gate), not the output); backward
    recomputes `x + bias`. Half inputs are computed in fp32 and rounded once. The bias gradient sums over all
    leading dims with fp32 (fp64 for fp64) accumulation.

    Args:
        x: (..., 2C), fp16 / bf16 / fp32 / fp64; the last dim must be even.
        bias: (2C,), same dtype and device as x, or None.
        activation: "gelu" for the exact 0.5·g·(1 + erf(g/√2)) (DeepSpeed's GEGLU), "silu" for g·sigmoid(g)
            (DeepSpeed's GATED_SILU).
        backend: "reference" | "torch" | "triton" | None (FASTLAYERS_BACKEND, then triton -> torch -> reference
            on CUDA, torch -> reference on CPU).

    Returns:
        (..., C), dtype of x.

    Equivalent PyTorch:
        `fastlayers.reference.geglu.bias_geglu_ref`
        (= `h, g = (x + bias).chunk(2, -1); h * F.gelu(g.float()).to(x.dtype)`, or `F.silu` for "silu").

    Backends:
        reference: every dtype and device (computes in the input dtype unless upcast).
        torch: every dtype and device; fp32 maths for fp16/bf16.
        triton: CUDA fp16/bf16/fp32; CPU fp16/fp32 under TRITON_INTERPRET=1 (tests).
    """
    _validate(x, bias, activation)
    impl = backends.select("bias_geglu", backend, x=x, bias=bias, activation=activation)
    return impl.resolve()(x, bias, activation=activation)
