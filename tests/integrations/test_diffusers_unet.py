"""diffusers injection: `generic_injection` on a tiny UNet2DConditionModel and on a pipeline-like object holding it
(plus a VAE that must stay untouched), `replace_attn`, `replace_attn_block`, dtypes and refusals.

Tiny configs built in code with random weights, no downloads.
"""

import copy

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention import BasicTransformerBlock  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402

from fastlayers.integrations.diffusers import generic_injection, replace_attn, replace_attn_block  # noqa: E402
from fastlayers.nn.diffusers_attention import DeepSpeedDiffusersAttention  # noqa: E402
from fastlayers.nn.diffusers_block import DeepSpeedDiffusersTransformerBlock  # noqa: E402
from tests.tolerances import assert_close, assert_close_to_reference  # noqa: E402

CROSS_DIM = 32


def tiny_unet() -> UNet2DConditionModel:
    """Two levels (32, 64 channels), 8 heads (diffusers' `attention_head_dim` is the head count here): 4 transformer
    blocks; level 0 has context width == dim (32, DeepSpeed's latent fused-cross bug), the mid block 64 != 32."""
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=CROSS_DIM, attention_head_dim=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    with torch.no_grad():  # LayerNorms away from 1 / 0, so a wrong mapping shows
        for m in unet.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
                m.bias.add_(0.3 * torch.randn_like(m.bias))
    return unet.eval()


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), layers_per_block=1,
    ).eval()  # fmt: skip


def inputs(dtype=torch.float32):
    x = torch.randn(2, 4, 8, 8, dtype=dtype)
    ctx = torch.randn(2, 77, CROSS_DIM, dtype=dtype)
    return x, torch.tensor([10, 500]), ctx


def run(unet, x, t, ctx):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


def count(module, cls) -> int:
    return sum(type(m) is cls for m in module.modules())


class Pipe:
    """The shape of a diffusers pipeline as generic_injection sees it: attributes holding the models."""

    def __init__(self, unet, vae):
        self.unet, self.vae = unet, vae
        self.text_encoder = torch.nn.Linear(4, 4)
        self.scheduler = object()


class ComponentsPipe:
    """A pipeline exposing its models through a `components` dict, like `DiffusionPipeline.components`."""

    def __init__(self, unet):
        self._unet = unet

    @property
    def components(self):
        return {"unet": self._unet, "tokenizer": None}


def test_generic_injection_on_unet_matches_fp32():
    unet = tiny_unet()
    n_blocks = count(unet, BasicTransformerBlock)
    assert n_blocks == 4
    x, t, ctx = inputs()
    ref = run(unet, x, t, ctx)
    patched = copy.deepcopy(unet)
    assert generic_injection(patched) == n_blocks
    assert count(patched, BasicTransformerBlock) == 0
    assert count(patched, DeepSpeedDiffusersTransformerBlock) == n_blocks
    assert count(patched, DeepSpeedDiffusersAttention) == 2 * n_blocks
    blocks = [m for m in patched.modules() if isinstance(m, DeepSpeedDiffusersTransformerBlock)]
    assert any(b.attn_2.fused for b in blocks) and any(not b.attn_2.fused for b in blocks)
    assert_close(run(patched, x, t, ctx), ref)
    assert generic_injection(patched) == 0  # already converted


def test_generic_injection_on_pipeline_leaves_vae_and_text_encoder():
    unet, vae = tiny_unet(), tiny_vae()
    pipe = Pipe(copy.deepcopy(unet), vae)
    vae_state = {k: v.clone() for k, v in vae.state_dict().items()}
    text_encoder = pipe.text_encoder
    n_vae_attn = count(vae, Attention)
    assert n_vae_attn > 0  # the VAE mid block has a diffusers Attention (group norm, residual): must stay
    assert generic_injection(pipe) == count(unet, BasicTransformerBlock)
    assert pipe.vae is vae and count(vae, Attention) == n_vae_attn
    assert all(torch.equal(v, vae_state[k]) for k, v in vae.state_dict().items())
    assert pipe.text_encoder is text_encoder
    x, t, ctx = inputs()
    assert_close(run(pipe.unet, x, t, ctx), run(unet, x, t, ctx))


def test_generic_injection_components_dict_and_empty_pipeline():
    unet = tiny_unet()
    pipe = ComponentsPipe(unet)
    assert generic_injection(pipe) == 4 and count(unet, BasicTransformerBlock) == 0

    class NoUNet:
        vae = None

    assert generic_injection(NoUNet()) == 0


def test_generic_injection_fp16():
    """CPU fp16 (fast at this size): within twice diffusers' own fp16 error against the fp32 UNet."""
    unet = tiny_unet()
    x, t, ctx = inputs()
    want = run(unet, x, t, ctx)
    low = run(copy.deepcopy(unet).half(), x.half(), t, ctx.half())
    patched = copy.deepcopy(unet)
    assert generic_injection(Pipe(patched, None), dtype="fp16") == 4
    assert all(p.dtype == torch.float16 for p in patched.parameters())
    out = run(patched, x.half(), t, ctx.half())
    assert out.dtype == torch.float16
    assert_close_to_reference(out, want, low, atol=2e-3)


def test_generic_injection_bf16_dtype_conversion():
    unet = copy.deepcopy(tiny_unet())
    assert generic_injection(unet, dtype=torch.bfloat16) == 4
    assert all(p.dtype == torch.bfloat16 for p in unet.parameters())
    x, t, ctx = inputs(torch.bfloat16)
    assert torch.isfinite(run(unet, x, t, ctx)).all()


def test_generic_injection_refusals_leave_the_model_unchanged():
    with pytest.raises(ValueError, match="int8"):
        generic_injection(tiny_unet(), dtype=torch.int8)
    with pytest.raises(ValueError, match="fp32, fp16 and bf16"):
        generic_injection(tiny_unet(), dtype=torch.float64)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            generic_injection(tiny_unet(), enable_cuda_graph=True)
    unet = tiny_unet()
    unet.mid_block.attentions[0].transformer_blocks[0].only_cross_attention = True  # a variant we do not implement
    with pytest.raises(ValueError, match=r"mid_block\.attentions\.0\.transformer_blocks.*only_cross_attention"):
        generic_injection(unet)
    assert count(unet, BasicTransformerBlock) == 4  # nothing swapped


def test_replace_attn_and_replace_attn_block():
    unet = tiny_unet()
    block = unet.mid_block.attentions[0].transformer_blocks[0]
    orig = copy.deepcopy(block)
    attn = replace_attn(block.attn2, policy=None)
    assert isinstance(attn, DeepSpeedDiffusersAttention) and not attn.fused and attn.context_dim == CROSS_DIM
    x, ctx = torch.randn(2, 16, 64), torch.randn(2, 77, CROSS_DIM)
    with torch.no_grad():
        assert_close(attn(x, ctx), block.attn2(x, encoder_hidden_states=ctx))
    # bottom-up as DeepSpeed: attention modules first, then the block reusing them
    block.attn1, block.attn2 = replace_attn(block.attn1), attn
    new = replace_attn_block(block)
    assert isinstance(new, DeepSpeedDiffusersTransformerBlock) and new.attn_2 is attn
    with torch.no_grad():
        assert_close(new(x, encoder_hidden_states=ctx), orig(x, encoder_hidden_states=ctx))
