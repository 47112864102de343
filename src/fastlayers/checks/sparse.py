"""`fastlayers check sparse`: `SparseSelfAttention` (forward and backward) against dense attention with the layout
expanded to an element mask, computed in float64."""

from __future__ import annotations

import math

import torch

from fastlayers.checks import Check
from fastlayers.nn.sparse_self_attention import SparseSelfAttention
from fastlayers.sparsity_config import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    FixedSparsityConfig,
    layout_to_dense_mask,
)


def dense_masked_attention(q, k, v, layout, block, rpe=None, key_padding_mask=None):
    """softmax(q·kᵀ/√D + rpe + kpm) @ v with -inf outside the layout ("add" key padding); empty rows give zeros."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, S, S)
    if rpe is not None:
        scores = scores + rpe
    if key_padding_mask is not None:
        scores = scores + key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~layout_to_dense_mask(layout, block), float("-inf"))
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    p = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return p @ v


def _case(name, config, device, dtype, B, S, D, with_rpe, with_padding) -> Check:
    H = config.num_heads
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g, device=device, dtype=dtype) for _ in range(3))
    dout = torch.randn(B, H, S, D, generator=g, device=device, dtype=dtype)
    rpe = 0.5 * torch.randn(1, H, S, S, generator=g, device=device, dtype=dtype) if with_rpe else None
    kpm = None
    if with_padding:
        kpm = torch.zeros(B, S, device=device, dtype=dtype)
        kpm[-1, S - S // 4 :] = float("-inf")
    module = SparseSelfAttention(config, max_seq_length=S).to(device)
    leaves = [t for t in (q, k, v, rpe) if t is not None]
    names = ["out", "dq", "dk", "dv"] + (["drpe"] if with_rpe else [])

    def grads(fn, inputs):
        inputs = [t.detach().requires_grad_(True) for t in inputs]
        out = fn(*inputs)
        return dict(zip(names, [out.detach(), *torch.autograd.grad(out, inputs, dout.to(out.dtype))], strict=True))

    def run(backend: str):
        module.backend = backend

        def fn(q_, k_, v_, rpe_=None):
            return module(q_, k_, v_, rpe=rpe_, key_padding_mask=kpm)

        return grads(fn, leaves)

    def reference():
        layout = module.get_layout(S, device)
        kpm64 = None if kpm is None else kpm.double()

        def fn(q_, k_, v_, rpe_=None):
            return dense_masked_attention(q_, k_, v_, layout, config.block, rpe_, kpm64)

        return grads(fn, [t.double() for t in leaves])

    atol, rtol = (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)
    return Check(name, run, reference, dtype, atol, rtol, backends=("reference", "torch", "triton"))


def checks(device: torch.device) -> list[Check]:
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    B, S, D = (2, 1024, 64) if cuda else (2, 256, 32)
    H = 4 if cuda else 2
    return [
        _case(
            "bigbird",
            BigBirdSparsityConfig(num_heads=H, block=16, num_random_blocks=2, seed=0, different_layout_per_head=True),
            device,
            dtype,
            B,
            S,
            D,
            False,
            True,
        ),
        _case(
            "fixed-unidirectional+rpe",
            FixedSparsityConfig(num_heads=H, block=32, num_local_blocks=4, attention="unidirectional"),
            device,
            dtype,
            B,
            S,
            D,
            True,
            False,
        ),
        _case(
            "bslongformer+rpe+padding",
            BSLongformerSparsityConfig(num_heads=H, block=64, global_block_indices=[0, 3]),
            device,
            dtype,
            B,
            S,
            D,
            True,
            True,
        ),
    ]
