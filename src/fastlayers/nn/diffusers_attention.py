"""`DeepSpeedDiffusersAttention`: the Stable Diffusion self/cross attention with DeepSpeed's names, for inference.

Same parameter names, shapes and layout as DeepSpeed's module (weights stored transposed, [in, out], applied as
`x @ W`), so its state dicts load; built from the functional `attention` op (torch SDPA on CPU, Triton on CUDA, see
`fastlayers.explain("attention", ...)`). Differences from DeepSpeed, on purpose:

- any sequence length (DeepSpeed's Triton flash kernel has no bounds checks: S must be a multiple of 64), any head
  dim (no zero-padding of d to 32/64/128), fp32 / fp16 / bf16, CPU and CUDA; nothing Triton-specific is needed at
  construction (DeepSpeed raises ImportError without Triton 2.0+);
- self- vs cross-attention is decided at forward by whether a `context` is passed, and both always have weights:
  a module stores the fused `attn_qkvw` when the key/value input width equals H (self-attention, and cross-attention
  whose context width equals H) and uses its column blocks as the q/k/v weights for a context; otherwise it stores
  `attn_qw`/`attn_kw`/`attn_vw`. DeepSpeed's injector takes the fused branch for a cross-attention whose context
  width equals the query width and then runs the context through the never-initialised separate weights (§2.6);
- `input_mask` (ignored by DeepSpeed) raises ValueError when given: attention masks are not supported;
- q/k/v biases of the diffusers module (`attention_bias=True`) are kept in `attn_qkvb` and applied (DeepSpeed drops
  them); a module without an out-projection bias has `attn_ob = None`;
- autograd: the parameters are frozen (`requires_grad=False`, as DeepSpeed's), but gradients flow to `input` and
  `context` through plain differentiable ops (DeepSpeed raises in backward: "You are running with DeepSpeed Inference
  mode...");
- the config is never mutated: the module keeps a copy with its `layer_id` (see the class docstring).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fastlayers.functional.attention import attention
from fastlayers.inference_config import DeepSpeedInferenceConfig
from fastlayers.utils import dtype_name

# diffusers attention processors whose maths is plain softmax(q kᵀ·scale) v followed by to_out (no extra weights,
# no fused/IP-adapter projections); any other processor changes the result and is refused.
PLAIN_PROCESSORS = frozenset(
    {"AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU",
     "XLAFlashAttnProcessor2_0"}
)  # fmt: skip
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Names DeepSpeed's state dicts carry for the separate q/k/v weights even in a fused module (left uninitialised there).
_SEPARATE = ("attn_qw", "attn_kw", "attn_vw")


def _check_config(config: Any) -> DeepSpeedInferenceConfig:
    if isinstance(config, dict):
        config = DeepSpeedInferenceConfig.from_dict(config)
    if not isinstance(config, DeepSpeedInferenceConfig):
        raise TypeError(f"config must be a DeepSpeedInferenceConfig (or a dict of its fields), got {type(config)}")
    bad = []
    if config.hidden_size <= 0 or config.heads <= 0:
        bad.append(f"hidden_size ({config.hidden_size}) and heads ({config.heads}) must be set")
    if config.dtype not in _FLOAT_DTYPES:
        bad.append(
            f"dtype {config.dtype} is not supported (fp32, fp16 or bf16; int8 weights exist only for the block's "
            "feed-forward: Diffusers2DTransformerConfig(int8_quantization=True))"
        )
    if config.mp_size != 1:
        bad.append(f"mp_size={config.mp_size}: tensor parallelism is not supported here (use 1)")
    if config.transposed_mode:
        bad.append("transposed_mode=True: the weights are stored [in, out] (DeepSpeed's diffusers layout)")
    if config.rotary_dim > 0:
        bad.append(f"rotary_dim={config.rotary_dim}: no rotary embeddings in the diffusers attention")
    if config.local_attention:
        bad.append("local_attention=True: no local (windowed) attention in the diffusers attention")
    if config.num_kv > 0 and config.num_kv != config.heads:
        bad.append(f"num_kv={config.num_kv} != heads={config.heads}: no grouped-query attention here")
    if bad:
        raise ValueError("DeepSpeedDiffusersAttention cannot use this config: " + "; ".join(bad))
    return config


class DeepSpeedDiffusersAttention(nn.Module):
    """Stable Diffusion attention (inference): `softmax(q kᵀ·scale) v @ attn_ow (+ attn_ob)`.

    Self-attention (`context=None`): `[q|k|v] = input @ attn_qkvw (+ attn_qkvb)`. Cross-attention: `q = input @ W_q`,
    `k = context @ W_k`, `v = context @ W_v`, with `W_q, W_k, W_v = attn_qw, attn_kw, attn_vw`, or the three column
    blocks of `attn_qkvw` when the module stores the fused weight (context width H). Heads split the last dim in
    order; scale = 1/sqrt(d) (1/d with `use_mup`, 1 with `scale_attention=False`; divided by `layer_id + 1` with
    `scale_attn_by_inverse_layer_idx`) = `1 / norm_factor**2`. The out-projection bias is skipped when `do_out_bias`
    is False (the transformer block folds it into its next residual + LayerNorm).

    Parameters (all `requires_grad=False`, stored [in, out]; H = hidden_size, C = key/value input width):
        attn_qkvw [H, 3H] when C == H, else None; attn_qw [H, H], attn_kw [C, H], attn_vw [C, H] when C != H, else
        None; attn_qkvb [3H] or None; attn_ow [H, H]; attn_ob [H] or None. Loading a DeepSpeed state dict of a fused
        module ignores its `attn_qw/attn_kw/attn_vw` entries (DeepSpeed leaves them uninitialised there).

    Config fields read: hidden_size, heads, dtype (parameter dtype; fp32/fp16/bf16), scale_attention, use_mup,
    scale_attn_by_inverse_layer_idx, layer_id. Refused (ValueError): dtype int8, mp_size > 1, transposed_mode,
    rotary_dim > 0, local_attention, num_kv != heads. Not read: the rest; in particular `triangular_masking` (the
    attention is bidirectional, as DeepSpeed's diffusers attention, whatever the flag says).

    Layer ids: the class attribute `layer_id` counts constructions (DeepSpeed's counter); a module built with
    `config.layer_id == -1` takes the next value, one built with `config.layer_id >= 0` keeps it. The module's own
    id is `self.config.layer_id` (a copy of the config; the one passed in is not mutated).

    Args:
        config: a `DeepSpeedInferenceConfig` (or a dict of its fields).
        context_dim: key/value input width C for cross-attention (None: H, the fused layout).
        qkv_bias: create `attn_qkvb` (DeepSpeed creates it; its injector then sets it to None).
        out_bias: create `attn_ob`.
        device, dtype: where and in which dtype to create the parameters (dtype default: `config.dtype`).

    Forward:
        input: (B, S, H); cast to the parameter dtype (as DeepSpeed casts fp32 input to its fp16 weights).
        context: (B, S_ctx, C) or None (self-attention); cast likewise.
        input_mask: must be None (masks are not supported).
        Returns (B, S, H) in the parameter dtype. Differentiable w.r.t. input and context.
    """

    layer_id = 0  # DeepSpeed's class-level construction counter

    def __init__(
        self,
        config: DeepSpeedInferenceConfig,
        *,
        context_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        config = _check_config(config)
        if config.layer_id < 0:
            config = dataclasses.replace(config, layer_id=DeepSpeedDiffusersAttention.layer_id)
            DeepSpeedDiffusersAttention.layer_id += 1
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be fp32, fp16 or bf16, got {dtype}")
        H = config.hidden_size
        C = H if context_dim is None else context_dim
        if isinstance(C, bool) or not isinstance(C, int) or C <= 0:
            raise ValueError(f"context_dim must be a positive int or None, got {context_dim!r}")
        self.config = config
        self.heads = config.heads
        self.head_dim = H // config.heads
        self.context_dim = C
        factory = {"device": device, "dtype": dtype or config.dtype}

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, **factory), requires_grad=False)

        if C == H:
            self.attn_qkvw = param(H, 3 * H)
            for name in _SEPARATE:
                self.register_parameter(name, None)
        else:
            self.register_parameter("attn_qkvw", None)
            self.attn_qw, self.attn_kw, self.attn_vw = param(H, H), param(C, H), param(C, H)
        self.attn_qkvb = param(3 * H) if qkv_bias else None
        self.attn_ow = param(H, H)
        self.attn_ob = param(H) if out_bias else None
        self.do_out_bias = True
        self.reset_parameters()

    # -- construction helpers --------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """nn.Linear's default init (uniform ±1/sqrt(fan_in)) for the weights, zeros for the biases."""
        with torch.no_grad():
            for p in self.parameters(recurse=False):
                if p.dim() == 2:
                    bound = 1.0 / math.sqrt(p.shape[0])
                    p.uniform_(-bound, bound)
                else:
                    p.zero_()

    @property
    def fused(self) -> bool:
        """True when the module stores the fused `attn_qkvw` (key/value input width == H)."""
        return self.attn_qkvw is not None

    @property
    def softmax_scale(self) -> float:
        c = self.config
        if not c.scale_attention:
            scale = 1.0
        elif c.use_mup:
            scale = 1.0 / self.head_dim
        else:
            scale = 1.0 / math.sqrt(self.head_dim)
        if c.scale_attn_by_inverse_layer_idx:
            scale /= c.layer_id + 1
        return scale

    @property
    def norm_factor(self) -> float:
        """DeepSpeed's attribute: scores are divided by norm_factor² (d^(1/4) by default)."""
        return self.softmax_scale**-0.5

    @classmethod
    def from_diffusers(cls, attn: nn.Module, *, dtype: torch.dtype | None = None) -> DeepSpeedDiffusersAttention:
        """Build from a diffusers `Attention` (or the older `CrossAttention`), weights copied transposed to [in, out].

        The fused layout is used when to_k's input width equals to_q's (DeepSpeed's injector rule, so its state dicts
        match), the separate one otherwise. Raises ValueError naming every feature of `attn` this module does not
        implement (q/k norms, group/spatial/cross norms, added KV projections, residual connection, output rescale,
        causal, grouped KV heads, inner width != query width, non-default processors, LoRA layers).

        Args:
            attn: the diffusers attention module (read only; not modified).
            dtype: parameter dtype (None: the dtype of `attn.to_q.weight`).
        """
        _check_diffusers_attention(attn)
        wq, wk, wv = attn.to_q.weight, attn.to_k.weight, attn.to_v.weight
        out = attn.to_out[0]
        H, C = wq.shape[1], wk.shape[1]
        dtype = dtype or wq.dtype
        config = DeepSpeedInferenceConfig(
            hidden_size=H,
            heads=attn.heads,
            dtype=dtype,
            triangular_masking=False,
            max_out_tokens=4096,
            scale_attention=bool(getattr(attn, "scale_qk", True)),
        )
        has_qkv_bias = attn.to_q.bias is not None
        module = cls(
            config,
            context_dim=C,
            qkv_bias=has_qkv_bias,
            out_bias=out.bias is not None,
            device=wq.device,
            dtype=dtype,
        )
        with torch.no_grad():
            if module.fused:
                module.attn_qkvw.copy_(torch.cat([wq, wk, wv], dim=0).t())  # [3H, H] -> [H, 3H]
            else:
                module.attn_qw.copy_(wq.t())
                module.attn_kw.copy_(wk.t())
                module.attn_vw.copy_(wv.t())
            if has_qkv_bias:
                module.attn_qkvb.copy_(torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]))
            module.attn_ow.copy_(out.weight.t())
            if out.bias is not None:
                module.attn_ob.copy_(out.bias)
        return module

    # -- forward ---------------------------------------------------------------------------------------------
    def _qkv_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fused:
            return self.attn_qkvw.chunk(3, dim=1)  # 3 x [H, H] column views
        return self.attn_qw, self.attn_kw, self.attn_vw

    def _qkv_biases(self) -> tuple[torch.Tensor | None, ...]:
        if self.attn_qkvb is None:
            return None, None, None
        return self.attn_qkvb.chunk(3)

    def forward(
        self, input: torch.Tensor, context: torch.Tensor | None = None, input_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if input_mask is not None:
            raise ValueError(
                "input_mask is not supported by DeepSpeedDiffusersAttention (DeepSpeed ignores it silently); pass None"
            )
        H, w_dtype = self.config.hidden_size, self.attn_ow.dtype
        if not isinstance(input, torch.Tensor) or input.dim() != 3 or input.shape[-1] != H:
            raise ValueError(f"input must be (B, S, {H}), got {_shape(input)}")
        x = input.to(w_dtype)
        B, S, _ = x.shape
        if context is None and self.fused:  # one GEMM for q, k, v
            qkv = F.linear(x, self.attn_qkvw.t(), self.attn_qkvb)  # (B, S, 3H)
            q, k, v = qkv.view(B, S, 3, self.heads, self.head_dim).unbind(2)  # 3 x (B, S, heads, d)
        else:
            if context is None:  # self-attention with separate weights: attn_kw/attn_vw must take H-wide input
                if self.context_dim != H:
                    raise ValueError(
                        f"self-attention (context=None) needs a module built for a {H}-wide key/value input; this "
                        f"one was built for context_dim={self.context_dim}: pass a context"
                    )
                kv_in = x
            else:
                if not isinstance(context, torch.Tensor) or context.dim() != 3 or context.shape[0] != B:
                    raise ValueError(f"context must be (B={B}, S_ctx, {self.context_dim}), got {_shape(context)}")
                if context.shape[-1] != self.context_dim:
                    raise ValueError(
                        f"context must have width {self.context_dim} (context_dim), got shape {tuple(context.shape)}"
                    )
                kv_in = context.to(w_dtype)
            (wq, wk, wv), (bq, bk, bv) = self._qkv_weights(), self._qkv_biases()
            q = F.linear(x, wq.t(), bq).view(B, S, self.heads, self.head_dim)  # (B, S, heads, d)
            k = F.linear(kv_in, wk.t(), bk).view(B, -1, self.heads, self.head_dim)  # (B, S_ctx, heads, d)
            v = F.linear(kv_in, wv.t(), bv).view(B, -1, self.heads, self.head_dim)
        ctx = attention(q, k, v, softmax_scale=self.softmax_scale).reshape(B, S, H)  # (B, S, H)
        out_bias = self.attn_ob if self.do_out_bias else None
        return F.linear(ctx, self.attn_ow.t(), out_bias)  # (B, S, H)

    # -- state dict ------------------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        if self.fused:  # DeepSpeed keeps uninitialised [H, H] attn_qw/kw/vw next to the fused weight: not data
            for name in _SEPARATE:
                state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def extra_repr(self) -> str:
        c = self.config
        layout = "fused attn_qkvw" if self.fused else f"separate q/k/v, context_dim={self.context_dim}"
        return (
            f"hidden_size={c.hidden_size}, heads={self.heads}, head_dim={self.head_dim}, {layout}, "
            f"dtype={dtype_name(self.attn_ow.dtype)}, layer_id={c.layer_id}, softmax_scale={self.softmax_scale:.4g}, "
            f"do_out_bias={self.do_out_bias}"
        )


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_diffusers_attention(attn: nn.Module) -> None:
    """Raise ValueError listing what `attn` (a diffusers Attention) does that DeepSpeedDiffusersAttention does not."""
    name = type(attn).__name__
    bad = []
    for proj in ("to_q", "to_k", "to_v"):
        m = getattr(attn, proj, None)
        if not isinstance(m, nn.Linear):
            bad.append(f"{proj} is {type(m).__name__} (need nn.Linear; e.g. only_cross_attention / PEFT LoRA layers)")
        elif getattr(m, "lora_layer", None) is not None:
            bad.append(f"{proj} has a LoRA layer (fuse it into the weights first)")
    to_out = getattr(attn, "to_out", None)
    if to_out is None or len(to_out) == 0 or not isinstance(to_out[0], nn.Linear):
        bad.append("to_out[0] must be an nn.Linear (pre_only attention has none)")
    for attr in ("norm_q", "norm_k", "group_norm", "spatial_norm", "norm_cross", "added_kv_proj_dim", "to_add_out"):
        value = getattr(attn, attr, None)
        if value is not None and value is not False:
            bad.append(f"{attr}={type(value).__name__ if isinstance(value, nn.Module) else value!r} is not supported")
    if getattr(attn, "residual_connection", False):
        bad.append("residual_connection=True is not supported")
    factor = getattr(attn, "rescale_output_factor", 1.0)
    if factor != 1.0:
        bad.append(f"rescale_output_factor={factor} is not supported (only 1.0)")
    if getattr(attn, "is_causal", False):
        bad.append("is_causal=True is not supported")
    if getattr(attn, "fused_projections", False):
        bad.append("fused_projections=True (call unfuse_qkv_projections() first)")
    processor = getattr(attn, "processor", None)
    if processor is not None and type(processor).__name__ not in PLAIN_PROCESSORS:
        bad.append(
            f"attention processor {type(processor).__name__} is not supported (plain: {sorted(PLAIN_PROCESSORS)})"
        )
    if not bad:
        heads = getattr(attn, "heads", None)
        q_out, q_in = attn.to_q.weight.shape
        k_out, v_out, o_out = attn.to_k.weight.shape[0], attn.to_v.weight.shape[0], to_out[0].weight.shape[0]
        if not isinstance(heads, int) or heads <= 0 or q_out % heads:
            bad.append(f"heads={heads!r} must divide the inner width {q_out}")
        if q_out != q_in or o_out != q_in:
            bad.append(
                f"inner width {q_out} and output width {o_out} must equal the query width {q_in} "
                "(heads * dim_head == query_dim, out_dim unset)"
            )
        if k_out != q_out or v_out != q_out:
            bad.append(f"to_k/to_v widths ({k_out}, {v_out}) must equal to_q's {q_out} (no kv_heads)")
        if attn.to_q.weight.dtype not in _FLOAT_DTYPES:
            bad.append(f"weights in {dtype_name(attn.to_q.weight.dtype)} (need fp32, fp16 or bf16)")
    if bad:
        raise ValueError(f"cannot convert this diffusers {name} to DeepSpeedDiffusersAttention: " + "; ".join(bad))


__all__ = ["DeepSpeedDiffusersAttention", "PLAIN_PROCESSORS"]
