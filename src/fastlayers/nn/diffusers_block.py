"""`DeepSpeedDiffusersTransformerBlock`: a diffusers `BasicTransformerBlock` (Stable Diffusion) with DeepSpeed's names.

Built from a diffusers block (its tensors are taken over, DeepSpeed's parameter names, so DeepSpeed state dicts
load) and run with the functional ops: `layer_norm`, the fused `bias_dropout_residual_layer_norm` (each attention's
out-projection bias is added inside the next residual + LayerNorm), `attention` (through `DeepSpeedDiffusersAttention`)
and `bias_geglu`. Differences from DeepSpeed, on purpose:

- a block whose `attn2` is not (yet) a `DeepSpeedDiffusersAttention` converts it itself, so the block works
  stand-alone (DeepSpeed's fallback path misspells `nn.Parameter` and crashes); `attn2 = None` works (no
  cross-attention sub-block);
- `int8_quantization=True` works: the feed-forward weights are GroupQuantizer int8 and applied through
  `quantized_linear` (DeepSpeed passes the int8 tensors to `F.linear`, which fails; its injector never enables it);
- block variants it does not implement are refused at construction with a ValueError naming them (DeepSpeed converts
  any `BasicTransformerBlock` and computes the plain LayerNorm/GEGLU block whatever the variant);
- `attention_mask` / `encoder_attention_mask` / non-empty `cross_attention_kwargs` raise ValueError at forward
  (DeepSpeed ignores them silently); unknown keyword arguments raise TypeError;
- any dtype among fp32 / fp16 / bf16 and any device (DeepSpeed: fp16 on CUDA); gradients flow to the inputs (the
  parameters are frozen), where DeepSpeed's attention raises in backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fastlayers.functional.bias_geglu import bias_geglu
from fastlayers.functional.layer_norm import bias_dropout_residual_layer_norm, layer_norm
from fastlayers.functional.quantize import GroupQuantizer, quantized_linear
from fastlayers.nn.diffusers_attention import DeepSpeedDiffusersAttention
from fastlayers.utils import dtype_name

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# diffusers forward arguments used only by block variants refused at construction (ada norms): ignoring them is exact.
_IGNORED_KWARGS = frozenset({"class_labels", "added_cond_kwargs"})
_MASK_KWARGS = ("attention_mask", "encoder_attention_mask")


@dataclass(frozen=True)
class Diffusers2DTransformerConfig:
    """DeepSpeed's config of the diffusers block: one field.

    Args:
        int8_quantization: store the feed-forward weights as int8 (GroupQuantizer, one group per output row, symmetric
            absmax/128 scales) and apply them through `quantized_linear`. Attention weights stay in float.
    """

    int8_quantization: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.int8_quantization, bool):
            raise TypeError(f"int8_quantization must be a bool, got {self.int8_quantization!r}")


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class DeepSpeedDiffusersTransformerBlock(nn.Module):
    """Stable Diffusion transformer block (LayerNorm, self-attention, cross-attention, GEGLU feed-forward), inference.

    With x (B, S, C)::

        n1     = LN(x; norm1)
        n2, r1 = LN(r1; norm2), r1 = attn_1(n1) + attn_1_bias + x        (fused, attn_1 without its out bias)
        n3, r2 = LN(r2; norm3), r2 = attn_2(n2, context) + attn_2_bias + r1
        h, gate = split(n3 @ ff1_wᵀ + ff1_b)                             (first half value, second half gate)
        out    = (h · gelu_erf(gate)) @ ff2_wᵀ + ff2_b + r2               (GELU in fp32)

    Without cross-attention (`attn2 is None` in the source block): `n3, r2 = LN(r2; norm3), r2 = attn_1(n1) +
    attn_1_bias + x`. `attn_2` with `context=None` is self-attention on n2, as in diffusers.

    Parameters (all `requires_grad=False`; DeepSpeed's names): `ff1_w` [2I, C] (GEGLU projection, nn.Linear layout),
    `ff1_b` [2I], `ff2_w` [C, I], `ff2_b` [C], `norm{1,2,3}_g/_b` [C] (floats `norm{1,2,3}_eps`), the attention
    modules `attn_1`, `attn_2` (`DeepSpeedDiffusersAttention`, `do_out_bias=False`) and `attn_1_bias`, `attn_2_bias`
    (the same tensors as `attn_k.attn_ob`, or zeros when the attention has no out bias). The float tensors share
    storage with the source block where no dtype conversion is needed (as DeepSpeed); attention weights are copied
    (transposed). With int8 the state dict also holds the int8 scales as buffers `ff1_w_scale`, `ff2_w_scale`
    (DeepSpeed keeps them only as a `.scale` attribute, which state dicts lose). Without cross-attention `attn_2`,
    `attn_2_bias` and `norm2_*` are None.

    Refused at construction (ValueError naming them): `norm_type` other than "layer_norm" (ada norms), `activation_fn`
    other than "geglu", `only_cross_attention`, `double_self_attention`, positional embeddings, GLIGEN (`fuser`),
    norms that are not LayerNorms, attention modules `DeepSpeedDiffusersAttention.from_diffusers` refuses.
    Dropout and chunked feed-forward settings of the source block do not change inference results and are ignored.

    Args:
        equivalent_module: the diffusers `BasicTransformerBlock`; `attn1`/`attn2` may already be
            `DeepSpeedDiffusersAttention` modules (the injector converts children first), which are then reused.
        config: `Diffusers2DTransformerConfig` (None: the default, no int8).

    Forward:
        hidden_states: (B, S, C); cast to the block's dtype (that of the source block's weights).
        context: (B, S_ctx, C_ctx) cross-attention input, or None; `encoder_hidden_states=` (diffusers' name)
            overrides it when not None.
        timestep: ignored (only the refused ada-norm variants use it).
        **kwargs: diffusers' `attention_mask` / `encoder_attention_mask` must be None and `cross_attention_kwargs`
            None or empty (ValueError otherwise: not supported); `class_labels`, `added_cond_kwargs` are ignored
            (only ada norms use them); anything else raises TypeError. diffusers' gradient-checkpointing call passes
            these positionally and fails with TypeError (the block is for inference).
        Returns (B, S, C) in the block's dtype.
    """

    def __init__(self, equivalent_module: nn.Module, config: Diffusers2DTransformerConfig | None = None) -> None:
        super().__init__()
        config = Diffusers2DTransformerConfig() if config is None else config
        if not isinstance(config, Diffusers2DTransformerConfig):
            raise TypeError(f"config must be a Diffusers2DTransformerConfig, got {type(config).__name__}")
        m = equivalent_module
        _check_block(m)
        self.config = config
        proj, out = m.ff.net[0].proj, m.ff.net[2]
        dtype, device = proj.weight.dtype, proj.weight.device
        like = {"dtype": dtype, "device": device}
        dim, inner = out.weight.shape[0], out.weight.shape[1]
        self.dim, self.inner_dim = dim, inner

        def take(t: torch.Tensor | None, fill: float, n: int) -> nn.Parameter:
            return _frozen(t.detach().to(**like) if t is not None else torch.full((n,), fill, **like))

        quantizer = GroupQuantizer(q_int8=config.int8_quantization)
        self.ff1_w = quantizer.quantize(proj.weight.detach().to(**like))  # [2I, C]
        self.ff1_b = take(proj.bias, 0.0, 2 * inner)
        self.ff2_w = quantizer.quantize(out.weight.detach().to(**like))  # [C, I]
        self.ff2_b = take(out.bias, 0.0, dim)
        if config.int8_quantization:  # persistent copies of the scales (state dicts drop Parameter attributes)
            self.register_buffer("ff1_w_scale", self.ff1_w.scale)
            self.register_buffer("ff2_w_scale", self.ff2_w.scale)

        for i, norm in ((1, m.norm1), (2, m.norm2 if m.attn2 is not None else None), (3, m.norm3)):
            if norm is None:
                self.register_parameter(f"norm{i}_g", None)
                self.register_parameter(f"norm{i}_b", None)
                setattr(self, f"norm{i}_eps", None)
                continue
            setattr(self, f"norm{i}_g", take(norm.weight, 1.0, dim))
            setattr(self, f"norm{i}_b", take(norm.bias, 0.0, dim))
            setattr(self, f"norm{i}_eps", float(norm.eps))

        self.attn_1 = _as_ds_attention(m.attn1, dtype)
        self.attn_2 = _as_ds_attention(m.attn2, dtype) if m.attn2 is not None else None
        # "Pull the bias in": each out-projection bias is added in the next fused residual + LayerNorm instead.
        self.attn_1_bias = self._pull_bias(self.attn_1, like)
        self.attn_2_bias = self._pull_bias(self.attn_2, like) if self.attn_2 is not None else None

    @staticmethod
    def _pull_bias(attn: DeepSpeedDiffusersAttention, like: dict[str, Any]) -> nn.Parameter:
        attn.do_out_bias = False
        if attn.attn_ob is not None:
            return attn.attn_ob
        return _frozen(torch.zeros(attn.config.hidden_size, **like))

    def _linear(self, x: torch.Tensor, w: nn.Parameter, b: torch.Tensor | None, scale_name: str) -> torch.Tensor:
        if not self.config.int8_quantization:
            return F.linear(x, w, b)
        scale = getattr(self, scale_name)
        if w.scale is not scale:  # re-attach after .to() / load_state_dict replaced the buffer
            w.scale = scale
        return quantized_linear(x, w, b)

    def forward(
        self,
        hidden_states: torch.Tensor,
        context: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        encoder_hidden_states = kwargs.pop("encoder_hidden_states", None)
        if encoder_hidden_states is not None:
            context = encoder_hidden_states
        _check_forward_kwargs(kwargs)
        hs = hidden_states
        if not isinstance(hs, torch.Tensor) or hs.dim() != 3 or hs.shape[-1] != self.dim:
            got = tuple(hs.shape) if isinstance(hs, torch.Tensor) else type(hs).__name__
            raise ValueError(f"hidden_states must be (B, S, {self.dim}), got {got}")
        x = hidden_states.to(self.ff1_b.dtype)  # (B, S, C)
        n1 = layer_norm(x, self.norm1_g, self.norm1_b, eps=self.norm1_eps)
        a1 = self.attn_1(n1)  # (B, S, C), out bias deferred
        fused_ln = {"training": False, "return_residual_out": True}
        if self.attn_2 is not None:
            n2, r1 = bias_dropout_residual_layer_norm(
                a1, self.attn_1_bias, x, self.norm2_g, self.norm2_b, eps=self.norm2_eps, **fused_ln
            )
            a2 = self.attn_2(n2, context=context)  # (B, S, C), out bias deferred
            n3, r2 = bias_dropout_residual_layer_norm(
                a2, self.attn_2_bias, r1, self.norm3_g, self.norm3_b, eps=self.norm3_eps, **fused_ln
            )
        else:
            n3, r2 = bias_dropout_residual_layer_norm(
                a1, self.attn_1_bias, x, self.norm3_g, self.norm3_b, eps=self.norm3_eps, **fused_ln
            )
        # the GEGLU bias goes into the GEMM (addmm), which saves a pass over the (B, S, 2I) activation
        g = bias_geglu(self._linear(n3, self.ff1_w, self.ff1_b, "ff1_w_scale"))  # (B, S, I)
        if self.config.int8_quantization:
            return self._linear(g, self.ff2_w, self.ff2_b, "ff2_w_scale") + r2  # (B, S, C)
        # r2 + g·ff2_wᵀ in one addmm, then the bias: one pass over (B, S, C) fewer than linear-with-bias + r2
        out = torch.addmm(r2.reshape(-1, self.dim), g.reshape(-1, g.shape[-1]), self.ff2_w.t())
        return out.add_(self.ff2_b).view_as(r2)  # (B, S, C)

    def extra_repr(self) -> str:
        cross = "none" if self.attn_2 is None else f"context_dim={self.attn_2.context_dim}"
        return (
            f"dim={self.dim}, inner_dim={self.inner_dim}, heads={self.attn_1.heads}, cross_attention={cross}, "
            f"dtype={dtype_name(self.ff1_b.dtype)}, int8_quantization={self.config.int8_quantization}"
        )


def _as_ds_attention(attn: nn.Module, dtype: torch.dtype) -> DeepSpeedDiffusersAttention:
    if isinstance(attn, DeepSpeedDiffusersAttention):
        return attn
    return DeepSpeedDiffusersAttention.from_diffusers(attn, dtype=dtype)


def _check_forward_kwargs(kwargs: dict[str, Any]) -> None:
    for name in _MASK_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{name} is not supported by DeepSpeedDiffusersTransformerBlock (DeepSpeed ignores it silently, "
                "which changes the result); pass None"
            )
    cross_kwargs = kwargs.get("cross_attention_kwargs")
    if cross_kwargs:
        raise ValueError(
            f"cross_attention_kwargs {sorted(cross_kwargs)} are not supported by DeepSpeedDiffusersTransformerBlock "
            "(DeepSpeed ignores them silently); pass None or {}"
        )
    unknown = sorted(set(kwargs) - _IGNORED_KWARGS - {*_MASK_KWARGS, "cross_attention_kwargs"})
    if unknown:
        raise TypeError(f"DeepSpeedDiffusersTransformerBlock.forward() got unexpected keyword argument(s) {unknown}")


def _check_block(m: nn.Module) -> None:
    """Raise ValueError listing every feature of the diffusers block `m` that this block does not implement."""
    missing = [a for a in ("norm1", "attn1", "attn2", "norm3", "ff") if not hasattr(m, a)]
    if missing:
        raise ValueError(f"{type(m).__name__} is not a diffusers BasicTransformerBlock (no {', '.join(missing)})")
    bad = []
    norm_type = getattr(m, "norm_type", "layer_norm")
    if norm_type != "layer_norm":
        bad.append(f"norm_type={norm_type!r} (only 'layer_norm')")
    for flag in ("use_ada_layer_norm", "use_ada_layer_norm_zero", "use_ada_layer_norm_single",
                 "use_ada_layer_norm_continuous"):  # fmt: skip
        if getattr(m, flag, False) and norm_type == "layer_norm":
            bad.append(f"{flag}=True (only plain LayerNorm)")
    activation = getattr(m, "activation_fn", "geglu")
    net = getattr(m.ff, "net", None)
    act = net[0] if net is not None and len(net) >= 3 else None
    if activation != "geglu":
        bad.append(f"activation_fn={activation!r} (only 'geglu')")
    elif type(act).__name__ != "GEGLU" or not isinstance(getattr(act, "proj", None), nn.Linear):
        bad.append(f"ff.net[0] is {type(act).__name__} (need a GEGLU with an nn.Linear proj)")
    elif not isinstance(net[2], nn.Linear):
        bad.append(f"ff.net[2] is {type(net[2]).__name__} (need nn.Linear)")
    for flag in ("only_cross_attention", "double_self_attention"):
        if getattr(m, flag, False):
            bad.append(f"{flag}=True")
    if getattr(m, "pos_embed", None) is not None or getattr(m, "positional_embeddings", None):
        bad.append(f"positional_embeddings={getattr(m, 'positional_embeddings', None)!r} (only None)")
    if hasattr(m, "fuser"):
        bad.append("attention_type gated / gated-text-image (GLIGEN fuser)")
    norms = [("norm1", m.norm1), ("norm3", m.norm3)] + ([("norm2", m.norm2)] if m.attn2 is not None else [])
    for name, norm in norms:
        if not isinstance(norm, nn.LayerNorm):
            bad.append(f"{name} is {type(norm).__name__} (need nn.LayerNorm)")
    if not bad:
        w = act.proj.weight
        if w.dtype not in _FLOAT_DTYPES:
            bad.append(f"weights in {dtype_name(w.dtype)} (need fp32, fp16 or bf16)")
        dim, inner = net[2].weight.shape
        if w.shape != (2 * inner, dim):
            bad.append(f"GEGLU proj weight {tuple(w.shape)} does not match ff.net[2] {tuple(net[2].weight.shape)}")
        for name, norm in norms:
            if tuple(norm.normalized_shape) != (dim,):
                bad.append(f"{name} normalizes {tuple(norm.normalized_shape)}, need ({dim},)")
    if bad:
        raise ValueError(f"cannot convert this diffusers {type(m).__name__}: unsupported " + "; ".join(bad))


__all__ = ["DeepSpeedDiffusersTransformerBlock", "Diffusers2DTransformerConfig"]
