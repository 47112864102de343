"""Block configs: `TransformerConfig` (alias `DeepSpeedTransformerConfig`) for the fused training layer.

The fields, their names and their defaults are DeepSpeed's (`deepspeed.ops.transformer.DeepSpeedTransformerConfig`),
so a DeepSpeed config dict or JSON file builds one unchanged. What differs from DeepSpeed, on purpose:

- the config is a frozen, keyword-only dataclass: the layer never mutates it (DeepSpeed writes `layer_id`,
  `training` and `is_grad_enabled` into the object you pass). Make variants with `dataclasses.replace`;
- values are validated at construction (hidden not divisible by heads, dropout ratios outside [0, 1), unknown keys
  in `from_dict`/`from_json_file`, wrong types), with the offending value in the message;
- `intermediate_size <= 0` becomes `4 * hidden_size` everywhere, also in `from_dict` (DeepSpeed only does it in
  `__init__`). The resolved value is stored, so `replace(cfg, hidden_size=...)` keeps the old FFN size: pass
  `intermediate_size=-1` again to re-derive it;
- `from_json_file` reads UTF-8 and UTF-16 (DeepSpeed writes and reads UTF-16 only);
- two additions: `gelu_approximate` ("none" = exact erf GELU as HF BERT, the default; "tanh" as DeepSpeed's
  kernel) and `dtype` ("fp32" | "fp16" | "bf16"; `fp16=True` means "fp16").

DeepSpeed's `-1` defaults are kept and mean "not set". A layer needs `hidden_size`, `heads`, both dropout ratios
and `initializer_range` to be set (and `num_hidden_layers` when `adjust_init_range`); it says which one is missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

UNSET = -1  # DeepSpeed's "not given" default

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
}  # fmt: skip
# Attributes DeepSpeed keeps on its config object at run time; present in dumps of `config.__dict__`. Accepted by
# `from_dict` and ignored (they are per-layer run-time state here, never config).
_DEEPSPEED_RUNTIME_KEYS = frozenset({"layer_id", "test_gemm", "is_grad_enabled"})


@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Config of one fused BERT-style training layer (`TransformerLayer` / `DeepSpeedTransformerLayer`).

    Args (DeepSpeed's fields and defaults; -1 = not set):
        batch_size: largest micro-batch DeepSpeed sized its workspace for. Unused here: any batch works.
        hidden_size: H.
        intermediate_size: FFN width I; `<= 0` means `4 * hidden_size`.
        heads: attention heads h; H must be divisible by h.
        attn_dropout_ratio: dropout on the attention probabilities, in [0, 1).
        hidden_dropout_ratio: dropout on the attention output projection and on the FFN output, in [0, 1).
        num_hidden_layers: depth of the model; only used by `adjust_init_range`.
        initializer_range: std of the normal weight init.
        layer_norm_eps: LayerNorm epsilon.
        local_rank: accepted for compatibility and unused: the layer never picks a device (DeepSpeed calls
            `set_device(local_rank)`) and the init does not depend on it (DeepSpeed's does).
        seed: `>= 0`: the layer owns a `torch.Generator` seeded with it and draws each forward's dropout seed from
            it; `-1`: dropout seeds come from torch's global RNG (`torch.manual_seed` reproduces).
        fp16: half precision (same as `dtype="fp16"`).
        pre_layer_norm: pre-LN (LN before attention and before the FFN) instead of post-LN (BERT).
        normalize_invertible: LayerNorm saves its output instead of its input; backward rebuilds the normalised
            value from it (needs no LN weight equal to 0).
        gelu_checkpoint: do not save the GELU output; recompute it in backward.
        adjust_init_range: scale the init std of `attn_ow` and `output_w` by 1/sqrt(2 * num_hidden_layers).
            Applied on every rank (DeepSpeed applies it only when `local_rank == 0`).
        attn_dropout_checkpoint: save neither the attention dropout mask nor the dropped probabilities;
            regenerate the mask from the seed in backward.
        stochastic_mode: allow faster paths that are not bit-reproducible run to run (see `TransformerLayer`).
        return_tuple: `forward` returns `(output,)` instead of `output`.
        training: the mode a new layer starts in (`layer.train()`/`layer.eval()` change it afterwards).
        gelu_approximate: "none" (erf, as HF BERT) or "tanh" (as DeepSpeed's kernel).
        dtype: "fp32" | "fp16" | "bf16" (or the torch dtype); parameter dtype of a new layer. None: fp16 if
            `fp16` else fp32.
    """

    batch_size: int = UNSET
    hidden_size: int = UNSET
    intermediate_size: int = UNSET
    heads: int = UNSET
    attn_dropout_ratio: float = UNSET
    hidden_dropout_ratio: float = UNSET
    num_hidden_layers: int = UNSET
    initializer_range: float = UNSET
    layer_norm_eps: float = 1e-12
    local_rank: int = UNSET
    seed: int = UNSET
    fp16: bool = False
    pre_layer_norm: bool = True
    normalize_invertible: bool = False
    gelu_checkpoint: bool = False
    adjust_init_range: bool = True
    attn_dropout_checkpoint: bool = False
    stochastic_mode: bool = False
    return_tuple: bool = False
    training: bool = True
    gelu_approximate: Literal["none", "tanh"] = "none"
    dtype: Literal["fp32", "fp16", "bf16"] | None = field(default=None)

    def __post_init__(self) -> None:
        for name in (
            "batch_size",
            "hidden_size",
            "intermediate_size",
            "heads",
            "num_hidden_layers",
            "local_rank",
            "seed",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
        for name in ("attn_dropout_ratio", "hidden_dropout_ratio", "initializer_range", "layer_norm_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a number, got {v!r} ({type(v).__name__})")
        for name in (
            "fp16",
            "pre_layer_norm",
            "normalize_invertible",
            "gelu_checkpoint",
            "adjust_init_range",
            "attn_dropout_checkpoint",
            "stochastic_mode",
            "return_tuple",
            "training",
        ):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {v!r} ({type(v).__name__})")

        for name in ("hidden_size", "heads"):
            v = getattr(self, name)
            if v != UNSET and v <= 0:
                raise ValueError(f"{name} must be positive (or -1 = not set), got {v}")
        if self.hidden_size > 0 and self.heads > 0 and self.hidden_size % self.heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by heads ({self.heads})")
        for name in ("attn_dropout_ratio", "hidden_dropout_ratio"):
            v = getattr(self, name)
            if v != UNSET and not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1) (or -1 = not set), got {v}")
        if self.initializer_range != UNSET and not self.initializer_range > 0:
            raise ValueError(f"initializer_range must be positive (or -1 = not set), got {self.initializer_range}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")
        if self.num_hidden_layers != UNSET and self.num_hidden_layers <= 0:
            raise ValueError(f"num_hidden_layers must be positive (or -1 = not set), got {self.num_hidden_layers}")
        if self.seed < UNSET:
            raise ValueError(f"seed must be >= 0 (or -1 = global RNG), got {self.seed}")
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(f"gelu_approximate must be 'none' (erf) or 'tanh', got {self.gelu_approximate!r}")

        # Canonical values (the DeepSpeed rule for intermediate_size; one spelling per dtype).
        if self.intermediate_size <= 0 and self.hidden_size > 0:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        dtype = self.dtype
        if dtype is not None:
            try:
                dtype = _DTYPE_ALIASES[dtype]
            except (KeyError, TypeError):
                raise ValueError(
                    f"dtype must be one of 'fp32', 'fp16', 'bf16' (or a torch dtype), got {dtype!r}"
                ) from None
            if self.fp16 and dtype != "fp16":
                raise ValueError(f"fp16=True contradicts dtype={dtype!r}; set one of them")
            object.__setattr__(self, "dtype", dtype)

    # -- derived ---------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    @property
    def torch_dtype(self) -> torch.dtype:
        """Parameter dtype of a new layer: `dtype`, else fp16 when `fp16`, else fp32."""
        if self.dtype is not None:
            return _DTYPES[self.dtype]
        return torch.float16 if self.fp16 else torch.float32

    def check_complete(self) -> None:
        """Raise ValueError naming every field a layer needs that is still -1 (not set)."""
        missing = [
            n
            for n in ("hidden_size", "heads", "attn_dropout_ratio", "hidden_dropout_ratio", "initializer_range")
            if getattr(self, n) == UNSET
        ]
        if self.adjust_init_range and self.num_hidden_layers == UNSET:
            missing.append("num_hidden_layers (needed by adjust_init_range=True; or set adjust_init_range=False)")
        if missing:
            raise ValueError("TransformerConfig fields not set (still -1): " + ", ".join(missing))

    # -- (de)serialisation -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        """Build from a dict of field values (a DeepSpeed config dict works; unknown keys raise)."""
        if not isinstance(d, dict):
            raise TypeError(f"from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and k not in _DEEPSPEED_RUNTIME_KEYS)
        if unknown:
            raise ValueError(f"unknown TransformerConfig key(s) {unknown}; known keys: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> TransformerConfig:
        """Build from a JSON file in UTF-8 (with or without BOM) or UTF-16 (DeepSpeed's `to_json_file` encoding)."""
        with open(path, "rb") as f:
            raw = f.read()
        return cls.from_dict(json.loads(_decode_json_bytes(raw, path)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _decode_json_bytes(raw: bytes, path: Any) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    if raw.startswith(b"\xef\xbb\xbf"):
        return raw.decode("utf-8-sig")
    # JSON text starts with an ASCII character, so BOM-less UTF-16 shows a NUL in one of the first two bytes.
    if len(raw) >= 2 and raw[0] == 0:
        return raw.decode("utf-16-be")
    if len(raw) >= 2 and raw[1] == 0:
        return raw.decode("utf-16-le")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 or UTF-16 JSON ({e})") from None


DeepSpeedTransformerConfig = TransformerConfig
