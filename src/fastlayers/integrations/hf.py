"""HF transformers (5.x) BERT / RoBERTa adapters: config, weight mapping, and `patch_bert`.

`patch_bert(model)` swaps every `BertLayer` / `RobertaLayer` of one model *instance* for a
`fastlayers.nn.transformer_layer.TransformerLayer` (post-LN, exact GELU) holding the same weights; nothing is
monkey-patched at class level. `transformers` is imported inside the functions only.

HF BertLayer -> DeepSpeed names (post-LN: `attn_nw/attn_nb` is the LN after attention, `norm_w/norm_b` the final LN)::

    attention.self.{query,key,value}.{weight,bias} -> attn_qkvw [3H, H], attn_qkvb [3H]   (rows Q, K, V)
    attention.output.dense.{weight,bias}            -> attn_ow, attn_ob
    attention.output.LayerNorm.{weight,bias}        -> attn_nw, attn_nb
    intermediate.dense.{weight,bias}                -> inter_w, inter_b
    output.dense.{weight,bias}                      -> output_w, output_b
    output.LayerNorm.{weight,bias}                  -> norm_w, norm_b
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

import torch
from torch import nn

from fastlayers.configs import TransformerConfig
from fastlayers.nn.transformer_layer import TransformerLayer

# One-to-one renames (HF key suffix -> DeepSpeed name); Q/K/V are concatenated separately.
_RENAMES = {
    "attention.output.dense.weight": "attn_ow",
    "attention.output.dense.bias": "attn_ob",
    "attention.output.LayerNorm.weight": "attn_nw",
    "attention.output.LayerNorm.bias": "attn_nb",
    "intermediate.dense.weight": "inter_w",
    "intermediate.dense.bias": "inter_b",
    "output.dense.weight": "output_w",
    "output.dense.bias": "output_b",
    "output.LayerNorm.weight": "norm_w",
    "output.LayerNorm.bias": "norm_b",
}
_QKV = ("query", "key", "value")
_GELU = {"gelu": "none", "gelu_python": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


def bert_layer_config(hf_config: Any, **overrides: Any) -> TransformerConfig:
    """A post-LN `TransformerConfig` equivalent to one layer of a HF BERT / RoBERTa config.

    Dropout ratios, sizes, eps and init range are copied; `adjust_init_range=False` (HF does not scale the
    output projections); GELU "none" for `hidden_act="gelu"`, "tanh" for the tanh forms. `overrides` replace any
    field (e.g. the memory flags). Raises ValueError for what one `TransformerLayer` cannot express: decoders,
    cross-attention, relative position embeddings in attention, other activations.
    """
    act = getattr(hf_config, "hidden_act", "gelu")
    if not isinstance(act, str) or act not in _GELU:
        raise ValueError(f"hidden_act={act!r} is not supported; TransformerLayer has GELU ({sorted(_GELU)})")
    if getattr(hf_config, "is_decoder", False) or getattr(hf_config, "add_cross_attention", False):
        raise ValueError("decoder / cross-attention BERT layers are not supported (is_decoder or add_cross_attention)")
    pos = getattr(hf_config, "position_embedding_type", "absolute")
    if pos not in (None, "absolute"):
        raise ValueError(f"position_embedding_type={pos!r} changes the attention scores; only 'absolute' is supported")
    fields = dict(
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        heads=hf_config.num_attention_heads,
        attn_dropout_ratio=float(hf_config.attention_probs_dropout_prob),
        hidden_dropout_ratio=float(hf_config.hidden_dropout_prob),
        num_hidden_layers=hf_config.num_hidden_layers,
        initializer_range=float(hf_config.initializer_range),
        layer_norm_eps=float(hf_config.layer_norm_eps),
        pre_layer_norm=False,
        adjust_init_range=False,
        gelu_approximate=_GELU[act],
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def bert_layer_state_dict_to_ds(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """HF `BertLayer` state dict (keys under `prefix`, e.g. "encoder.layer.3.") -> the 12 DeepSpeed-named tensors."""
    try:
        out = {
            "attn_qkvw": torch.cat([state_dict[f"{prefix}attention.self.{n}.weight"] for n in _QKV], dim=0),
            "attn_qkvb": torch.cat([state_dict[f"{prefix}attention.self.{n}.bias"] for n in _QKV], dim=0),
        }
        out.update({ds: state_dict[prefix + hf] for hf, ds in _RENAMES.items()})
    except KeyError as e:
        raise KeyError(f"not a BERT layer state dict under prefix {prefix!r}: missing {e.args[0]!r}") from None
    return out


def ds_state_dict_to_bert_layer(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of `bert_layer_state_dict_to_ds`: 12 DeepSpeed-named tensors -> HF `BertLayer` keys."""
    qkvw = state_dict[prefix + "attn_qkvw"]
    qkvb = state_dict[prefix + "attn_qkvb"]
    out = {}
    for i, (w, b) in enumerate(zip(qkvw.chunk(3, dim=0), qkvb.chunk(3, dim=0), strict=True)):
        out[f"{prefix}attention.self.{_QKV[i]}.weight"] = w
        out[f"{prefix}attention.self.{_QKV[i]}.bias"] = b
    out.update({prefix + hf: state_dict[prefix + ds] for hf, ds in _RENAMES.items()})
    return out


def convert_model_state_dict(state_dict: dict[str, torch.Tensor], to: str) -> dict[str, torch.Tensor]:
    """Rename every layer of a whole-model state dict: `to="ds"` (vanilla HF -> patched model) or `to="hf"`
    (patched model -> vanilla HF, e.g. to save a model trained with `patch_bert` as a normal HF checkpoint)."""
    if to not in ("ds", "hf"):
        raise ValueError(f"to must be 'ds' or 'hf', got {to!r}")
    marker = re.compile(r"^(.*\.)?attention\.self\.query\.weight$" if to == "ds" else r"^(.*\.)?attn_qkvw$")
    prefixes = [m.group(1) or "" for k in state_dict if (m := marker.match(k))]
    out = dict(state_dict)
    for p in prefixes:
        layer = {k: v for k, v in state_dict.items() if k.startswith(p)}
        converted = bert_layer_state_dict_to_ds(layer, p) if to == "ds" else ds_state_dict_to_bert_layer(layer, p)
        consumed = (
            ([f"{p}attention.self.{n}.{t}" for n in _QKV for t in ("weight", "bias")] + [p + k for k in _RENAMES])
            if to == "ds"
            else [p + k for k in ("attn_qkvw", "attn_qkvb", *_RENAMES.values())]
        )
        for k in consumed:
            out.pop(k, None)
        out.update({(p + k if to == "ds" else k): v for k, v in converted.items()})
    return out


def transformer_layer_from_bert(
    hf_layer: nn.Module, hf_config: Any = None, *, backend: str | None = None, **overrides: Any
) -> TransformerLayer:
    """A `TransformerLayer` with the weights, device, dtype and train/eval mode of one HF `BertLayer`."""
    cfg = hf_config if hf_config is not None else hf_layer.attention.self.config
    if getattr(cfg, "_attn_implementation", None) == "flex_attention":
        raise ValueError(
            "attn_implementation='flex_attention' hands layers a BlockMask; patch a model built with "
            "'eager', 'sdpa' or 'flash_attention_2' (their masks are tensors TransformerLayer reads)"
        )
    if getattr(hf_layer, "gradient_checkpointing", False):
        raise ValueError(
            "this BERT layer has HF gradient checkpointing enabled, which TransformerLayer does not do; "
            "call model.gradient_checkpointing_disable() first and use the memory flags instead "
            "(normalize_invertible, gelu_checkpoint, attn_dropout_checkpoint)"
        )
    if getattr(hf_layer, "add_cross_attention", False) or hasattr(hf_layer, "crossattention"):
        raise ValueError("BERT layers with cross-attention are not supported")
    ref = hf_layer.attention.self.query.weight
    config = bert_layer_config(cfg, **overrides)
    config = dataclasses.replace(config, training=hf_layer.training)
    layer = TransformerLayer(config, device=ref.device, dtype=ref.dtype, backend=backend)
    params = bert_layer_state_dict_to_ds(hf_layer.state_dict())
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(params[name])
    return layer


def patch_bert(model: nn.Module, *, backend: str | None = None, **overrides: Any) -> int:
    """Replace every `BertLayer` / `RobertaLayer` in `model` with a `TransformerLayer`; returns how many.

    The new layers hold copies of the weights (same device, dtype, train/eval mode), accept the call the HF
    encoder makes (`layer(hidden_states, attention_mask, encoder_hidden_states, **kwargs)`, with HF's eager float
    or sdpa boolean 4-D masks) and return the hidden states tensor, so outputs and gradients match the original
    model. `overrides` set `TransformerConfig` fields (memory flags, `seed`, ...); `backend` is passed to every
    op. `output_hidden_states=True` keeps working; attention weights (`output_attentions`) are not available.
    """
    classes = _hf_layer_classes()
    count = 0
    new_layers = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, classes):
                new = transformer_layer_from_bert(child, backend=backend, **overrides)
                setattr(parent, name, new)
                new_layers.append(new)
                count += 1
    if new_layers:
        _install_hidden_state_capture(model, new_layers)
    return count


def _hf_layer_classes() -> tuple[type, ...]:
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.roberta.modeling_roberta import RobertaLayer

    return (BertLayer, RobertaLayer)


def _install_hidden_state_capture(model: nn.Module, layers: list[TransformerLayer]) -> None:
    """HF 5.x collects `output_hidden_states` with forward hooks on modules of class BertLayer, installed once per
    model; register the same hook on the replacements so the feature keeps working."""
    try:
        from transformers.utils.output_capturing import install_output_capuring_hook
    except ImportError:
        warnings.warn(
            "patch_bert: this transformers version has no output-capturing hooks API; "
            "output_hidden_states will not include the patched layers",
            stacklevel=3,
        )
        return
    for layer in layers:
        install_output_capuring_hook(layer, "hidden_states", 0)
