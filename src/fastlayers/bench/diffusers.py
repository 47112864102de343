"""Stable Diffusion transformer block, inference: `DeepSpeedDiffusersTransformerBlock` vs diffusers'
`BasicTransformerBlock` it was built from, plus `nhwc_bias_add` vs eager adds.

Block cases: the three widths of the SD 1.x UNet (dim 320 / 640 / 1280, 8 heads of 40 / 80 / 160), tokens = latent
pixels (64² / 32² / 16² for a 512 px image), text context 77 × 768, batch 2 (classifier-free guidance), random weights,
`torch.no_grad()`; fp32 on CPU, fp16 on CUDA. One int8 case (feed-forward weights GroupQuantizer int8, dequantized
per call: no int8 GEMM kernel) against the same float diffusers block. `nhwc_bias_add` cases: SD's channels_last
conv outputs (activation + bias[c] + other) vs `act + bias.view(1, -1, 1, 1) + other`.
"""

from __future__ import annotations

import copy

import torch

from fastlayers.bench.harness import Case
from fastlayers.utils import dtype_name


def _dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def _block_case(b: int, hw: int, dim: int, heads: int, ctx: int, device: torch.device, int8: bool = False) -> Case:
    dtype = _dtype(device)
    t: dict = {}
    s = hw * hw

    def setup():
        from diffusers.models.attention import BasicTransformerBlock

        from fastlayers.nn.diffusers_block import DeepSpeedDiffusersTransformerBlock, Diffusers2DTransformerConfig

        torch.manual_seed(0)
        peer = BasicTransformerBlock(dim, heads, dim // heads, cross_attention_dim=768, activation_fn="geglu")
        peer = peer.to(device=device, dtype=dtype).eval()
        t["peer"] = peer
        cfg = Diffusers2DTransformerConfig(int8_quantization=int8)
        t["ours"] = DeepSpeedDiffusersTransformerBlock(copy.deepcopy(peer), cfg).eval()
        t["x"] = torch.randn(b, s, dim, device=device, dtype=dtype)
        t["ctx"] = torch.randn(b, ctx, 768, device=device, dtype=dtype)

    def run(name):
        def go():
            with torch.no_grad():
                t[name](t["x"], encoder_hidden_states=t["ctx"])

        return go

    # matmul FLOPs: self-attn qkv + out (4·d²), cross q + out (2·d²), cross k, v over the context (2·ctx·768·d),
    # attention (4·s²·d self, 4·s·ctx·d cross), GEGLU FF (d·8d + 4d·d = 12·d²)
    flops = 2 * b * (s * 18 * dim * dim + 2 * ctx * 768 * dim) + 4 * b * dim * (s * s + s * ctx)
    tag = " int8 ff" if int8 else ""
    return Case(
        name=f"SD block{tag} B{b} {hw}x{hw} tokens dim{dim} heads{heads} ctx{ctx} {dtype_name(dtype)}",
        ours=run("ours"),
        peer=run("peer"),
        peer_name="diffusers BasicTransformerBlock",
        flops=flops,
        setup=setup,
        teardown=t.clear,
    )


def _bias_add_case(n: int, c: int, hw: int, device: torch.device) -> Case:
    dtype = _dtype(device)
    t: dict = {}

    def setup():
        cl = torch.channels_last
        t["act"] = torch.randn(n, c, hw, hw, device=device, dtype=dtype).contiguous(memory_format=cl)
        t["other"] = torch.randn(n, c, hw, hw, device=device, dtype=dtype).contiguous(memory_format=cl)
        t["bias"] = torch.randn(c, device=device, dtype=dtype)

    def ours():
        from fastlayers.functional.bias_add import nhwc_bias_add

        return nhwc_bias_add(t["act"], t["bias"], t["other"])

    def peer():
        return t["act"] + t["bias"].view(1, -1, 1, 1) + t["other"]

    return Case(
        name=f"nhwc_bias_add +other N{n} C{c} {hw}x{hw} channels_last {dtype_name(dtype)}",
        ours=ours,
        peer=peer,
        peer_name="act + bias.view(1,-1,1,1) + other",
        setup=setup,
        teardown=t.clear,
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    if quick:
        return [_block_case(1, 4, 32, 2, 5, device), _block_case(1, 4, 32, 2, 5, device, int8=True)] + [
            _bias_add_case(1, 8, 4, device)
        ]
    blocks = [(2, 64, 320, 8), (2, 32, 640, 8), (2, 16, 1280, 8)]
    out = [_block_case(b, hw, dim, heads, 77, device) for b, hw, dim, heads in blocks]
    out.append(_block_case(2, 32, 640, 8, 77, device, int8=True))
    out += [_bias_add_case(2, c, hw, device) for c, hw in ((320, 64), (1280, 16))]
    return out
