"""Per-channel bias add for channels_last activations (`nhwc_bias_add`), DeepSpeed's spatial-extension op.

Inference op: forward only. The reference and torch backends run under autograd when an input requires grad
(plain differentiable ops); the Triton backend is inference-only and is not selected for such inputs.
"""

from __future__ import annotations

import torch

from fastlayers import backends
from fastlayers.backends import Impl
from fastlayers.kernels.torch import bias_add as torch_kernels
from fastlayers.reference.bias_add import nhwc_bias_add_ref
from fastlayers.utils import FLOAT_DTYPES, check_tensor, dtype_name

CHANNELS_LAST_HINT = "call .contiguous(memory_format=torch.channels_last) on it"


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _torch_impl(activation, bias, other=None, other_bias=None):
    if _needs_grad(activation, bias, other, other_bias):
        # differentiable plain ops (fp32 maths for half, cast back); the fast path writes through out=
        return nhwc_bias_add_ref(activation, bias, other, other_bias, upcast=True)
    return torch_kernels.nhwc_bias_add_fwd(activation, bias, other, other_bias)


def _triton_impl(activation, bias, other=None, other_bias=None):
    from fastlayers.kernels.triton import bias_add as triton_kernels

    return triton_kernels.nhwc_bias_add_fwd(activation, bias, other, other_bias)


def _triton_reasons(activation, **_) -> list[str]:
    if activation.dim() == 4 and not activation.is_contiguous(memory_format=torch.channels_last):
        return [
            f"the Triton kernel needs a channels_last contiguous 4-D activation (strides {activation.stride()} "
            f"for shape {tuple(activation.shape)}): {CHANNELS_LAST_HINT}, or use backend='torch'"
        ]
    return []


_HERE = "fastlayers.functional.bias_add"
_CUDA = frozenset({"cuda"})  # plus CPU under TRITON_INTERPRET=1 (added by backends.py)
backends.register(Impl("nhwc_bias_add", "reference", "fastlayers.reference.bias_add:nhwc_bias_add_ref"))
backends.register(Impl("nhwc_bias_add", "torch", f"{_HERE}:_torch_impl"))
backends.register(
    Impl(
        "nhwc_bias_add",
        "triton",
        f"{_HERE}:_triton_impl",
        devices=_CUDA,
        supports_backward=False,
        check=_triton_reasons,
    )
)


def _check_like(name: str, t: torch.Tensor, activation: torch.Tensor, shape: tuple[int, ...]) -> None:
    check_tensor(name, t)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != activation.dtype:
        raise TypeError(
            f"{name} has dtype {dtype_name(t.dtype)} but activation has {dtype_name(activation.dtype)}; they must match"
        )
    if t.device != activation.device:
        raise ValueError(
            f"{name} is on {t.device} but activation is on {activation.device}; they must be on one device"
        )


def _validate(activation, bias, other, other_bias) -> None:
    check_tensor("activation", activation, dtypes=FLOAT_DTYPES)
    if activation.dim() not in (3, 4):
        raise ValueError(
            f"activation must be 4-D NCHW (channels_last) or 3-D (B, S, C), got {activation.dim()}-D shape "
            f"{tuple(activation.shape)}"
        )
    c = activation.shape[1] if activation.dim() == 4 else activation.shape[2]
    _check_like("bias", bias, activation, (c,))
    if other_bias is not None and other is None:
        raise ValueError("other_bias was given without other: it is the bias of `other`, pass other too")
    if other is not None:
        _check_like("other", other, activation, tuple(activation.shape))
    if other_bias is not None:
        _check_like("other_bias", other_bias, activation, (c,))


def nhwc_bias_add(
    activation: torch.Tensor,
    bias: torch.Tensor,
    other: torch.Tensor | None = None,
    other_bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-channel bias add with an optional residual: DeepSpeed's `nhwc_bias_add`.

    out = activation + bias[c]                              (other None)
    out = activation + bias[c] + other                      (other given)
    out = activation + bias[c] + other + other_bias[c]      (both given)

    Returns a new tensor (the inputs are not modified) with activation's shape, dtype and memory format.
    fp16/bf16 are computed in fp32 and rounded once.

    Args:
        activation: (N, C, H, W) stored channels_last (DeepSpeed's layout, read as [N, H·W, C]) or (B, S, C).
            A 4-D tensor in another layout (e.g. NCHW-contiguous) is accepted by the reference and torch backends
            (the output keeps its layout); the Triton backend needs channels_last and is skipped for it.
        bias: (C,), activation's dtype and device.
        other: None or activation's shape, dtype and device (any memory format).
        other_bias: None or (C,); only together with `other`.
        backend: "reference" | "torch" | "triton" | None (FASTLAYERS_BACKEND, then triton -> torch -> reference
            on CUDA, torch -> reference on CPU).

    Differences from DeepSpeed: any float dtype (DeepSpeed asserts fp16), CPU too, autograd through the
    reference and torch backends.

    Equivalent PyTorch:
        `activation + bias.view(1, -1, 1, 1) + other + other_bias.view(1, -1, 1, 1)` (4-D; `bias` for 3-D),
        `fastlayers.reference.bias_add.nhwc_bias_add_ref`.

    Backends:
        reference: every dtype and device, computes in the input dtype (one rounding per add).
        torch: every dtype and device; one output allocation in activation's memory format (the two biases
            pre-summed; fp32/fp64: `out = act + b; out += other`; fp16/bf16 with `other`: an fp32 temporary).
            With inputs that require grad it runs differentiable plain ops (fp32 for half) instead.
        triton: CUDA fp16/bf16/fp32 (CPU fp16/fp32 under TRITON_INTERPRET=1, for tests); one pass; inference
            only (refused for inputs that require grad, unless under torch.no_grad()); 4-D activations must be
            channels_last contiguous.
    """
    _validate(activation, bias, other, other_bias)
    impl = backends.select(
        "nhwc_bias_add", backend, activation=activation, bias=bias, other=other, other_bias=other_bias
    )
    return impl.resolve()(activation, bias, other, other_bias)
