"""TransformerConfig / DeepSpeedTransformerConfig: DeepSpeed's fields and defaults, validation, (de)serialisation."""

import dataclasses
import json

import pytest
import torch

from fastlayers.configs import DeepSpeedTransformerConfig, TransformerConfig

# DeepSpeed's DeepSpeedTransformerConfig.__init__ keyword defaults (deepspeed/ops/transformer/transformer.py).
DEEPSPEED_DEFAULTS = dict(
    batch_size=-1, hidden_size=-1, intermediate_size=-1, heads=-1, attn_dropout_ratio=-1, hidden_dropout_ratio=-1,
    num_hidden_layers=-1, initializer_range=-1, layer_norm_eps=1e-12, local_rank=-1, seed=-1, fp16=False,
    pre_layer_norm=True, normalize_invertible=False, gelu_checkpoint=False, adjust_init_range=True,
    attn_dropout_checkpoint=False, stochastic_mode=False, return_tuple=False, training=True,
)  # fmt: skip

BERT_BASE = dict(batch_size=8, hidden_size=768, heads=12, attn_dropout_ratio=0.1, hidden_dropout_ratio=0.1,
                 num_hidden_layers=12, initializer_range=0.02)  # fmt: skip


def test_alias_and_deepspeed_defaults():
    assert DeepSpeedTransformerConfig is TransformerConfig
    cfg = TransformerConfig()
    for name, value in DEEPSPEED_DEFAULTS.items():
        assert getattr(cfg, name) == value, name
    assert cfg.gelu_approximate == "none" and cfg.dtype is None and cfg.torch_dtype == torch.float32


def test_deepspeed_defaults_match_installed_deepspeed_signature():
    inspect = pytest.importorskip("inspect")
    try:
        from deepspeed.ops.transformer.transformer import DeepSpeedTransformerConfig as DSConfig
    except Exception as e:  # deepspeed is a test oracle only; its import may fail on exotic set-ups
        pytest.skip(f"deepspeed not importable: {e}")
    params = inspect.signature(DSConfig.__init__).parameters
    ds_defaults = {n: p.default for n, p in params.items() if n != "self"}
    assert ds_defaults == DEEPSPEED_DEFAULTS


def test_intermediate_size_default_is_4h_also_from_dict():
    assert TransformerConfig(**BERT_BASE).intermediate_size == 3072
    assert TransformerConfig(**BERT_BASE, intermediate_size=0).intermediate_size == 3072
    assert TransformerConfig(**BERT_BASE, intermediate_size=1000).intermediate_size == 1000
    assert TransformerConfig.from_dict(dict(BERT_BASE)).intermediate_size == 3072  # DeepSpeed's from_dict keeps -1
    assert TransformerConfig(**BERT_BASE).head_dim == 64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_size=100, heads=3), r"hidden_size \(100\) must be divisible by heads \(3\)"),
        (dict(attn_dropout_ratio=1.0), r"attn_dropout_ratio must be in \[0, 1\).*1.0"),
        (dict(hidden_dropout_ratio=-0.5), r"hidden_dropout_ratio must be in \[0, 1\).*-0.5"),
        (dict(hidden_size=0), "hidden_size must be positive"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps must be positive"),
        (dict(gelu_approximate="erf"), "gelu_approximate must be"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(fp16=True, dtype="bf16"), "fp16=True contradicts dtype='bf16'"),
        (dict(seed=-5), "seed must be >= 0"),
        (dict(initializer_range=0.0), "initializer_range must be positive"),
    ],
)
def test_invalid_values_raise_with_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(hidden_size=768.0), dict(fp16=1), dict(heads="12"), dict(seed=True)])
def test_wrong_types_raise(kwargs):
    with pytest.raises(TypeError, match=next(iter(kwargs))):
        TransformerConfig(**kwargs)


def test_dtype_spellings_and_fp16_flag():
    assert TransformerConfig(fp16=True).torch_dtype == torch.float16
    assert TransformerConfig(dtype="bfloat16").dtype == "bf16"
    assert TransformerConfig(dtype=torch.bfloat16).torch_dtype == torch.bfloat16
    assert TransformerConfig(fp16=True, dtype="fp16").dtype == "fp16"


def test_frozen_and_replace():
    cfg = TransformerConfig(**BERT_BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 1024
    assert dataclasses.replace(cfg, pre_layer_norm=False).pre_layer_norm is False
    assert hash(cfg) == hash(TransformerConfig(**BERT_BASE))


def test_from_dict_names_unknown_keys_and_accepts_deepspeed_runtime_keys():
    with pytest.raises(ValueError, match=r"unknown TransformerConfig key\(s\) \['hiden_size', 'num_heads'\]"):
        TransformerConfig.from_dict({"hiden_size": 768, "num_heads": 12})
    # DeepSpeed's config.__dict__ also carries layer_id / test_gemm / is_grad_enabled: accepted, ignored
    cfg = TransformerConfig.from_dict({**BERT_BASE, "layer_id": 3, "test_gemm": False, "is_grad_enabled": True})
    assert cfg == TransformerConfig(**BERT_BASE)
    with pytest.raises(TypeError):
        TransformerConfig.from_dict([("hidden_size", 768)])


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be"])
def test_from_json_file_utf8_and_utf16(tmp_path, encoding):
    d = {**BERT_BASE, "pre_layer_norm": False, "gelu_approximate": "tanh"}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(d), encoding=encoding)  # DeepSpeed writes utf-16 (with BOM)
    cfg = TransformerConfig.from_json_file(path)
    assert cfg == TransformerConfig(**d)


def test_from_json_file_bad_encoding_and_json_round_trip(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"hidden_size": 768, "x": "\xff\xfe\xfa"}')
    with pytest.raises(ValueError, match="not UTF-8 or UTF-16"):
        TransformerConfig.from_json_file(bad)
    cfg = TransformerConfig(**BERT_BASE, dtype="bf16")
    path = tmp_path / "round.json"
    path.write_text(cfg.to_json_string())
    assert TransformerConfig.from_json_file(path) == cfg


def test_check_complete_names_missing_fields():
    with pytest.raises(ValueError, match="hidden_size, heads, attn_dropout_ratio, hidden_dropout_ratio"):
        TransformerConfig().check_complete()
    partial = dict(BERT_BASE)
    del partial["num_hidden_layers"]
    with pytest.raises(ValueError, match="num_hidden_layers"):
        TransformerConfig(**partial).check_complete()
    TransformerConfig(**partial, adjust_init_range=False).check_complete()
