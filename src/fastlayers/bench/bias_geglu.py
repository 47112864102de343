"""Fused bias + GEGLU at Stable Diffusion feed-forward shapes, training fwd+bwd: fastlayers vs eager PyTorch.

- `bias_geglu(x, b)` vs `h, g = (x + b).chunk(2, -1); h * F.gelu(g)` (or `F.silu`), x of shape tokens x 2C:
  SD 1.x at 64x64 latents (4096 tokens, C = 4·320 = 1280) and the next UNet level (C = 4·160 = 640 at 8192 tokens,
  batch 2 x 4096), fp16 on CUDA (plus one fp32 case), fp32 on CPU.
`extra` records the activation bytes autograd keeps (inputs excluded) for ours and the peer.
Inputs are built in `setup` and dropped in `teardown` so that only one case's tensors are alive at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlayers.bench.harness import Case
from fastlayers.functional.bias_geglu import bias_geglu
from fastlayers.memory import saved_activation_bytes
from fastlayers.utils import dtype_name

_ACT = {"gelu": F.gelu, "silu": F.silu}


def _dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def _case(rows: int, c: int, activation: str, device: torch.device, dtype: torch.dtype | None = None) -> Case:
    dtype = dtype or _dtype(device)
    act = _ACT[activation]
    t: dict[str, torch.Tensor] = {}
    extra: dict = {}

    def ours_fwd():
        return bias_geglu(t["x"], t["b"], activation=activation)

    def peer_fwd():
        h, g = (t["x"] + t["b"]).chunk(2, -1)
        return h * act(g)

    def step(fwd):
        def run():
            t["x"].grad = t["b"].grad = None
            fwd().backward(t["dy"])

        return run

    def setup():
        t["x"] = torch.randn(rows, 2 * c, device=device, dtype=dtype, requires_grad=True)
        t["b"] = torch.randn(2 * c, device=device, dtype=dtype, requires_grad=True)
        t["dy"] = torch.randn(rows, c, device=device, dtype=dtype)
        inputs = (t["x"], t["b"])
        extra["ours_saved_bytes"] = saved_activation_bytes(ours_fwd, exclude=inputs)
        extra["peer_saved_bytes"] = saved_activation_bytes(peer_fwd, exclude=inputs)

    return Case(
        name=f"bias_geglu fwd+bwd {rows}x2*{c} {activation} {dtype_name(dtype)}",
        ours=step(ours_fwd),
        peer=step(peer_fwd),
        peer_name=f"h * F.{activation}(g), h, g = (x + b).chunk(2, -1)",
        extra=extra,
        setup=setup,
        teardown=t.clear,
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    if quick:
        return [_case(16, 40, "gelu", device), _case(16, 40, "silu", device)]
    out = [
        _case(4096, 1280, "gelu", device),
        _case(4096, 1280, "silu", device),
        _case(8192, 640, "gelu", device),
    ]
    if device.type == "cuda":
        out.append(_case(8192, 640, "gelu", device, torch.float32))
    return out
