"""Attention core, training fwd+bwd: fastlayers `attention` vs F.scaled_dot_product_attention, same dropout and mask.

FLOPs per call: fwd 4·B·H·S_q·S_k·D (two GEMMs), bwd 2.5× that (Triton tutorial 06) -> 3.5 × 4·B·H·S²·D.
On CPU with dropout_p > 0, SDPA runs its math path (cpu-baselines.md §1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlayers.bench.harness import Case
from fastlayers.functional.attention import attention
from fastlayers.memory import saved_activation_bytes


def _case(b: int, h: int, s: int, d: int, dropout_p: float, device: torch.device, dtype=torch.float32) -> Case:
    qkv = torch.randn(b, s, 3, h, d, device=device, dtype=dtype, requires_grad=True)
    bias = torch.zeros(b, 1, 1, s, device=device, dtype=dtype)
    bias[: b // 2, ..., s - s // 8 :] = -10000.0  # BERT-style padding on half the batch
    dout = torch.randn(b, s, h, d, device=device, dtype=dtype)

    def ours_fwd():
        q, k, v = qkv.unbind(2)  # (B, S, H, D) views of the fused projection
        return attention(q, k, v, attn_bias=bias, dropout_p=dropout_p)

    def peer_fwd():
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, S, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        return out.transpose(1, 2)

    def step(fwd):
        def run():
            qkv.grad = None
            fwd().backward(dout)

        return run

    return Case(
        name=f"attention fwd+bwd B{b} H{h} S{s} D{d} p{dropout_p}",
        ours=step(ours_fwd),
        peer=step(peer_fwd),
        peer_name="F.scaled_dot_product_attention",
        flops=3.5 * 4 * b * h * s * s * d,
        extra={
            "ours_saved_MiB": round(saved_activation_bytes(ours_fwd, exclude=(qkv, bias)) / 2**20, 2),
            "peer_saved_MiB": round(saved_activation_bytes(peer_fwd, exclude=(qkv, bias)) / 2**20, 2),
        },
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    if quick:
        return [_case(2, 2, 16, 16, 0.1, device)]
    return [_case(8, 12, s, 64, p, device) for s in (128, 512) for p in (0.1, 0.0)]
