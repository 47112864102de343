"""Fused bias + GELU at BERT FFN shapes, training fwd+bwd: fastlayers vs eager PyTorch.

- `bias_gelu(x, b)` vs `F.gelu(x + b)` (rows x 3072), both approximations.
- `bias_gelu_linear(x, b, w, b2)` vs `F.linear(F.gelu(x + b), w, b2)` (3072 -> 768), checkpoint off/on.
  FLOPs per call: 3 GEMMs (fwd, dgrad, wgrad) of 2·rows·3072·768 each.
`extra` records the activation bytes autograd keeps (inputs and weights excluded) for ours and the peer.
Inputs are built in `setup` and dropped in `teardown` so that only one case's tensors are alive at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlayers.bench.harness import Case
from fastlayers.functional.bias_gelu import bias_gelu, bias_gelu_linear
from fastlayers.memory import saved_activation_bytes


def bench_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 on CPU (also used by bench/bias_geglu.py)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def bias_act_case(
    name: str,
    ours,
    peer,
    peer_name: str,
    x_shape: tuple[int, ...],
    dy_shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
) -> Case:
    """Training fwd+bwd of `ours(x, b)` vs `peer(x, b)`: x of x_shape, bias of x_shape[-1:], upstream grad of
    dy_shape, all random in `dtype`; `extra` records the activation bytes each keeps (x and b excluded)."""
    t: dict[str, torch.Tensor] = {}
    extra: dict = {}

    def ours_fwd():
        return ours(t["x"], t["b"])

    def peer_fwd():
        return peer(t["x"], t["b"])

    def step(fwd):
        def run():
            t["x"].grad = t["b"].grad = None
            fwd().backward(t["dy"])

        return run

    def setup():
        t["x"] = torch.randn(x_shape, device=device, dtype=dtype, requires_grad=True)
        t["b"] = torch.randn(x_shape[-1], device=device, dtype=dtype, requires_grad=True)
        t["dy"] = torch.randn(dy_shape, device=device, dtype=dtype)
        inputs = (t["x"], t["b"])
        extra["ours_saved_bytes"] = saved_activation_bytes(ours_fwd, exclude=inputs)
        extra["peer_saved_bytes"] = saved_activation_bytes(peer_fwd, exclude=inputs)

    return Case(
        name=name,
        ours=step(ours_fwd),
        peer=step(peer_fwd),
        peer_name=peer_name,
        extra=extra,
        setup=setup,
        teardown=t.clear,
    )


def _act_case(rows: int, n: int, approximate: str, device: torch.device) -> Case:
    return bias_act_case(
        f"bias_gelu fwd+bwd {rows}x{n} {approximate}",
        lambda x, b: bias_gelu(x, b, approximate=approximate),
        lambda x, b: F.gelu(x + b, approximate=approximate),
        "F.gelu(x + b)",
        (rows, n),
        (rows, n),
        device,
        bench_dtype(device),
    )


def _linear_case(rows: int, n: int, m: int, approximate: str, checkpoint: bool, device: torch.device) -> Case:
    dtype = bench_dtype(device)
    t: dict[str, torch.Tensor] = {}
    extra: dict = {"checkpoint": checkpoint}

    def ours_fwd():
        return bias_gelu_linear(t["x"], t["b"], t["w"], t["b2"], approximate=approximate, checkpoint=checkpoint)

    def peer_fwd():
        return F.linear(F.gelu(t["x"] + t["b"], approximate=approximate), t["w"], t["b2"])

    def step(fwd):
        def run():
            for k in ("x", "b", "w", "b2"):
                t[k].grad = None
            fwd().backward(t["dout"])

        return run

    def setup():
        t["x"] = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
        t["b"] = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
        t["w"] = (torch.randn(m, n, device=device, dtype=dtype) / n**0.5).requires_grad_()
        t["b2"] = torch.randn(m, device=device, dtype=dtype, requires_grad=True)
        t["dout"] = torch.randn(rows, m, device=device, dtype=dtype)
        inputs = (t["x"], t["b"], t["w"], t["b2"])
        extra["ours_saved_bytes"] = saved_activation_bytes(ours_fwd, exclude=inputs)
        extra["peer_saved_bytes"] = saved_activation_bytes(peer_fwd, exclude=inputs)

    return Case(
        name=f"bias_gelu_linear fwd+bwd {rows}x{n}->{m} {approximate} {'ckpt' if checkpoint else 'save'}",
        ours=step(ours_fwd),
        peer=step(peer_fwd),
        peer_name="F.linear(F.gelu(x + b), w, b2)",
        flops=3 * 2 * rows * n * m,
        extra=extra,
        setup=setup,
        teardown=t.clear,
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    if quick:
        return [
            _act_case(16, 64, "tanh", device),
            _linear_case(16, 64, 32, "tanh", False, device),
            _linear_case(16, 64, 32, "tanh", True, device),
        ]
    rows_list = (8 * 128, 8 * 512)  # BERT batch 8, seq 128 and 512
    acts = [_act_case(r, 3072, a, device) for r in rows_list for a in ("none", "tanh")]
    linears = [_linear_case(r, 3072, 768, "tanh", c, device) for r in rows_list for c in (False, True)]
    return acts + linears
