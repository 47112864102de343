"""HF transformers BERT / RoBERTa: TransformerLayer vs BertLayer (weights mapped), and `patch_bert` on whole models.

Tiny configs built in code, no downloads.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.bert.modeling_bert import BertLayer  # noqa: E402

from fastlayers.integrations.hf import (  # noqa: E402
    bert_layer_config,
    bert_layer_state_dict_to_ds,
    convert_model_state_dict,
    ds_state_dict_to_bert_layer,
    patch_bert,
    transformer_layer_from_bert,
)
from fastlayers.nn.transformer_layer import TransformerLayer  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402


def bert_config(hidden=64, heads=4, layers=2, attn="eager", dropout=0.0, **kw):
    return transformers.BertConfig(
        vocab_size=99, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=3 * hidden, max_position_embeddings=600, attention_probs_dropout_prob=dropout,
        hidden_dropout_prob=dropout, attn_implementation=attn, **kw,
    )  # fmt: skip


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial LayerNorm parameters and biases, unit-scale weights."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            elif "embeddings" not in name:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return module


def hf_mask(keep: torch.Tensor, attn: str, dtype=torch.float32) -> torch.Tensor:
    """The 4-D mask HF 5.x hands its layers: eager additive finfo.min, sdpa boolean (True = attend)."""
    B, S = keep.shape
    m = keep.bool()[:, None, None, :].expand(B, 1, S, S)
    return m if attn == "sdpa" else torch.zeros(B, 1, S, S, dtype=dtype).masked_fill(~m, torch.finfo(dtype).min)


def padding(B, S):
    keep = torch.ones(B, S, dtype=torch.long)
    for b in range(1, B):
        keep[b, max(1, S - 5 * b) :] = 0
    return keep


def ds_grads_as_hf(layer: TransformerLayer) -> dict[str, torch.Tensor]:
    return ds_state_dict_to_bert_layer({n: p.grad for n, p in layer.named_parameters()})


# -- one layer ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("S", [1, 21, 119, 509])
@pytest.mark.parametrize("hidden, heads", [(64, 4), (128, 2), (160, 2)], ids=["d16", "d64", "d80"])
def test_layer_matches_hf_bert_layer(attn, S, hidden, heads):
    cfg = bert_config(hidden, heads, attn=attn)
    hf = randomize(BertLayer(cfg)).double()
    ours = transformer_layer_from_bert(hf)
    assert ours.attn_qkvw.dtype == torch.float64 and not ours.config.pre_layer_norm
    B = 3
    x = torch.randn(B, S, hidden, dtype=torch.float64)
    keep = padding(B, S)
    mask = hf_mask(keep, attn, torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, out = hf(x1, mask), ours(x2, mask)
    assert_close(out, ref, name="out")
    dy = torch.randn_like(ref)
    ref.backward(dy)
    out.backward(dy)
    assert_close(x2.grad, x1.grad, kind="bwd", name="dx")
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    for name, g in ds_grads_as_hf(ours).items():
        assert_close(g, hf_grads[name], kind="bwd", name=name)


def test_fp32_layer_close_to_hf_and_tanh_gelu():
    cfg = bert_config(96, 3, hidden_act="gelu_new")
    hf = randomize(BertLayer(cfg))
    ours = transformer_layer_from_bert(hf)
    assert ours.config.gelu_approximate == "tanh"
    x, keep = torch.randn(2, 33, 96), padding(2, 33)
    assert_close(ours(x, keep), hf(x, hf_mask(keep, "eager")), dtype=torch.float32, atol=2e-5, rtol=1e-5)


def test_bert_layer_config_adapter():
    cfg = bert_config(64, 4, layers=5, dropout=0.1)
    tc = bert_layer_config(cfg, normalize_invertible=True)
    assert (tc.hidden_size, tc.heads, tc.intermediate_size, tc.num_hidden_layers) == (64, 4, 192, 5)
    assert tc.attn_dropout_ratio == tc.hidden_dropout_ratio == 0.1 and tc.normalize_invertible
    assert tc.pre_layer_norm is False and tc.adjust_init_range is False and tc.gelu_approximate == "none"
    assert tc.layer_norm_eps == cfg.layer_norm_eps
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        bert_layer_config(bert_config(hidden_act="relu"))
    with pytest.raises(ValueError, match="decoder"):
        bert_layer_config(bert_config(is_decoder=True))
    cfg.position_embedding_type = "relative_key"
    with pytest.raises(ValueError, match="relative_key"):
        bert_layer_config(cfg)


def test_weight_mapping_round_trip():
    hf = randomize(BertLayer(bert_config()))
    sd = hf.state_dict()
    ds = bert_layer_state_dict_to_ds(sd)
    assert set(ds) == {n for n, _ in TransformerLayer(bert_layer_config(bert_config())).named_parameters()}
    back = ds_state_dict_to_bert_layer(ds)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(KeyError, match="missing"):
        bert_layer_state_dict_to_ds({"foo": torch.zeros(1)})


# -- whole models --------------------------------------------------------------------------------------------
def _model_pair(cls, cfg):
    torch.manual_seed(0)
    model = randomize(cls(cfg))
    patched = copy.deepcopy(model)
    n = patch_bert(patched)
    assert n == cfg.num_hidden_layers
    assert not any(isinstance(m, BertLayer) for m in patched.modules())
    return model, patched


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_patch_bert_model_outputs_and_gradients_match(attn):
    cfg = bert_config(64, 4, layers=2, attn=attn)
    model, patched = _model_pair(transformers.BertForSequenceClassification, cfg)
    ids = torch.randint(0, 99, (3, 17))
    keep = padding(3, 17)
    labels = torch.tensor([0, 1, 1])
    out_ref = model(input_ids=ids, attention_mask=keep, labels=labels)
    out = patched(input_ids=ids, attention_mask=keep, labels=labels)
    assert_close(out.logits, out_ref.logits, dtype=torch.float32, atol=1e-5, rtol=1e-4, name="logits")
    out_ref.loss.backward()
    out.loss.backward()
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    got = {n: p.grad for n, p in patched.named_parameters()}
    converted = convert_model_state_dict(got, to="hf")
    assert set(converted) == set(ref_grads)
    for name, g in converted.items():
        assert_close(g, ref_grads[name], dtype=torch.float32, kind="bwd", atol=1e-5, rtol=1e-3, name=name)


def test_patch_roberta_and_hidden_states():
    cfg = transformers.RobertaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)  # fmt: skip
    model, patched = _model_pair(transformers.RobertaModel, cfg)
    ids = torch.randint(3, 99, (2, 11))
    keep = padding(2, 11)
    ref = model(input_ids=ids, attention_mask=keep, output_hidden_states=True)
    out = patched(input_ids=ids, attention_mask=keep, output_hidden_states=True)
    assert_close(out.last_hidden_state, ref.last_hidden_state, dtype=torch.float32, atol=1e-5, rtol=1e-4)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert_close(a, b, dtype=torch.float32, atol=1e-5, rtol=1e-4)


def test_patch_keeps_train_mode_dtype_and_dropout_follows_torch_seed():
    cfg = bert_config(32, 2, layers=2, dropout=0.1)
    model = transformers.BertModel(cfg).to(torch.bfloat16).train()
    assert patch_bert(model, gelu_checkpoint=True) == 2
    layer = model.encoder.layer[0]
    assert isinstance(layer, TransformerLayer) and layer.training and layer.attn_qkvw.dtype == torch.bfloat16
    assert layer.config.gelu_checkpoint and layer.config.hidden_dropout_ratio == 0.1
    ids = torch.randint(0, 99, (2, 9))
    torch.manual_seed(5)
    a = model(input_ids=ids).last_hidden_state
    torch.manual_seed(5)
    b = model(input_ids=ids).last_hidden_state
    assert torch.equal(a, b)
    assert patch_bert(model) == 0  # nothing left to replace


def test_patch_refuses_hf_gradient_checkpointing_and_flex_attention():
    model = transformers.BertModel(bert_config(32, 2, layers=1))
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        patch_bert(model)
    model = transformers.BertModel(bert_config(32, 2, layers=1))
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="BlockMask"):
        patch_bert(model)


def test_convert_state_dict_loads_both_ways():
    cfg = bert_config(32, 2, layers=2)
    model, patched = _model_pair(transformers.BertModel, cfg)
    patched.load_state_dict(convert_model_state_dict(model.state_dict(), to="ds"))
    fresh = transformers.BertModel(cfg)
    fresh.load_state_dict(convert_model_state_dict(patched.state_dict(), to="hf"))
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="'ds' or 'hf'"):
        convert_model_state_dict({}, to="deepspeed")
