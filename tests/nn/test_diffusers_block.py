"""DeepSpeedDiffusersTransformerBlock / DeepSpeedDiffusersAttention vs diffusers' BasicTransformerBlock / Attention,
DeepSpeedInferenceConfig, int8 feed-forward, DeepSpeed state-dict names, and refusals.

Tiny diffusers modules built in code with random weights (LayerNorm parameters moved away from 1 / 0).
"""

import copy
import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.attention import BasicTransformerBlock  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402

from fastlayers.functional.quantize import group_dequantize  # noqa: E402
from fastlayers.inference_config import ActivationFuncType, DeepSpeedInferenceConfig, NormType  # noqa: E402
from fastlayers.nn.diffusers_attention import DeepSpeedDiffusersAttention  # noqa: E402
from fastlayers.nn.diffusers_block import (  # noqa: E402
    DeepSpeedDiffusersTransformerBlock,
    Diffusers2DTransformerConfig,
)
from tests.tolerances import assert_close, assert_close_to_reference  # noqa: E402

HEADS = 2


def randomize_norms(module: torch.nn.Module) -> torch.nn.Module:
    """LayerNorm weights 1 + N(0, 0.3), biases N(0, 0.3): a wrong LN parameter mapping then fails the tests."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
                m.weight.add_(0.3 * torch.randn_like(m.weight))
                m.bias.add_(0.3 * torch.randn_like(m.bias))
    return module


def make_block(head_dim=40, cross=32, attention_bias=False, **kw) -> BasicTransformerBlock:
    """diffusers block with dim = HEADS * head_dim; cross: context width, "dim" (= dim) or None (no attn2)."""
    dim = HEADS * head_dim
    cad = dim if cross == "dim" else cross
    block = BasicTransformerBlock(dim, HEADS, head_dim, cross_attention_dim=cad, activation_fn="geglu",
                                  attention_bias=attention_bias, **kw)  # fmt: skip
    return randomize_norms(block).eval()


def context_for(block: BasicTransformerBlock, s_ctx: int, batch: int = 2) -> torch.Tensor | None:
    if block.attn2 is None:
        return None
    return torch.randn(batch, s_ctx, block.attn2.to_k.in_features)


# (head_dim, cross-attention context width, context length): context width != dim, == dim (DeepSpeed's latent
# fused-5-tuple bug), no cross-attention; head dims 40 (SD 1.x level 0) and 64.
BLOCK_CASES = [(40, 32, 77), (64, "dim", 1), (40, "dim", 77), (64, 32, 1), (40, None, 0)]


@pytest.mark.parametrize("S", [1, 7, 64, 509])
@pytest.mark.parametrize("head_dim,cross,s_ctx", BLOCK_CASES)
def test_block_matches_diffusers_fp32(S, head_dim, cross, s_ctx):
    ref_block = make_block(head_dim, cross)
    block = DeepSpeedDiffusersTransformerBlock(ref_block, Diffusers2DTransformerConfig())
    x = torch.randn(2, S, ref_block.dim)
    ctx = context_for(ref_block, s_ctx)
    with torch.no_grad():
        ref = ref_block(x, encoder_hidden_states=ctx)
        assert_close(block(x, encoder_hidden_states=ctx), ref, name="encoder_hidden_states=")
        assert_close(block(x, context=ctx), ref, name="context=")
        assert_close(block(x, ctx), ref, name="positional context")
    if cross == "dim":
        assert block.attn_2.fused  # the latent-bug layout: fused weights, used for a real cross-attention


def test_encoder_hidden_states_overrides_context():
    ref_block = make_block(40, 32)
    block = DeepSpeedDiffusersTransformerBlock(ref_block)
    x, ctx, other = torch.randn(1, 9, 80), torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    with torch.no_grad():
        assert_close(block(x, context=other, encoder_hidden_states=ctx), ref_block(x, encoder_hidden_states=ctx))
        # encoder_hidden_states=None does not override (diffusers passes it explicitly)
        assert_close(block(x, context=ctx, encoder_hidden_states=None), ref_block(x, encoder_hidden_states=ctx))


def test_block_without_context_is_self_attention_in_attn2():
    """diffusers runs attn2 as self-attention when no context is given (possible when context width == dim)."""
    ref_block = make_block(40, "dim")
    block = DeepSpeedDiffusersTransformerBlock(ref_block)
    x = torch.randn(2, 13, 80)
    with torch.no_grad():
        assert_close(block(x), ref_block(x))
    block32 = DeepSpeedDiffusersTransformerBlock(make_block(40, 32))
    with pytest.raises(ValueError, match="context_dim=32"):
        block32(x)


@pytest.mark.parametrize("S,head_dim,cross,s_ctx", [(7, 40, 32, 77), (509, 64, "dim", 77), (64, 40, None, 0)])
def test_block_matches_diffusers_fp16(S, head_dim, cross, s_ctx):
    """fp16 within twice diffusers' own fp16 error against the fp32 result (flash-attn's relative rule)."""
    ref32 = make_block(head_dim, cross)
    ref16 = copy.deepcopy(ref32).half()
    block = DeepSpeedDiffusersTransformerBlock(ref16)
    assert block.ff1_w.dtype == torch.float16 and block.attn_1.attn_qkvw.dtype == torch.float16
    x = torch.randn(2, S, ref32.dim)
    ctx = context_for(ref32, s_ctx)
    ctx16 = None if ctx is None else ctx.half()
    with torch.no_grad():
        want = ref32(x, encoder_hidden_states=ctx)
        low = ref16(x.half(), encoder_hidden_states=ctx16)
        out = block(x.half(), encoder_hidden_states=ctx16)
    assert out.dtype == torch.float16
    assert_close_to_reference(out, want, low, atol=2e-3)


def test_block_bf16_runs_on_cpu():
    ref32 = make_block(40, 32)
    block = DeepSpeedDiffusersTransformerBlock(copy.deepcopy(ref32).to(torch.bfloat16))
    x, ctx = torch.randn(2, 33, 80), torch.randn(2, 7, 32)
    with torch.no_grad():
        want = ref32(x, encoder_hidden_states=ctx)
        low = copy.deepcopy(ref32).to(torch.bfloat16)(x.bfloat16(), encoder_hidden_states=ctx.bfloat16())
        out = block(x.bfloat16(), ctx.bfloat16())
    assert_close_to_reference(out, want, low, atol=2e-2)


def test_block_gradients_flow_to_inputs():
    """Parameters are frozen; hidden_states and context get diffusers' gradients (DeepSpeed raises in backward)."""
    ref_block = make_block(40, 32)
    block = DeepSpeedDiffusersTransformerBlock(ref_block)
    assert not any(p.requires_grad for p in block.parameters())
    x = torch.randn(2, 11, 80, requires_grad=True)
    ctx = torch.randn(2, 6, 32, requires_grad=True)
    dy = torch.randn(2, 11, 80)
    got = torch.autograd.grad(block(x, ctx), (x, ctx), dy)
    want = torch.autograd.grad(ref_block(x, encoder_hidden_states=ctx), (x, ctx), dy)
    for g, w, n in zip(got, want, ("dx", "dcontext"), strict=True):
        assert_close(g, w, kind="bwd", name=n)


def test_block_with_ds_attention_children_and_biases():
    """The injector converts attn1/attn2 first: the block reuses them; q/k/v biases and no out bias work."""
    ref_block = make_block(40, 32, attention_bias=True, attention_out_bias=False)
    src = copy.deepcopy(ref_block)
    src.attn1 = DeepSpeedDiffusersAttention.from_diffusers(src.attn1)
    src.attn2 = DeepSpeedDiffusersAttention.from_diffusers(src.attn2)
    block = DeepSpeedDiffusersTransformerBlock(src)
    assert block.attn_1 is src.attn1 and block.attn_2 is src.attn2
    assert not block.attn_1.do_out_bias and block.attn_1.attn_ob is None
    assert block.attn_1_bias.abs().sum() == 0 and block.attn_1.attn_qkvb is not None
    x, ctx = torch.randn(2, 10, 80), torch.randn(2, 4, 32)
    with torch.no_grad():
        assert_close(block(x, ctx), ref_block(x, encoder_hidden_states=ctx))


def test_block_pulls_out_bias_into_the_residual_layer_norm():
    ref_block = make_block(40, 32)
    block = DeepSpeedDiffusersTransformerBlock(ref_block)
    assert block.attn_1_bias is block.attn_1.attn_ob and block.attn_2_bias is block.attn_2.attn_ob
    assert not block.attn_1.do_out_bias and not block.attn_2.do_out_bias
    # the attention alone now leaves the bias out
    n = torch.randn(1, 5, 80)
    with torch.no_grad():
        with_bias = ref_block.attn1(n)
        assert_close(block.attn_1(n) + block.attn_1_bias, with_bias)


# -- attention module alone ------------------------------------------------------------------------------------


@pytest.mark.parametrize("S", [1, 7, 64, 509])
@pytest.mark.parametrize("head_dim", [40, 64])
def test_attention_self_matches_diffusers(S, head_dim):
    ref = Attention(query_dim=HEADS * head_dim, heads=HEADS, dim_head=head_dim).eval()
    attn = DeepSpeedDiffusersAttention.from_diffusers(ref)
    assert attn.fused and attn.attn_qkvw.shape == (HEADS * head_dim, 3 * HEADS * head_dim)
    x = torch.randn(2, S, HEADS * head_dim)
    with torch.no_grad():
        assert_close(attn(x), ref(x))


@pytest.mark.parametrize("s_ctx", [1, 77])
@pytest.mark.parametrize("cross", [32, 80])
@pytest.mark.parametrize("bias", [False, True])
def test_attention_cross_matches_diffusers(s_ctx, cross, bias):
    ref = Attention(query_dim=80, cross_attention_dim=cross, heads=HEADS, dim_head=40, bias=bias).eval()
    attn = DeepSpeedDiffusersAttention.from_diffusers(ref)
    assert attn.fused == (cross == 80)
    if not attn.fused:
        assert attn.attn_qw.shape == (80, 80) and attn.attn_qkvw is None
        assert attn.attn_kw.shape == attn.attn_vw.shape == (cross, 80)
    x, ctx = torch.randn(2, 19, 80), torch.randn(2, s_ctx, cross)
    with torch.no_grad():
        assert_close(attn(x, context=ctx), ref(x, encoder_hidden_states=ctx))
        if cross == 80:  # same module, self-attention: both paths have weights
            assert_close(attn(x), ref(x))


def test_attention_input_cast_dtype_and_fp16():
    ref = Attention(query_dim=80, cross_attention_dim=32, heads=HEADS, dim_head=40).eval()
    attn = DeepSpeedDiffusersAttention.from_diffusers(ref, dtype=torch.float16)
    x, ctx = torch.randn(2, 21, 80), torch.randn(2, 7, 32)
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=ctx)
        low = copy.deepcopy(ref).half()(x.half(), encoder_hidden_states=ctx.half())
        out = attn(x, ctx)  # fp32 input cast to the fp16 weights, as DeepSpeed does
    assert out.dtype == torch.float16
    assert_close_to_reference(out, want, low, atol=1e-3)


def test_attention_from_config_names_shapes_and_scale():
    cfg = DeepSpeedInferenceConfig(hidden_size=80, heads=2, dtype=torch.float32, layer_id=3)
    attn = DeepSpeedDiffusersAttention(cfg)
    shapes = {n: tuple(p.shape) for n, p in attn.named_parameters()}
    assert shapes == {"attn_qkvw": (80, 240), "attn_qkvb": (240,), "attn_ow": (80, 80), "attn_ob": (80,)}
    assert not any(p.requires_grad for p in attn.parameters())
    assert math.isclose(attn.norm_factor, math.sqrt(math.sqrt(40)))
    assert math.isclose(attn.softmax_scale, 1 / math.sqrt(40))
    cross = DeepSpeedDiffusersAttention(cfg, context_dim=48)
    assert {n: tuple(p.shape) for n, p in cross.named_parameters()} == {
        "attn_qw": (80, 80), "attn_kw": (48, 80), "attn_vw": (48, 80), "attn_qkvb": (240,), "attn_ow": (80, 80),
        "attn_ob": (80,),
    }  # fmt: skip
    inv = DeepSpeedDiffusersAttention(dataclasses.replace(cfg, scale_attn_by_inverse_layer_idx=True))
    assert math.isclose(inv.softmax_scale, 1 / (math.sqrt(40) * 4))  # layer_id 3
    assert math.isclose(inv.norm_factor, math.sqrt(math.sqrt(40)) * math.sqrt(4))
    mup = DeepSpeedDiffusersAttention(dataclasses.replace(cfg, use_mup=True))
    assert math.isclose(mup.softmax_scale, 1 / 40)
    # the forward uses that scale: compare with an explicit computation
    x = torch.randn(1, 6, 80)
    with torch.no_grad():
        q, k, v = (x @ inv.attn_qkvw + inv.attn_qkvb).view(1, 6, 3, 2, 40).unbind(2)
        p = torch.softmax(torch.einsum("bshd,bthd->bhst", q, k) * inv.softmax_scale, -1)
        want = torch.einsum("bhst,bthd->bshd", p, v).reshape(1, 6, 80) @ inv.attn_ow + inv.attn_ob
        assert_close(inv(x), want)


def test_attention_layer_id_counter_does_not_mutate_config():
    cfg = DeepSpeedInferenceConfig(hidden_size=64, heads=4, dtype="fp32")
    a, b = DeepSpeedDiffusersAttention(cfg), DeepSpeedDiffusersAttention(cfg)
    assert cfg.layer_id == -1
    assert b.config.layer_id == a.config.layer_id + 1
    assert DeepSpeedDiffusersAttention.layer_id == b.config.layer_id + 1
    fixed = DeepSpeedDiffusersAttention(dataclasses.replace(cfg, layer_id=7))
    assert fixed.config.layer_id == 7 and DeepSpeedDiffusersAttention.layer_id == b.config.layer_id + 1


def test_attention_gradients_flow_to_inputs():
    ref = Attention(query_dim=80, cross_attention_dim=32, heads=HEADS, dim_head=40).eval()
    attn = DeepSpeedDiffusersAttention.from_diffusers(ref)
    x, ctx = torch.randn(2, 9, 80, requires_grad=True), torch.randn(2, 4, 32, requires_grad=True)
    dy = torch.randn(2, 9, 80)
    got = torch.autograd.grad(attn(x, ctx), (x, ctx), dy)
    want = torch.autograd.grad(ref(x, encoder_hidden_states=ctx), (x, ctx), dy)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, kind="bwd")


def test_attention_construction_needs_no_triton():
    """Build and run with `import triton` blocked (DeepSpeed raises ImportError at construction without Triton)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from fastlayers.inference_config import DeepSpeedInferenceConfig\n"
        "from fastlayers.nn.diffusers_attention import DeepSpeedDiffusersAttention\n"
        "a = DeepSpeedDiffusersAttention(DeepSpeedInferenceConfig(hidden_size=40, heads=1), context_dim=8)\n"
        "y = a(torch.randn(1, 3, 40).half(), torch.randn(1, 5, 8).half())\n"
        "assert y.shape == (1, 3, 40) and 'triton' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# -- int8 feed-forward -----------------------------------------------------------------------------------------


def test_int8_block_equals_block_with_dequantized_weights():
    ref_block = make_block(40, 32)
    block8 = DeepSpeedDiffusersTransformerBlock(ref_block, Diffusers2DTransformerConfig(int8_quantization=True))
    assert block8.ff1_w.dtype == torch.int8 and block8.ff2_w.dtype == torch.int8
    assert not block8.ff1_w.requires_grad
    deq = DeepSpeedDiffusersTransformerBlock(copy.deepcopy(ref_block))
    deq.ff1_w = torch.nn.Parameter(group_dequantize(block8.ff1_w), requires_grad=False)
    deq.ff2_w = torch.nn.Parameter(group_dequantize(block8.ff2_w), requires_grad=False)
    x, ctx = torch.randn(2, 37, 80), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert_close(block8(x, ctx), deq(x, ctx))


def test_int8_block_close_to_fp32_diffusers():
    """Bound: per-row absmax int8 rounds each weight by at most half a step (absmax/254); the output error of the
    feed-forward, relative to its output (rms), follows the relative rms weight errors of its two GEMMs,
    eps_k = ||W_k - deq(W_k)|| / ||W_k|| (about 1/254 for diffusers' uniform init). We allow 3 * sqrt(eps1² + eps2²)
    (GEGLU can amplify the first GEMM's error where gelu(gate) is small) and require a visible nonzero error."""
    ref_block = make_block(40, 32)
    captured = {}
    hook = ref_block.ff.register_forward_hook(lambda mod, inp, out: captured.update(ff=out))
    block8 = DeepSpeedDiffusersTransformerBlock(ref_block, Diffusers2DTransformerConfig(int8_quantization=True))
    x, ctx = torch.randn(2, 64, 80), torch.randn(2, 77, 32)
    with torch.no_grad():
        ref = ref_block(x, encoder_hidden_states=ctx)
        out = block8(x, ctx)
    hook.remove()
    eps = []
    for q, w in ((block8.ff1_w, ref_block.ff.net[0].proj.weight), (block8.ff2_w, ref_block.ff.net[2].weight)):
        eps.append(((group_dequantize(q) - w).norm() / w.norm()).item())
    rel = ((out - ref).norm() / captured["ff"].norm()).item()
    bound = 3 * math.hypot(*eps)
    assert 0 < rel <= bound, f"relative FF error {rel:.3e}, bound {bound:.3e} (eps {eps})"
    assert max(eps) < 1 / 200


def test_int8_state_dict_round_trip():
    block8 = DeepSpeedDiffusersTransformerBlock(make_block(40, 32), Diffusers2DTransformerConfig(True))
    other = DeepSpeedDiffusersTransformerBlock(make_block(40, 32), Diffusers2DTransformerConfig(True))
    sd = block8.state_dict()
    assert sd["ff1_w"].dtype == torch.int8 and "ff1_w_scale" in sd and "ff2_w_scale" in sd
    other.load_state_dict(sd)
    x, ctx = torch.randn(1, 9, 80), torch.randn(1, 3, 32)
    with torch.no_grad():
        assert torch.equal(other(x, ctx), block8(x, ctx))


# -- DeepSpeed state-dict names --------------------------------------------------------------------------------


def test_state_dict_names_are_deepspeeds():
    block = DeepSpeedDiffusersTransformerBlock(make_block(40, 32))
    want = {
        "ff1_w": (640, 80), "ff1_b": (640,), "ff2_w": (80, 320), "ff2_b": (80,),
        "norm1_g": (80,), "norm1_b": (80,), "norm2_g": (80,), "norm2_b": (80,), "norm3_g": (80,), "norm3_b": (80,),
        "attn_1_bias": (80,), "attn_2_bias": (80,),
        "attn_1.attn_qkvw": (80, 240), "attn_1.attn_ow": (80, 80), "attn_1.attn_ob": (80,),
        "attn_2.attn_qw": (80, 80), "attn_2.attn_kw": (32, 80), "attn_2.attn_vw": (32, 80),
        "attn_2.attn_ow": (80, 80), "attn_2.attn_ob": (80,),
    }  # fmt: skip
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == want
    assert (block.norm1_eps, block.norm2_eps, block.norm3_eps) == (1e-5, 1e-5, 1e-5)


def test_loads_deepspeed_state_dict_with_uninitialised_separate_weights():
    """DeepSpeed's fused attention modules also carry uninitialised attn_qw/kw/vw: they load and are ignored."""
    src = DeepSpeedDiffusersTransformerBlock(make_block(40, 32))
    dst = DeepSpeedDiffusersTransformerBlock(make_block(40, 32))
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    for name in ("attn_qw", "attn_kw", "attn_vw"):
        sd[f"attn_1.{name}"] = torch.full((80, 80), float("nan"))
    dst.load_state_dict(sd, strict=True)
    x, ctx = torch.randn(1, 9, 80), torch.randn(1, 3, 32)
    with torch.no_grad():
        assert torch.equal(dst(x, ctx), src(x, ctx))


# -- refusals --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"norm_type": "ada_norm", "num_embeds_ada_norm": 10}, "norm_type='ada_norm'"),
        ({"norm_type": "ada_norm_zero", "num_embeds_ada_norm": 10}, "norm_type='ada_norm_zero'"),
        ({"activation_fn": "gelu"}, "activation_fn='gelu'"),
        ({"activation_fn": "geglu-approximate"}, "activation_fn='geglu-approximate'"),
        ({"only_cross_attention": True}, "only_cross_attention"),
        ({"double_self_attention": True}, "double_self_attention"),
        ({"positional_embeddings": "sinusoidal", "num_positional_embeddings": 16}, "positional_embeddings"),
        ({"attention_type": "gated"}, "GLIGEN"),
    ],
)
def test_unsupported_block_variants_raise(kw, match):
    block = BasicTransformerBlock(80, HEADS, 40, cross_attention_dim=32, **{"activation_fn": "geglu", **kw})
    with pytest.raises(ValueError, match=match):
        DeepSpeedDiffusersTransformerBlock(block)


def test_unsupported_attention_variants_raise():
    with pytest.raises(ValueError, match="norm_q"):
        DeepSpeedDiffusersAttention.from_diffusers(Attention(80, heads=2, dim_head=40, qk_norm="layer_norm"))
    with pytest.raises(ValueError, match="residual_connection"):
        DeepSpeedDiffusersAttention.from_diffusers(Attention(80, heads=2, dim_head=40, residual_connection=True))
    with pytest.raises(ValueError, match="rescale_output_factor"):
        DeepSpeedDiffusersAttention.from_diffusers(Attention(80, heads=2, dim_head=40, rescale_output_factor=2.0))
    with pytest.raises(ValueError, match="group_norm"):
        DeepSpeedDiffusersAttention.from_diffusers(Attention(80, heads=2, dim_head=40, norm_num_groups=8))
    with pytest.raises(ValueError, match="query width"):
        DeepSpeedDiffusersAttention.from_diffusers(Attention(80, heads=2, dim_head=32))


def test_unsupported_forward_arguments_raise():
    block = DeepSpeedDiffusersTransformerBlock(make_block(40, 32))
    x, ctx = torch.randn(1, 4, 80), torch.randn(1, 3, 32)
    with pytest.raises(ValueError, match="attention_mask is not supported"):
        block(x, ctx, attention_mask=torch.zeros(1, 1, 4))
    with pytest.raises(ValueError, match="encoder_attention_mask is not supported"):
        block(x, ctx, encoder_attention_mask=torch.zeros(1, 1, 3))
    with pytest.raises(ValueError, match="cross_attention_kwargs"):
        block(x, ctx, cross_attention_kwargs={"gligen": {}})
    with pytest.raises(TypeError, match="bogus"):
        block(x, ctx, bogus=1)
    with pytest.raises(ValueError, match=r"hidden_states must be \(B, S, 80\)"):
        block(torch.randn(1, 4, 81), ctx)
    with pytest.raises(ValueError, match="width 32"):
        block(x, torch.randn(1, 3, 33))
    with pytest.raises(ValueError, match="input_mask"):
        block.attn_1(x, input_mask=torch.ones(1, 4))
    # what diffusers' Transformer2DModel passes in plain SD is accepted (timestep / class_labels are ignored)
    with torch.no_grad():
        block(x, attention_mask=None, encoder_hidden_states=ctx, encoder_attention_mask=None,
              timestep=torch.tensor([3]), cross_attention_kwargs={}, class_labels=None)  # fmt: skip
    # diffusers' gradient-checkpointing call is positional: it fails loudly instead of misreading the arguments
    with pytest.raises(TypeError):
        block(x, None, ctx, None, None, None, None)


def test_bad_attention_configs_raise():
    with pytest.raises(ValueError, match="int8"):
        DeepSpeedDiffusersAttention(DeepSpeedInferenceConfig(hidden_size=64, heads=4, dtype="int8"))
    with pytest.raises(ValueError, match="mp_size=2"):
        DeepSpeedDiffusersAttention(DeepSpeedInferenceConfig(hidden_size=64, heads=4, mp_size=2))
    with pytest.raises(ValueError, match="must be set"):
        DeepSpeedDiffusersAttention(DeepSpeedInferenceConfig())
    with pytest.raises(TypeError, match="Diffusers2DTransformerConfig"):
        DeepSpeedDiffusersTransformerBlock(make_block(40, 32), {"int8_quantization": True})
    with pytest.raises(TypeError, match="int8_quantization"):
        Diffusers2DTransformerConfig(int8_quantization=1)


# -- DeepSpeedInferenceConfig ----------------------------------------------------------------------------------

DEEPSPEED_DEFAULTS = {
    "hidden_size": -1, "intermediate_size": -1, "heads": -1, "num_hidden_layers": -1, "layer_norm_eps": 1e-12,
    "local_rank": -1, "mp_size": 1, "dtype": torch.float16, "pre_layer_norm": True, "norm_type": 1,
    "stochastic_mode": False, "scale_attention": True, "triangular_masking": True, "local_attention": False,
    "window_size": 256, "rotary_dim": -1, "rotate_half": False, "rotate_every_two": True, "return_tuple": True,
    "mlp_after_attn": True, "mlp_act_func_type": 1, "training_mp_size": 1, "bigscience_bloom": False,
    "max_out_tokens": 1024, "min_out_tokens": 1, "enable_qkv_quantization": False, "use_mup": False,
    "scale_attn_by_inverse_layer_idx": False, "return_single_tuple": False, "set_empty_params": False,
    "transposed_mode": False, "use_triton": False, "triton_autotune": False, "num_kv": -1, "rope_theta": 10000,
    "invert_mask": True,
}  # fmt: skip


def test_inference_config_has_every_deepspeed_field_and_default():
    cfg = DeepSpeedInferenceConfig()
    for name, value in DEEPSPEED_DEFAULTS.items():
        assert getattr(cfg, name) == value, name
    assert cfg.epsilon == 1e-12 and cfg.layer_id == -1
    assert cfg.norm_type is NormType.LayerNorm and cfg.mlp_act_func_type is ActivationFuncType.GELU


def test_inference_config_values_and_errors(tmp_path):
    cfg = DeepSpeedInferenceConfig(hidden_size=64, heads=4, dtype="bf16", norm_type="RMSNorm", mlp_act_func_type=3)
    assert cfg.intermediate_size == 256 and cfg.dtype == torch.bfloat16 and cfg.head_dim == 16
    assert cfg.norm_type is NormType.RMSNorm and cfg.mlp_act_func_type is ActivationFuncType.GATED_GELU
    for s, d in (("fp16", torch.float16), ("half", torch.float16), ("fp32", torch.float32), ("int8", torch.int8)):
        assert DeepSpeedInferenceConfig(dtype=s).dtype == d
    assert DeepSpeedInferenceConfig(dtype="int8").activation_dtype == torch.float16
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.layer_id = 3
    with pytest.raises(TypeError, match="hiden_size"):
        DeepSpeedInferenceConfig(hiden_size=3)
    with pytest.raises(TypeError, match="hiden_size"):
        DeepSpeedInferenceConfig.from_dict({"hiden_size": 3})
    for bad, match in (({"hidden_size": 65, "heads": 4}, "divisible"), ({"dtype": "fp8"}, "dtype"),
                       ({"heads": 6, "mp_size": 4}, "mp_size"), ({"max_out_tokens": 0}, "max_out_tokens"),
                       ({"norm_type": 7}, "norm_type"), ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
                       ({"heads": 8, "num_kv": 3}, "num_kv")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            DeepSpeedInferenceConfig(**bad)
    with pytest.raises(TypeError, match="pre_layer_norm"):
        DeepSpeedInferenceConfig(pre_layer_norm=1)
    # dict / JSON round trips; DeepSpeed's attribute name `epsilon` is accepted as a key
    assert DeepSpeedInferenceConfig.from_dict(cfg.to_dict()) == cfg
    assert DeepSpeedInferenceConfig.from_dict({"epsilon": 1e-6}).layer_norm_eps == 1e-6
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"hidden_size": 32, "heads": 2, "dtype": "fp16", "epsilon": 1e-5}), encoding="utf-8")
    loaded = DeepSpeedInferenceConfig.from_json_file(path)
    assert (loaded.hidden_size, loaded.dtype, loaded.layer_norm_eps) == (32, torch.float16, 1e-5)
    assert DeepSpeedInferenceConfig.from_dict(json.loads(cfg.to_json_string())) == cfg
