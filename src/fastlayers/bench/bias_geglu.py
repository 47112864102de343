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

from fastlayers.bench.bias_gelu import bench_dtype, bias_act_case
from fastlayers.bench.harness import Case
from fastlayers.functional.bias_geglu import bias_geglu
from fastlayers.utils import dtype_name

_ACT = {"gelu": F.gelu, "silu": F.silu}


def _case(rows: int, c: int, activation: str, device: torch.device, dtype: torch.dtype | None = None) -> Case:
    dtype = dtype or bench_dtype(device)
    act = _ACT[activation]

    def peer(x, b):
        h, g = (x + b).chunk(2, -1)
        return h * act(g)

    return bias_act_case(
        f"bias_geglu fwd+bwd {rows}x2*{c} {activation} {dtype_name(dtype)}",
        lambda x, b: bias_geglu(x, b, activation=activation),
        peer,
        f"h * F.{activation}(g), h, g = (x + b).chunk(2, -1)",
        (rows, 2 * c),
        (rows, c),
        device,
        dtype,
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
