"""masked_softmax fwd+bwd (the attention-probability softmax with dropout) vs eager
`F.dropout(torch.softmax(s * scale + mask, -1))`.

Bytes per call (the op is memory-bound): fwd reads scores and writes p and the dropped output, bwd reads the
grad and p and writes dscores: about 6 · B·H·S² · element size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlayers.bench.harness import Case
from fastlayers.functional.softmax import masked_softmax
from fastlayers.memory import saved_activation_bytes


def _case(b: int, h: int, s: int, dropout_p: float, device: torch.device, dtype=torch.float32) -> Case:
    scores = torch.randn(b, h, s, s, device=device, dtype=dtype, requires_grad=True)
    mask = torch.zeros(b, 1, 1, s, device=device, dtype=dtype)
    mask[: b // 2, ..., s - s // 8 :] = -10000.0
    grad = torch.randn(b, h, s, s, device=device, dtype=dtype)
    scale = 0.125

    def ours_fwd():
        return masked_softmax(scores, mask, scale=scale, dropout_p=dropout_p, checkpoint=True)

    def peer_fwd():
        return F.dropout(torch.softmax(scores * scale + mask, -1), dropout_p)

    def step(fwd):
        def run():
            scores.grad = None
            fwd().backward(grad)

        return run

    return Case(
        name=f"masked_softmax fwd+bwd B{b} H{h} S{s} p{dropout_p}",
        ours=step(ours_fwd),
        peer=step(peer_fwd),
        peer_name="eager softmax+dropout",
        extra={
            "GB": round(6 * scores.numel() * scores.element_size() / 1e9, 4),
            "ours_saved_MiB": round(saved_activation_bytes(ours_fwd, exclude=(scores, mask)) / 2**20, 2),
            "peer_saved_MiB": round(saved_activation_bytes(peer_fwd, exclude=(scores, mask)) / 2**20, 2),
        },
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    if quick:
        return [_case(2, 2, 16, 0.1, device)]
    return [_case(8, 12, s, 0.1, device) for s in (128, 512)]
