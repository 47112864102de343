"""TransformerLayer (DeepSpeedTransformerLayer) vs the float64 reference layer: forward, backward, masks, dropout,
memory flags, init, DeepSpeed API details, dtypes, and the Triton backend under the interpreter."""

import copy
import dataclasses
import math

import pytest
import torch

from fastlayers.configs import TransformerConfig
from fastlayers.memory import saved_activation_bytes
from fastlayers.nn.transformer_layer import DeepSpeedTransformerLayer, TransformerLayer, attention_bias
from fastlayers.reference.transformer_layer import PARAM_NAMES, param_shapes, transformer_layer_ref
from fastlayers.utils import keep_mask, new_seed
from tests.tolerances import assert_close


def make_config(hidden=64, heads=4, inter=None, pre=True, p_attn=0.0, p_hid=0.0, **kw) -> TransformerConfig:
    return TransformerConfig(hidden_size=hidden, heads=heads, intermediate_size=inter or 4 * hidden,
                             attn_dropout_ratio=p_attn, hidden_dropout_ratio=p_hid, num_hidden_layers=2,
                             initializer_range=0.02, pre_layer_norm=pre, **kw)  # fmt: skip


def make_layer(cfg: TransformerConfig, **kw) -> TransformerLayer:
    """A layer whose biases and LayerNorm parameters are not the trivial 0 / 1 (so every parameter matters)."""
    layer = TransformerLayer(cfg, **kw)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith(("b", "nw")) or name == "norm_w":
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))  # unit-scale activations: a stronger test than 0.02
    return layer


def padding_mask(B: int, S: int) -> torch.Tensor:
    """(B, S) keep mask with a different number of padded keys per row (row 0 unpadded)."""
    keep = torch.ones(B, S, dtype=torch.long)
    for b in range(1, B):
        keep[b, max(1, S - 7 * b) :] = 0
    return keep


def additive(keep: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """(B, S) keep mask -> DeepSpeed's additive (B, 1, 1, S) of 0 / -10000."""
    return ((1.0 - keep.to(dtype)) * -10000.0)[:, None, None, :]


def ref64(layer: TransformerLayer, x: torch.Tensor, mask: torch.Tensor | None, **kw) -> torch.Tensor:
    c = layer.config
    params = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    out = transformer_layer_ref(x.double(), params, heads=c.heads, attention_mask=mask, pre_layer_norm=c.pre_layer_norm,
                                eps=c.layer_norm_eps, gelu_approximate=c.gelu_approximate, **kw)  # fmt: skip
    return out, params


def grads_of(out, inputs: dict[str, torch.Tensor], dy):
    gs = torch.autograd.grad(out, list(inputs.values()), dy)
    return dict(zip(inputs, gs, strict=True))


def check_fwd_bwd(layer, x, mask_for_layer, mask_ref, *, fwd_tol=None, bwd_tol=None, **ref_kw):
    """Whole-batch forward and every gradient (input + 12 parameters) against the float64 reference."""
    x = x.detach().requires_grad_()
    out = layer(x, mask_for_layer)
    xr = x.detach().double().requires_grad_()
    ref, params = ref64(layer, xr, mask_ref, **ref_kw)
    dy = torch.randn_like(ref)
    assert_close(out, ref, dtype=x.dtype, name="out", **(fwd_tol or {}))
    ours = grads_of(out, {"x": x, **dict(layer.named_parameters())}, dy.to(out.dtype))
    theirs = grads_of(ref, {"x": xr, **params}, dy)
    for name in ours:
        assert_close(ours[name], theirs[name], dtype=x.dtype, kind="bwd", name=f"grad {name}", **(bwd_tol or {}))


# -- exactness vs the reference (dropout 0) ------------------------------------------------------------------
HEAD_DIMS = {16: (64, 4), 64: (128, 2), 80: (160, 2)}  # head dim -> (hidden, heads)


@pytest.mark.parametrize("pre", [True, False], ids=["preLN", "postLN"])
@pytest.mark.parametrize("S", [1, 21, 119, 509])
@pytest.mark.parametrize("d", [16, 64, 80])
def test_matches_reference_fp32(pre, S, d):
    hidden, heads = HEAD_DIMS[d]
    layer = make_layer(make_config(hidden, heads, pre=pre))
    B = 3
    x = torch.randn(B, S, hidden)
    keep = padding_mask(B, S)
    check_fwd_bwd(layer, x, keep, additive(keep))


@pytest.mark.parametrize("pre", [True, False], ids=["preLN", "postLN"])
def test_deepspeed_random_additive_mask_and_tanh_gelu(pre):
    """DeepSpeed's tests use mask = randn(B, 1, 1, S) and the kernel's tanh GELU; I = H as in its backward test."""
    layer = make_layer(make_config(96, 3, inter=96, pre=pre, gelu_approximate="tanh"))
    x, mask = torch.randn(4, 53, 96), torch.randn(4, 1, 1, 53)
    check_fwd_bwd(layer, x, mask, mask.double())


@pytest.mark.parametrize("pre", [True, False], ids=["preLN", "postLN"])
def test_smaller_batch_than_configured(pre):
    layer = make_layer(make_config(pre=pre, batch_size=8))
    x = torch.randn(3, 16, 64)
    check_fwd_bwd(layer, x, None, None)


# -- masks ---------------------------------------------------------------------------------------------------
def test_every_mask_format_gives_the_same_result():
    layer = make_layer(make_config(pre=False)).eval()
    B, S = 3, 19
    x = torch.randn(B, S, 64)
    keep = padding_mask(B, S)
    hf_additive = (1.0 - keep.float())[:, None, None, :].expand(B, 1, S, S) * torch.finfo(torch.float32).min
    formats = {
        "deepspeed (B,1,1,S) -10000": additive(keep, torch.float32),
        "hf eager (B,1,S,S) finfo.min": hf_additive,
        "hf sdpa (B,1,S,S) bool": keep.bool()[:, None, None, :].expand(B, 1, S, S),
        "(B,S) long": keep,
        "(B,S) float": keep.float(),
        "(B,S) bool": keep.bool(),
    }
    expected = layer(x, formats.pop("deepspeed (B,1,1,S) -10000"))
    for name, mask in formats.items():
        torch.testing.assert_close(layer(x, mask), expected, msg=name)
    # padding changes the result (the mask is not ignored), and no mask == all-ones mask
    assert not torch.allclose(layer(x, None), expected)
    torch.testing.assert_close(layer(x, None), layer(x, torch.ones(B, S)))


def test_fully_masked_batch_row_gives_finite_output_and_grads():
    layer = make_layer(make_config(pre=True))
    x = torch.randn(2, 5, 64, requires_grad=True)
    keep = torch.ones(2, 5)
    keep[1] = 0
    out = layer(x, keep)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "mask, exc, match",
    [
        (torch.ones(2, 6), ValueError, r"\(B, S\) = \(2, 5\) keep-mask"),
        (torch.full((2, 5), 0.5), ValueError, "only 0 and 1"),
        (torch.zeros(2, 1, 1, 6), ValueError, r"\(B\|1, 1\|heads, 1\|S, S\)"),
        (torch.zeros(3, 1, 1, 5), ValueError, r"\(B\|1, 1\|heads, 1\|S, S\)"),
        (torch.zeros(2, 5, 5), ValueError, "must be"),
        (torch.zeros(2, 1, 1, 5, dtype=torch.long), TypeError, "additive \\(float\\) or boolean"),
        ([[1, 1, 1, 1, 1]] * 2, TypeError, "torch.Tensor or None"),
    ],
)
def test_bad_masks_raise(mask, exc, match):
    layer = TransformerLayer(make_config())
    with pytest.raises(exc, match=match):
        layer(torch.randn(2, 5, 64), mask)


def test_bad_inputs_raise():
    layer = TransformerLayer(make_config())
    with pytest.raises(ValueError, match=r"shape \(B, S, 64\), got \(2, 5, 63\)"):
        layer(torch.randn(2, 5, 63))
    with pytest.raises(ValueError, match=r"shape \(B, S, 64\)"):
        layer(torch.randn(5, 64))
    with pytest.raises(TypeError, match="dtype fp64 does not match the layer's parameters \\(fp32\\)"):
        layer(torch.randn(2, 5, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 5, 64, dtype=torch.long))
    with pytest.raises(ValueError, match="S >= 1"):
        layer(torch.randn(2, 0, 64))


def test_attention_bias_helper_shapes():
    assert attention_bias(None, 2, 3, torch.float32, torch.device("cpu")) is None
    b = attention_bias(torch.tensor([[1, 1, 0]]), 1, 3, torch.float16, torch.device("cpu"))
    assert b.shape == (1, 1, 1, 3) and b.dtype == torch.float16
    assert b[0, 0, 0].tolist() == [0.0, 0.0, float("-inf")]


# -- HF / DeepSpeed call conventions -------------------------------------------------------------------------
def test_hf_style_extra_arguments():
    layer = TransformerLayer(make_config(return_tuple=True)).eval()
    x = torch.randn(2, 5, 64)
    (out,) = layer(x, None, None, encoder_attention_mask=None, past_key_values=None, position_ids=None,
                   output_attentions=False, use_cache=False)  # fmt: skip
    torch.testing.assert_close(out, layer(x)[0])
    with pytest.raises(NotImplementedError, match="positional argument 3"):
        layer(x, None, torch.randn(2, 4, 64))  # HF passes encoder_hidden_states third
    for name in ("head_mask", "encoder_hidden_states", "output_attentions", "past_key_values"):
        with pytest.raises(NotImplementedError, match=name):
            layer(x, **{name: torch.ones(1) if name != "output_attentions" else True})


def test_return_tuple_and_alias():
    assert DeepSpeedTransformerLayer is TransformerLayer
    x = torch.randn(2, 5, 64)
    out = TransformerLayer(make_config(return_tuple=True))(x)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == x.shape
    assert isinstance(TransformerLayer(make_config())(x), torch.Tensor)


# -- parameters, init, initial weights -----------------------------------------------------------------------
def test_parameter_names_and_shapes_are_deepspeeds():
    cfg = make_config(64, 4, inter=96)
    layer = TransformerLayer(cfg)
    assert [n for n, _ in layer.named_parameters()] == list(PARAM_NAMES)
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == param_shapes(64, 96)
    sd = layer.state_dict()
    other = TransformerLayer(cfg)
    other.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), other.parameters(), strict=True))


@pytest.mark.parametrize("local_rank", [-1, 0, 3])
def test_init_matches_deepspeed_and_does_not_depend_on_rank(local_rank):
    torch.manual_seed(0)
    cfg = TransformerConfig(hidden_size=256, heads=4, attn_dropout_ratio=0.0, hidden_dropout_ratio=0.0,
                            num_hidden_layers=8, initializer_range=0.05, local_rank=local_rank)  # fmt: skip
    layer = TransformerLayer(cfg)
    adjusted = 0.05 / math.sqrt(2 * 8)
    for name, std in [("attn_qkvw", 0.05), ("inter_w", 0.05), ("attn_ow", adjusted), ("output_w", adjusted)]:
        got = getattr(layer, name).std().item()
        assert abs(got - std) < 0.05 * std, (name, got, std)
    for name in ("attn_qkvb", "attn_ob", "attn_nb", "inter_b", "output_b", "norm_b"):
        assert torch.count_nonzero(getattr(layer, name)) == 0, name
    assert torch.all(layer.attn_nw == 1) and torch.all(layer.norm_w == 1)
    plain = TransformerLayer(dataclasses.replace(cfg, adjust_init_range=False))
    assert abs(plain.attn_ow.std().item() - 0.05) < 0.05 * 0.05


def test_initial_weights_and_biases_in_deepspeed_order():
    H, I = 32, 48
    cfg = make_config(H, 2, inter=I)
    w = [torch.randn(H, H) for _ in range(4)] + [torch.randn(H), torch.randn(I, H), torch.randn(H, I), torch.randn(H)]
    b = [torch.randn(H) for _ in range(4)] + [torch.randn(H), torch.randn(I), torch.randn(H), torch.randn(H)]
    layer = TransformerLayer(cfg, w, b)
    assert torch.equal(layer.attn_qkvw, torch.cat(w[:3]))
    assert torch.equal(layer.attn_qkvb, torch.cat(b[:3]))  # used (DeepSpeed zero-fills and ignores b[0:3])
    for (wn, bn), i in zip([("attn_ow", "attn_ob"), ("attn_nw", "attn_nb"), ("inter_w", "inter_b"),
                            ("output_w", "output_b"), ("norm_w", "norm_b")], range(3, 8), strict=True):  # fmt: skip
        assert torch.equal(getattr(layer, wn), w[i]) and torch.equal(getattr(layer, bn), b[i])
    w[0].add_(1.0)  # copied, not aliased
    assert not torch.equal(layer.attn_qkvw[:H], w[0])
    with pytest.raises(ValueError, match="8 tensors"):
        TransformerLayer(cfg, w[:7])
    bad = list(w)
    bad[5] = torch.randn(H, H)
    with pytest.raises(ValueError, match=r"initial_weights\[5\] must have shape \(48, 32\)"):
        TransformerLayer(cfg, bad)


def test_config_is_not_mutated_and_accepts_dict_or_deepspeed_object():
    cfg = make_config()
    before = dataclasses.asdict(cfg)
    layers = [TransformerLayer(cfg) for _ in range(2)]
    layers[0].eval()
    layers[0](torch.randn(1, 3, 64))
    assert dataclasses.asdict(cfg) == before and layers[1].config is cfg
    assert TransformerLayer(dataclasses.asdict(cfg)).config == cfg

    class DeepSpeedLike:  # DeepSpeed's config object: plain attributes plus its run-time ones
        def __init__(self):
            self.__dict__.update(dataclasses.asdict(cfg), layer_id=5, test_gemm=False, is_grad_enabled=True)

    assert TransformerLayer(DeepSpeedLike()).config == cfg
    with pytest.raises(ValueError, match="not set"):
        TransformerLayer(TransformerConfig(hidden_size=64, heads=4))
    with pytest.raises(TypeError, match="TransformerConfig"):
        TransformerLayer(42)


def test_training_field_sets_initial_mode_and_extra_repr():
    assert TransformerLayer(make_config(training=False)).training is False
    assert TransformerLayer(make_config()).training is True
    assert "hidden=64, heads=4" in repr(TransformerLayer(make_config()))


# -- dropout -------------------------------------------------------------------------------------------------
def _expected_keep_masks(layer, seed, B, S):
    """The torch backends' masks: keep_mask(shape, p, seed, device, offset) at offsets 0, 1, 2."""
    c = layer.config
    H = c.hidden_size
    return {"attn": keep_mask((B, c.heads, S, S), c.attn_dropout_ratio, seed, "cpu", 0),
            "attn_out": keep_mask((B, S, H), c.hidden_dropout_ratio, seed, "cpu", 1),
            "ffn_out": keep_mask((B, S, H), c.hidden_dropout_ratio, seed, "cpu", 2)}  # fmt: skip


@pytest.mark.parametrize("pre", [True, False], ids=["preLN", "postLN"])
def test_dropout_matches_reference_given_the_seeded_masks(pre):
    """Dropout sites, scaling and op order: the reference fed the masks the torch backend draws from the seed."""
    cfg = make_config(pre=pre, p_attn=0.2, p_hid=0.3, seed=1234)
    layer = make_layer(cfg)
    B, S = 2, 13
    x = torch.randn(B, S, 64)
    g = torch.Generator()
    g.set_state(layer.generator.get_state())
    seed = new_seed(g)  # the layer's next draw
    masks = _expected_keep_masks(layer, seed, B, S)
    keep = padding_mask(B, S)
    check_fwd_bwd(layer, x, keep, additive(keep), attn_dropout_p=0.2, hidden_dropout_p=0.3, keep_masks=masks)


def test_dropout_reproducible_under_seed_and_off_in_eval():
    cfg = make_config(p_attn=0.1, p_hid=0.1, seed=7)
    a = make_layer(cfg)
    b = copy.deepcopy(a)
    b.generator.manual_seed(7)
    a.generator.manual_seed(7)
    x = torch.randn(2, 9, 64)
    first = a(x)
    assert torch.equal(first, b(x))  # same seed, same params -> same bits
    assert not torch.equal(first, a(x))  # the next forward draws a new seed
    a.eval()
    ref, _ = ref64(a, x, None)
    assert_close(a(x), ref, dtype=torch.float32)
    assert torch.equal(a(x), a(x))


def test_layers_sharing_a_seed_get_distinct_reproducible_streams():
    cfg = make_config(p_attn=0.0, p_hid=0.5, seed=987654)
    first, second = TransformerLayer(cfg), TransformerLayer(cfg)
    assert (first.seed_index, second.seed_index) == (0, 1)
    assert torch.equal(first.generator.get_state(), torch.Generator().manual_seed(987654).get_state())
    second.load_state_dict(first.state_dict())
    x = torch.randn(2, 5, 64)
    assert not torch.equal(first(x), second(x))  # not the same masks in every layer of a stack
    twin = copy.deepcopy(second)
    twin.generator.set_state(second.generator.get_state())
    assert torch.equal(twin(x), second(x))


def test_global_rng_seed_when_config_seed_is_unset():
    layer = make_layer(make_config(p_attn=0.1, p_hid=0.1))
    assert layer.generator is None
    x = torch.randn(2, 9, 64)
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    assert torch.equal(first, layer(x))


def test_no_random_number_drawn_without_dropout():
    layer = make_layer(make_config(p_attn=0.1, p_hid=0.1)).eval()
    state = torch.get_rng_state()
    layer(torch.zeros(1, 4, 64))
    assert torch.equal(state, torch.get_rng_state())


# -- memory flags --------------------------------------------------------------------------------------------
FLAGS = ("normalize_invertible", "gelu_checkpoint", "attn_dropout_checkpoint")


def _run(layer, x, mask, dy):
    x = x.clone().requires_grad_()
    out = layer(x, mask)
    grads = torch.autograd.grad(out, [x, *layer.parameters()], dy)
    return out, grads


@pytest.mark.parametrize("pre", [True, False], ids=["preLN", "postLN"])
@pytest.mark.parametrize("flags", [(f,) for f in FLAGS] + [FLAGS], ids=lambda f: "+".join(f))
def test_memory_flags_give_the_same_outputs_and_gradients(pre, flags):
    cfg = make_config(pre=pre, p_attn=0.2, p_hid=0.2, seed=11)
    base = make_layer(cfg)
    flagged = TransformerLayer(dataclasses.replace(cfg, **dict.fromkeys(flags, True)))
    flagged.load_state_dict(base.state_dict())
    flagged.generator.set_state(base.generator.get_state())  # same dropout seeds
    B, S = 2, 17
    x, dy, keep = torch.randn(B, S, 64), torch.randn(B, S, 64), padding_mask(B, S)
    out0, g0 = _run(base, x, keep, dy)
    out1, g1 = _run(flagged, x, keep, dy)
    assert torch.equal(out0, out1)  # the flags only change what backward keeps
    for name, a, b in zip(["x", *PARAM_NAMES], g0, g1, strict=True):
        if "normalize_invertible" in flags:  # x̂ is rebuilt from y: equal up to rounding
            assert_close(b, a, dtype=torch.float32, kind="bwd", atol=1e-5, rtol=1e-4, name=name)
        else:
            assert torch.equal(a, b), name


def _saved(layer, x, mask=None):
    return saved_activation_bytes(lambda: layer(x, mask), exclude=(x, layer))


@pytest.mark.parametrize("pre", [True, False], ids=["preLN", "postLN"])
def test_memory_flags_cut_saved_bytes_as_accounted(pre):
    """Exact accounting of what autograd keeps (fp32, per token; h heads, S keys, bool masks 1 byte)."""
    H, heads, I, B, S = 64, 4, 256, 2, 24
    cfg = make_config(H, heads, inter=I, pre=pre, p_attn=0.1, p_hid=0.1)
    x = torch.randn(B, S, H, requires_grad=True)
    tokens = B * S
    got = {}
    for flags in [(), *[(f,) for f in FLAGS], FLAGS]:
        got[flags] = _saved(TransformerLayer(dataclasses.replace(cfg, **dict.fromkeys(flags, True))), x)
    f32 = 4
    # all flags: q, k, v (3H) + probs (h·S) + context (H) + attention-LN output (H) + FFN pre-activation (I)
    # + [post-LN: final LN output (H)] + two hidden dropout masks (2H bytes) + LN rstd (1 per LN)
    n_ln_out = 1 if pre else 2
    n_ln = 2  # LayerNorms per layer (each keeps one fp32 rstd per token)
    pre_ln_input_ln_out = H if pre else 0  # pre-LN also keeps LN(x), the qkv GEMM input
    expected_all = tokens * (f32 * (3 * H + heads * S + H + n_ln_out * H + I + pre_ln_input_ln_out + n_ln)
                             + 2 * H)  # fmt: skip
    assert got[FLAGS] == expected_all
    attn_mask_bytes = B * heads * S * S  # bool
    assert got[()] - got[("attn_dropout_checkpoint",)] == attn_mask_bytes
    assert got[()] - got[("gelu_checkpoint",)] == tokens * I * f32  # the GELU output
    # normalize_invertible: each LN keeps its output and rstd instead of its input, mean and rstd. Net per token:
    # pre-LN: the input LN reads x (the layer input, not counted) and its output is kept by the qkv GEMM anyway;
    # the attention LN drops its input (H). Post-LN: both LN inputs go (2H), the final LN output comes in (H).
    assert got[()] - got[("normalize_invertible",)] == tokens * f32 * (H + n_ln)
    assert sum(got[()] - got[(f,)] for f in FLAGS) == got[()] - got[FLAGS]


def test_all_flags_save_at_most_055_of_hf_bert_layer_at_bert_base():
    """The issue's target at BERT-base per token (B=1, S=128 has the same per-token ratio as B=8, S=128)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.modeling_bert import BertLayer

    hf = BertLayer(transformers.BertConfig(attn_implementation="sdpa")).train()
    cfg = TransformerConfig(hidden_size=768, heads=12, attn_dropout_ratio=0.1, hidden_dropout_ratio=0.1,
                            num_hidden_layers=12, initializer_range=0.02, pre_layer_norm=False,
                            **dict.fromkeys(FLAGS, True))  # fmt: skip
    ours = TransformerLayer(cfg)
    x = torch.randn(1, 128, 768, requires_grad=True)
    hf_bytes = saved_activation_bytes(lambda: hf(x), exclude=(x, hf))
    ratio = _saved(ours, x) / hf_bytes
    assert ratio <= 0.55, ratio


def test_nothing_saved_under_no_grad_and_no_masks_in_eval():
    layer = make_layer(make_config(p_attn=0.1, p_hid=0.1))
    B, S = 2, 8
    x = torch.randn(B, S, 64)
    with torch.no_grad():
        assert _saved(layer, x) == 0
    train = _saved(layer, x)
    layer.eval()  # parameters still need grad (e.g. fine-tuning without dropout): the masks go, and without
    # dropout the attention runs SDPA, which keeps its log-sum-exp (B·H·S fp32) instead of P (B·H·S·S fp32)
    masks = B * 4 * S * S + 2 * B * S * 64
    assert train - _saved(layer, x) == masks + 4 * (B * 4 * S * S - B * 4 * S)


# -- dtypes / autocast ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pre", [True, False], ids=["preLN", "postLN"])
def test_half_precision_close_to_fp64_reference(dtype, pre):
    layer = make_layer(make_config(pre=pre))
    half = copy.deepcopy(layer).to(dtype)
    x = torch.randn(2, 12, 64)
    keep = padding_mask(2, 12)
    ref, _ = ref64(half, x.to(dtype), additive(keep))
    out = half(x.to(dtype), keep)
    assert out.dtype == dtype
    assert_close(out, ref, dtype=dtype, atol=0.1 if dtype == torch.bfloat16 else 0.02, rtol=0.05)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all()
               for p in half.parameters())  # fmt: skip


def test_config_dtype_sets_parameter_dtype():
    assert TransformerLayer(make_config(dtype="bf16")).attn_qkvw.dtype == torch.bfloat16
    assert TransformerLayer(make_config(fp16=True)).norm_w.dtype == torch.float16
    assert TransformerLayer(make_config(fp16=True), dtype=torch.float32).norm_w.dtype == torch.float32


def test_autocast_bf16_on_cpu():
    layer = make_layer(make_config(pre=False))
    x = torch.randn(2, 10, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, padding_mask(2, 10))
    assert out.dtype == torch.bfloat16
    ref, _ = ref64(layer, x.detach(), additive(padding_mask(2, 10)))
    assert_close(out, ref, dtype=torch.bfloat16, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.attn_qkvw.grad.dtype == torch.float32
    assert torch.isfinite(layer.attn_qkvw.grad).all()


def test_stochastic_mode_uses_native_dropout_default_mode_only_the_layer_seed():
    cfg = make_config(pre=True, p_attn=0.1, p_hid=0.3, seed=5)
    x = torch.randn(2, 6, 64)
    for stochastic in (False, True):
        layer = make_layer(dataclasses.replace(cfg, stochastic_mode=stochastic))
        state = layer.generator.get_state()
        outs = []
        for global_seed in (1, 2):  # same layer seed, different global RNG
            torch.manual_seed(global_seed)
            layer.generator.set_state(state)
            outs.append(layer(x))
        assert torch.equal(outs[0], outs[1]) != stochastic
        assert torch.isfinite(outs[1]).all()


# -- backends ------------------------------------------------------------------------------------------------
def test_backend_reference_matches_torch():
    cfg = make_config(pre=False)
    layer = make_layer(cfg)
    ref_layer = copy.deepcopy(layer)
    ref_layer.backend = "reference"
    x, keep = torch.randn(2, 11, 64), padding_mask(2, 11)
    assert_close(layer(x, keep), ref_layer(x, keep), dtype=torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("pre", [True, False], ids=["preLN", "postLN"])
def test_triton_backend_under_interpreter(pre):
    from fastlayers import backends
    from fastlayers.utils import is_triton_available, triton_interpret

    if not (is_triton_available() and triton_interpret()):
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    missing = [op for op in ("attention", "bias_dropout_residual_layer_norm", "layer_norm", "bias_gelu_linear")
               if "triton" not in backends.impls(op)]  # fmt: skip
    if missing:
        pytest.skip(f"no Triton backend yet for {missing}")
    layer = make_layer(make_config(32, 2, inter=64, pre=pre), backend="triton")
    x, keep = torch.randn(2, 16, 32), padding_mask(2, 16)
    check_fwd_bwd(layer, x, keep, additive(keep), fwd_tol={"atol": 1e-3, "rtol": 1e-3},
                  bwd_tol={"atol": 2e-3, "rtol": 1e-3})  # fmt: skip
