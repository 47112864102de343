"""Fused bias + GELU (`bias_gelu`) and GELU feeding a linear (`bias_gelu_linear`, DeepSpeed's gelu_checkpoint).

The elementwise part runs on the chosen backend (plain PyTorch or Triton); the matmuls are torch GEMMs.
Both ops keep only the pre-activation input `x` for the GELU backward and recompute `x + bias` there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastlayers import backends
from fastlayers.backends import Impl
from fastlayers.kernels.torch import bias_gelu as torch_kernels
from fastlayers.utils import FLOAT_DTYPES, check_tensor, dtype_name

APPROXIMATIONS = ("none", "tanh")


def _triton_kernels():
    from fastlayers.kernels.triton import bias_gelu as triton_kernels

    return triton_kernels


# -- shared bodies of the per-backend Functions (`kern` is the L1 module: torch or Triton launchers) --


def _act_forward(ctx, kern, x, bias, approximate):
    ctx.approximate = approximate
    if any(ctx.needs_input_grad[:2]):
        ctx.save_for_backward(x, bias)  # only the input: x + bias and the output are recomputed/not needed
    return kern.bias_gelu_fwd(x, bias, approximate)


def _act_backward(ctx, kern, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = kern.bias_gelu_bwd(dy, x, bias, ctx.approximate, need_dbias=ctx.needs_input_grad[1])
    return dx, dbias


def _linear_forward(ctx, kern, x, bias, weight, out_bias, approximate, checkpoint):
    ctx.approximate = approximate
    h = kern.bias_gelu_fwd(x, bias, approximate)  # (..., N)
    out = F.linear(h, weight, out_bias)  # (..., M)
    if any(ctx.needs_input_grad[:4]):
        # gelu_checkpoint: keep x only and recompute h in backward; otherwise keep h for the weight gradient
        ctx.save_for_backward(x, bias, weight, None if checkpoint else h)
    return out


def _linear_backward(ctx, kern, dout):
    x, bias, weight, h = ctx.saved_tensors
    need_dx, need_dbias, need_dw, need_dob = ctx.needs_input_grad[:4]
    n, m = x.shape[-1], weight.shape[0]
    dout2 = dout.reshape(-1, m)  # (rows, M)
    dx = dbias = dweight = dout_bias = None
    if need_dw:
        if h is None:
            h = kern.bias_gelu_fwd(x, bias, ctx.approximate)  # gelu_checkpoint: recompute the activation
        dweight = dout2.t().mm(h.reshape(-1, n))  # (M, N)
    if need_dob:
        acc = torch.float64 if dout.dtype == torch.float64 else torch.float32
        dout_bias = dout2.sum(0, dtype=acc).to(dout.dtype)  # (M,)
    if need_dx or need_dbias:
        dh = dout2.mm(weight).view(x.shape)  # (..., N)
        dx, dbias = kern.bias_gelu_bwd(dh, x, bias, ctx.approximate, need_dbias=need_dbias)
    return dx, dbias, dweight, dout_bias


class BiasGeluTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approximate):
        return _act_forward(ctx, torch_kernels, x, bias, approximate)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return *_act_backward(ctx, torch_kernels, dy), None  # approximate


class BiasGeluTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approximate):
        return _act_forward(ctx, _triton_kernels(), x, bias, approximate)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        return *_act_backward(ctx, _triton_kernels(), dy), None  # approximate


class BiasGeluLinearTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, weight, out_bias, approximate, checkpoint):
        return _linear_forward(ctx, torch_kernels, x, bias, weight, out_bias, approximate, checkpoint)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        return *_linear_backward(ctx, torch_kernels, dout), None, None  # approximate, checkpoint


class BiasGeluLinearTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, weight, out_bias, approximate, checkpoint):
        return _linear_forward(ctx, _triton_kernels(), x, bias, weight, out_bias, approximate, checkpoint)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        return *_linear_backward(ctx, _triton_kernels(), dout), None, None  # approximate, checkpoint


def _torch_impl(x, bias, *, approximate="none"):
    return BiasGeluTorchFunction.apply(x, bias, approximate)


def _triton_impl(x, bias, *, approximate="none"):
    return BiasGeluTritonFunction.apply(x, bias, approximate)


def _linear_torch_impl(x, bias, weight, out_bias=None, *, approximate="none", checkpoint=False):
    return BiasGeluLinearTorchFunction.apply(x, bias, weight, out_bias, approximate, checkpoint)


def _linear_triton_impl(x, bias, weight, out_bias=None, *, approximate="none", checkpoint=False):
    return BiasGeluLinearTritonFunction.apply(x, bias, weight, out_bias, approximate, checkpoint)


_HERE = "fastlayers.functional.bias_gelu"
_CUDA = frozenset({"cuda"})  # plus CPU under TRITON_INTERPRET=1 (added by backends.py)
backends.register(Impl("bias_gelu", "reference", "fastlayers.reference.activations:bias_gelu_ref"))
backends.register(Impl("bias_gelu", "torch", f"{_HERE}:_torch_impl"))
backends.register(Impl("bias_gelu", "triton", f"{_HERE}:_triton_impl", devices=_CUDA))
backends.register(Impl("bias_gelu_linear", "reference", "fastlayers.reference.activations:bias_gelu_linear_ref"))
backends.register(Impl("bias_gelu_linear", "torch", f"{_HERE}:_linear_torch_impl"))
backends.register(Impl("bias_gelu_linear", "triton", f"{_HERE}:_linear_triton_impl", devices=_CUDA))


def _check_same(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {dtype_name(t.dtype)} but x has {dtype_name(x.dtype)}; they must match")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must be on the same device")


def _validate(x, bias, approximate, weight=None, out_bias=None, *, linear=False) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim (..., N), got a 0-dim tensor")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    n = x.shape[-1]
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (n,):
            raise ValueError(
                f"bias must have shape ({n},) to match the last dim of x {tuple(x.shape)}, got {tuple(bias.shape)}"
            )
        _check_same("bias", bias, x)
    if not linear:
        return
    check_tensor("weight", weight, ndim=2)
    if weight.shape[1] != n:
        raise ValueError(
            f"weight must have shape (M, {n}) to match the last dim of x {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    _check_same("weight", weight, x)
    if out_bias is not None:
        check_tensor("out_bias", out_bias)
        if out_bias.shape != (weight.shape[0],):
            raise ValueError(
                f"out_bias must have shape ({weight.shape[0]},) to match weight {tuple(weight.shape)}, "
                f"got {tuple(out_bias.shape)}"
            )
        _check_same("out_bias", out_bias, x)


def bias_gelu(
    x: torch.Tensor, bias: torch.Tensor | None, *, approximate: str = "none", backend: str | None = None
) -> torch.Tensor:
    """Fused bias + GELU: gelu(x + bias), bias broadcast over the last dim.

    The autograd graph keeps only `x` (not `x + bias`, not the output); backward recomputes `x + bias`.
    Half inputs are computed in fp32 and rounded once. The bias gradient sums over all leading dims
    with fp32 (fp64 for fp64) accumulation.

    Args:
        x: (..., N), fp16 / bf16 / fp32 / fp64.
        bias: (N,), same dtype and device as x, or None (plain GELU).
        approximate: "none" for 0.5·u·(1 + erf(u/√2)), "tanh" for
            0.5·u·(1 + tanh(0.7978845608·(u + 0.044715·u³))) (DeepSpeed's training layer).
        backend: "reference" | "torch" | "triton" | None (FASTLAYERS_BACKEND, then triton -> torch -> reference
            on CUDA, torch -> reference on CPU).

    Returns:
        (..., N), dtype of x.

    Equivalent PyTorch:
        `fastlayers.reference.activations.bias_gelu_ref` (= `F.gelu(x + bias, approximate=approximate)`).

    Backends:
        reference: every dtype and device (computes in the input dtype unless upcast).
        torch: every dtype and device; fp32 maths for fp16/bf16.
        triton: CUDA fp16/bf16/fp32; CPU fp16/fp32 under TRITON_INTERPRET=1 (tests).
    """
    _validate(x, bias, approximate)
    impl = backends.select("bias_gelu", backend, x=x, bias=bias, approximate=approximate)
    return impl.resolve()(x, bias, approximate=approximate)


def bias_gelu_linear(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    weight: torch.Tensor,
    out_bias: torch.Tensor | None = None,
    *,
    approximate: str = "none",
    checkpoint: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """gelu(x + bias) @ weight.T + out_bias: a transformer FFN's activation feeding its second linear.

    `checkpoint=True` is DeepSpeed's gelu_checkpoint: only the pre-activation `x` is kept for backward (not
    the GELU output) and the activation is recomputed there for the weight gradient. `checkpoint=False`
    keeps the activation too (one elementwise pass less in backward). Outputs and gradients are identical.
    The GELU runs on the selected backend; the matmuls are torch GEMMs in the input dtype.

    Args:
        x: (..., N) pre-activation (the first linear's output before its bias), fp16 / bf16 / fp32 / fp64.
        bias: (N,) or None, same dtype and device as x.
        weight: (M, N), same dtype and device as x (nn.Linear layout: out_features, in_features).
        out_bias: (M,) or None, same dtype and device as x.
        approximate: "none" (erf GELU) or "tanh".
        checkpoint: recompute the GELU output in backward instead of saving it.
        backend: "reference" | "torch" | "triton" | None (see `bias_gelu`).

    Returns:
        (..., M), dtype of x.

    Equivalent PyTorch:
        `fastlayers.reference.activations.bias_gelu_linear_ref`
        (= `F.linear(F.gelu(x + bias, approximate=approximate), weight, out_bias)`).

    Backends:
        reference: every dtype, device and flag (checkpoint through torch.utils.checkpoint).
        torch: every dtype and device; GELU in fp32 for fp16/bf16.
        triton: CUDA fp16/bf16/fp32; CPU fp16/fp32 under TRITON_INTERPRET=1 (tests).
    """
    _validate(x, bias, approximate, weight, out_bias, linear=True)
    impl = backends.select(
        "bias_gelu_linear",
        backend,
        x=x,
        bias=bias,
        weight=weight,
        out_bias=out_bias,
        approximate=approximate,
        checkpoint=checkpoint,
    )
    return impl.resolve()(x, bias, weight, out_bias, approximate=approximate, checkpoint=checkpoint)
