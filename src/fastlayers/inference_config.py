"""`DeepSpeedInferenceConfig`: the config of the inference attention modules, with DeepSpeed's fields and defaults.

The fields, their names and their defaults are DeepSpeed's (`deepspeed.ops.transformer.inference.config
.DeepSpeedInferenceConfig`), so a DeepSpeed config dict or JSON file builds one. It configures
`DeepSpeedDiffusersAttention` now and the inference self-attention later. What differs from DeepSpeed, on purpose:

- a frozen, keyword-only dataclass: modules never mutate it. DeepSpeed writes `layer_id` into the object you pass;
  here `layer_id` is a field (-1 = "assign from the module's construction counter") and a module keeps its own copy
  (`dataclasses.replace(config, layer_id=...)`);
- unknown keyword arguments raise TypeError naming them (also in `from_dict`), values are type- and range-checked at
  construction with the offending value in the message (DeepSpeed's `from_dict` updates `__dict__` blindly);
- `dtype` accepts a torch dtype or a string ("fp16", "half", "float16", "bf16", "bfloat16", "fp32", "float",
  "float32", "int8") and is stored as the torch dtype;
- `norm_type` and `mlp_act_func_type` accept DeepSpeed's enums (IntEnums, so any object with the same integer value),
  the integer, or the member name; they are stored as this module's `NormType` / `ActivationFuncType` (same values);
- `intermediate_size <= 0` becomes `4 * hidden_size` whenever `hidden_size` is set (DeepSpeed does it in `__init__`
  only); DeepSpeed stores `layer_norm_eps` as `epsilon`: both names work here (`epsilon` is a read-only property,
  and an `epsilon` key is accepted by `from_dict`);
- `from_json_file` reads UTF-8 (with or without BOM), as DeepSpeed's inference config does.

DeepSpeed's `-1` defaults are kept and mean "not set". Which fields a module reads (and which values it refuses) is
documented on the module.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

UNSET = -1  # DeepSpeed's "not given" default


class NormType(enum.IntEnum):
    """DeepSpeed's `deepspeed.utils.types.NormType` (same integer values)."""

    UNKNOWN = 0
    LayerNorm = 1
    GroupNorm = 2
    RMSNorm = 3


class ActivationFuncType(enum.IntEnum):
    """DeepSpeed's `deepspeed.utils.types.ActivationFuncType` (same integer values)."""

    UNKNOWN = 0
    GELU = 1
    ReLU = 2
    GATED_GELU = 3
    GATED_SILU = 4


GATED_ACTIVATION_TYPES = (ActivationFuncType.GATED_GELU, ActivationFuncType.GATED_SILU)

_DTYPE_ALIASES: dict[Any, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.bfloat16,
    torch.int8: torch.int8,
}  # fmt: skip
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "int8"}

_INT_FIELDS = ("hidden_size", "intermediate_size", "heads", "num_hidden_layers", "local_rank", "mp_size",
               "window_size", "rotary_dim", "training_mp_size", "max_out_tokens", "min_out_tokens", "num_kv",
               "layer_id")  # fmt: skip
_BOOL_FIELDS = ("pre_layer_norm", "stochastic_mode", "scale_attention", "triangular_masking", "local_attention",
                "rotate_half", "rotate_every_two", "return_tuple", "mlp_after_attn", "bigscience_bloom",
                "enable_qkv_quantization", "use_mup", "scale_attn_by_inverse_layer_idx", "return_single_tuple",
                "set_empty_params", "transposed_mode", "use_triton", "triton_autotune", "invert_mask")  # fmt: skip


def as_torch_dtype(value: Any) -> torch.dtype:
    """torch dtype for a torch dtype or DeepSpeed-style string ("fp16", "half", "bf16", "fp32", "int8", ...)."""
    try:
        return _DTYPE_ALIASES[value]
    except (KeyError, TypeError):
        raise ValueError(
            "dtype must be torch.float16 / bfloat16 / float32 / int8 or one of "
            f"{sorted(k for k in _DTYPE_ALIASES if isinstance(k, str))}, got {value!r}"
        ) from None


def _as_enum(name: str, value: Any, enum_cls: type[enum.IntEnum]) -> enum.IntEnum:
    if isinstance(value, str):
        try:
            return enum_cls[value]
        except KeyError:
            raise ValueError(f"{name} must be one of {[m.name for m in enum_cls]}, got {value!r}") from None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a {enum_cls.__name__} (or its int value / name), got {value!r}")
    try:
        return enum_cls(int(value))
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be a {enum_cls.__name__} ({', '.join(f'{m.name}={m.value}' for m in enum_cls)}), "
            f"got {value!r}"
        ) from None


@dataclass(frozen=True, kw_only=True)
class DeepSpeedInferenceConfig:
    """Config of an inference attention / transformer layer, with DeepSpeed's fields and defaults (-1 = not set).

    Args:
        hidden_size: H (full width, not per tensor-parallel partition).
        intermediate_size: MLP width; `<= 0` means `4 * hidden_size`.
        heads: attention heads; H must be divisible by it.
        num_hidden_layers: depth of the model.
        layer_norm_eps: LayerNorm epsilon (DeepSpeed's attribute name `epsilon` also works, read-only).
        local_rank: accepted for compatibility; no module picks a device from it.
        mp_size: tensor-parallel degree (heads and H are split by it); heads must be divisible by it.
        dtype: torch.float16 (default) / bfloat16 / float32 / int8 or the strings above. int8 = int8 weights with
            fp16 biases and activations.
        pre_layer_norm: pre-LN (True) or post-LN.
        norm_type: `NormType.LayerNorm` (default) or `NormType.RMSNorm`.
        stochastic_mode: accepted for compatibility (unused by DeepSpeed's inference kernels too).
        scale_attention: scale the scores by 1/sqrt(d) (False: no scaling).
        triangular_masking: causal mask during prompt processing.
        local_attention, window_size: GPT-Neo local attention: query i sees keys j with i - j < window_size.
        rotary_dim: > 0 applies rotary embeddings to the first `rotary_dim` channels of q and k (-1: none).
        rotate_half: NeoX / LLaMA rotary (split halves); takes precedence over `rotate_every_two`.
        rotate_every_two: GPT-J rotary (interleaved pairs).
        return_tuple: the layer returns a tuple.
        mlp_after_attn: False = attention and MLP in parallel (GPT-J / NeoX).
        mlp_act_func_type: `ActivationFuncType` (GELU default; ReLU, GATED_GELU, GATED_SILU).
        training_mp_size: tensor-parallel degree of the checkpoint.
        bigscience_bloom: BLOOM attention (ALiBi, BLOOM mask convention).
        max_out_tokens, min_out_tokens: KV-cache capacity bounds in tokens (1 <= min <= max).
        enable_qkv_quantization: quantize the QKV projection.
        use_mup: scale scores by 1/d instead of 1/sqrt(d).
        scale_attn_by_inverse_layer_idx: extra 1/(layer_id + 1) on the scores (GPT-2 option).
        return_single_tuple: the layer returns `(output,)`.
        set_empty_params: create the parameters as None (filled in later).
        transposed_mode: weights stored [out, in] (nn.Linear layout) instead of [in, out].
        use_triton, triton_autotune: DeepSpeed's Triton switches; accepted (fastlayers picks backends per call, see
            `fastlayers.explain`).
        num_kv: key/value heads (grouped-query attention); -1 = `heads`. `heads` must be divisible by it.
        rope_theta: rotary base, > 0.
        invert_mask: BLOOM: the mask is a keep-mask (1 = keep) to invert.
        layer_id: index of the layer (-1: a module assigns it from its construction counter, as DeepSpeed does).
    """

    hidden_size: int = UNSET
    intermediate_size: int = UNSET
    heads: int = UNSET
    num_hidden_layers: int = UNSET
    layer_norm_eps: float = 1e-12
    local_rank: int = UNSET
    mp_size: int = 1
    dtype: torch.dtype = torch.float16
    pre_layer_norm: bool = True
    norm_type: NormType = NormType.LayerNorm
    stochastic_mode: bool = False
    scale_attention: bool = True
    triangular_masking: bool = True
    local_attention: bool = False
    window_size: int = 256
    rotary_dim: int = UNSET
    rotate_half: bool = False
    rotate_every_two: bool = True
    return_tuple: bool = True
    mlp_after_attn: bool = True
    mlp_act_func_type: ActivationFuncType = ActivationFuncType.GELU
    training_mp_size: int = 1
    bigscience_bloom: bool = False
    max_out_tokens: int = 1024
    min_out_tokens: int = 1
    enable_qkv_quantization: bool = False
    use_mup: bool = False
    scale_attn_by_inverse_layer_idx: bool = False
    return_single_tuple: bool = False
    set_empty_params: bool = False
    transposed_mode: bool = False
    use_triton: bool = False
    triton_autotune: bool = False
    num_kv: int = UNSET
    rope_theta: float = 10000
    invert_mask: bool = True
    layer_id: int = UNSET

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
        for name in _BOOL_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {v!r} ({type(v).__name__})")
        for name in ("layer_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a number, got {v!r} ({type(v).__name__})")
            if not v > 0:
                raise ValueError(f"{name} must be positive, got {v}")

        for name in ("hidden_size", "heads", "num_hidden_layers", "rotary_dim", "num_kv"):
            v = getattr(self, name)
            if v != UNSET and v <= 0:
                raise ValueError(f"{name} must be positive (or -1 = not set), got {v}")
        for name in ("mp_size", "training_mp_size", "window_size", "min_out_tokens"):
            v = getattr(self, name)
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.max_out_tokens < self.min_out_tokens:
            raise ValueError(
                f"max_out_tokens ({self.max_out_tokens}) must be >= min_out_tokens ({self.min_out_tokens})"
            )
        if self.layer_id < UNSET:
            raise ValueError(f"layer_id must be >= 0 (or -1 = assigned by the module), got {self.layer_id}")
        h, n = self.hidden_size, self.heads
        if h > 0 and n > 0:
            if h % n:
                raise ValueError(f"hidden_size ({h}) must be divisible by heads ({n})")
            if self.rotary_dim > 0 and self.rotary_dim > h // n:
                raise ValueError(f"rotary_dim ({self.rotary_dim}) must be <= the head dim ({h // n})")
        if n > 0 and n % self.mp_size:
            raise ValueError(f"heads ({n}) must be divisible by mp_size ({self.mp_size})")
        if n > 0 and self.num_kv > 0 and n % self.num_kv:
            raise ValueError(f"heads ({n}) must be divisible by num_kv ({self.num_kv})")

        # Canonical values: one dtype object, our enums, DeepSpeed's intermediate_size rule.
        object.__setattr__(self, "dtype", as_torch_dtype(self.dtype))
        object.__setattr__(self, "norm_type", _as_enum("norm_type", self.norm_type, NormType))
        object.__setattr__(
            self, "mlp_act_func_type", _as_enum("mlp_act_func_type", self.mlp_act_func_type, ActivationFuncType)
        )
        if self.intermediate_size <= 0 and h > 0:
            object.__setattr__(self, "intermediate_size", 4 * h)

    # -- derived ---------------------------------------------------------------------------------------------
    @property
    def epsilon(self) -> float:
        """DeepSpeed's attribute name for `layer_norm_eps`."""
        return self.layer_norm_eps

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    @property
    def is_int8(self) -> bool:
        return self.dtype == torch.int8

    @property
    def activation_dtype(self) -> torch.dtype:
        """dtype of activations and biases: fp16 for int8 weights, else `dtype`."""
        return torch.float16 if self.dtype == torch.int8 else self.dtype

    # -- (de)serialisation -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeepSpeedInferenceConfig:
        """Build from a dict of field values (DeepSpeed's `epsilon` key is accepted; unknown keys raise TypeError)."""
        if not isinstance(d, dict):
            raise TypeError(f"from_dict expects a dict, got {type(d).__name__}")
        d = dict(d)
        if "epsilon" in d:
            eps = d.pop("epsilon")
            if "layer_norm_eps" in d and d["layer_norm_eps"] != eps:
                raise ValueError(f"epsilon ({eps}) and layer_norm_eps ({d['layer_norm_eps']}) disagree")
            d["layer_norm_eps"] = eps
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names)
        if unknown:
            raise TypeError(f"unknown DeepSpeedInferenceConfig key(s) {unknown}; known keys: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> DeepSpeedInferenceConfig:
        """Build from a UTF-8 JSON file (`dtype` as a string such as "fp16")."""
        with open(path, encoding="utf-8-sig") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """Field values; `dtype` as a string ("fp16", ...) and the enums as ints, so the dict is JSON-serialisable
        and `from_dict(to_dict())` round-trips."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["dtype"] = _DTYPE_NAMES[self.dtype]
        d["norm_type"] = int(self.norm_type)
        d["mlp_act_func_type"] = int(self.mlp_act_func_type)
        return d

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


__all__ = [
    "ActivationFuncType",
    "DeepSpeedInferenceConfig",
    "GATED_ACTIVATION_TYPES",
    "NormType",
    "UNSET",
    "as_torch_dtype",
]
