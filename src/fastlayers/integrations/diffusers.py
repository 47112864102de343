"""diffusers (Stable Diffusion) injection with DeepSpeed's names: `generic_injection`, `replace_attn`,
`replace_attn_block`.

`generic_injection(pipe_or_unet)` swaps every diffusers `BasicTransformerBlock` of the pipeline's UNet(s) (or of the
module passed) for a `DeepSpeedDiffusersTransformerBlock`, whose attention modules are `DeepSpeedDiffusersAttention`.
One model *instance* is changed; nothing is monkey-patched at class level. `diffusers` is imported inside the
functions only. Differences from DeepSpeed (`deepspeed.module_inject.replace_module.generic_injection`):

- fp32, fp16 and bf16 (DeepSpeed: ValueError unless fp16); `dtype=None` keeps the model's dtype, a dtype converts
  each UNet it touches (all of it, so its parts agree);
- an `nn.Module` argument is converted too (DeepSpeed's function does nothing for one) and the number of replaced
  blocks is returned (DeepSpeed returns None);
- only the attention modules inside `BasicTransformerBlock`s are replaced. DeepSpeed also swaps the UNet's other
  diffusers `Attention` modules (and would swap VAE ones) although they may use group norms, residual connections
  and output rescaling its module does not implement; here they stay as they are. The VAE and the text encoder are
  left untouched (DeepSpeed's VAE policy replaces nothing either; it CUDA-graph-wraps the text encoder, the UNet
  and the VAE);
- nothing is replaced unless every block converts: unsupported block variants raise ValueError naming the block
  before the model is modified;
- CUDA graphs are not implemented: `enable_cuda_graph=True` raises (RuntimeError without CUDA, NotImplementedError
  with it) instead of wrapping the UNet in DeepSpeed's `DSUNet` (fixed shapes after the first call).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastlayers.inference_config import as_torch_dtype
from fastlayers.nn.diffusers_attention import DeepSpeedDiffusersAttention
from fastlayers.nn.diffusers_block import DeepSpeedDiffusersTransformerBlock, Diffusers2DTransformerConfig

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def replace_attn(child: nn.Module, policy: Any = None) -> DeepSpeedDiffusersAttention:
    """A `DeepSpeedDiffusersAttention` holding the weights of the diffusers `Attention` `child` (copied, transposed).

    Fused `attn_qkvw` when to_k's input width equals to_q's, separate `attn_qw/kw/vw` otherwise (DeepSpeed's rule);
    either way the module does self-attention without a context and cross-attention with one.
    `policy` is accepted for DeepSpeed's signature and unused. Raises ValueError for attention variants the module
    does not implement (see `DeepSpeedDiffusersAttention.from_diffusers`).
    """
    del policy
    return DeepSpeedDiffusersAttention.from_diffusers(child)


def replace_attn_block(
    child: nn.Module, policy: Any = None, config: Diffusers2DTransformerConfig | None = None
) -> DeepSpeedDiffusersTransformerBlock:
    """A `DeepSpeedDiffusersTransformerBlock` built from the diffusers `BasicTransformerBlock` `child`.

    `config` defaults to `Diffusers2DTransformerConfig()` (no int8), as DeepSpeed's injector uses; `policy` is
    accepted for DeepSpeed's signature and unused. Raises ValueError for block variants the block does not implement.
    """
    del policy
    return DeepSpeedDiffusersTransformerBlock(child, config or Diffusers2DTransformerConfig())


def generic_injection(module: Any, dtype: torch.dtype | str | None = None, enable_cuda_graph: bool = False) -> int:
    """Replace every diffusers `BasicTransformerBlock` of a Stable Diffusion pipeline's UNet with ours.

    Args:
        module: a diffusers pipeline (any object whose attributes, or `components` dict, hold
            `UNet2DConditionModel`s: each of them is converted) or an `nn.Module` (a UNet, or any module: every
            `BasicTransformerBlock` inside it is converted). Blocks are matched by exact class, so subclasses of
            `BasicTransformerBlock` (which may change the forward) and blocks already converted are left alone.
        dtype: None keeps each model's dtype; torch.float32 / float16 / bfloat16 (or "fp32", "fp16", "half",
            "bf16", ...) converts each converted model to it after the swap.
        enable_cuda_graph: not implemented (raises; see the module docstring).

    Returns:
        The number of `BasicTransformerBlock`s replaced (0 when there is none, e.g. a pipeline without a UNet or one
        converted before). Each replacement's attention modules are `DeepSpeedDiffusersAttention`s built from the
        block's own `Attention` modules (DeepSpeed replaces those first, bottom-up; the result is the same).

    Raises:
        ValueError: dtype not fp32/fp16/bf16; a block or attention variant that cannot be converted (then nothing
            is changed).
        RuntimeError / NotImplementedError: enable_cuda_graph=True without / with CUDA.
        ImportError: diffusers is not installed.
    """
    if dtype is not None:
        try:
            dtype = as_torch_dtype(dtype)
        except ValueError:
            pass  # reported below, with the dtypes generic_injection takes
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"generic_injection supports fp32, fp16 and bf16 (or None = keep), got {dtype!r}")
    if enable_cuda_graph:
        if not torch.cuda.is_available():
            raise RuntimeError("enable_cuda_graph=True needs CUDA (CUDA graphs do not exist on CPU); pass False")
        raise NotImplementedError(
            "enable_cuda_graph=True: CUDA-graph capture of the UNet (DeepSpeed's DSUNet) is not implemented; "
            "pass False (torch.compile(unet, mode='reduce-overhead') captures CUDA graphs)"
        )
    try:
        from diffusers.models.attention import BasicTransformerBlock
    except ImportError as e:
        raise ImportError("generic_injection needs diffusers (pip install diffusers)") from e

    targets = _targets(module)
    plan = []  # (parent, child name, new block): everything converted before anything is swapped
    for root in targets:
        for parent_name, parent in root.named_modules():
            for name, child in parent.named_children():
                if type(child) is BasicTransformerBlock:
                    try:
                        new = replace_attn_block(child)
                    except ValueError as e:
                        where = f"{parent_name}.{name}" if parent_name else name
                        raise ValueError(f"generic_injection: block {where!r}: {e}") from None
                    new.train(child.training)
                    plan.append((parent, name, new))
    for parent, name, new in plan:
        setattr(parent, name, new)
    if dtype is not None:
        for root in targets:
            root.to(dtype)
    return len(plan)


def _targets(module: Any) -> list[nn.Module]:
    """The modules to convert: `module` itself if it is an nn.Module, else the pipeline's UNet2DConditionModels."""
    if isinstance(module, nn.Module):
        return [module]
    from diffusers import UNet2DConditionModel

    components = getattr(module, "components", None)
    values = components.values() if isinstance(components, dict) else getattr(module, "__dict__", {}).values()
    seen: dict[int, nn.Module] = {}
    for v in values:
        if isinstance(v, UNet2DConditionModel):
            seen.setdefault(id(v), v)
    return list(seen.values())


__all__ = ["generic_injection", "replace_attn", "replace_attn_block"]
