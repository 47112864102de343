"""`fastlayers check transformer`: the training layer (pre-LN and post-LN, padding mask, dropout 0) forward and
backward on each backend against the float64 reference layer."""

from __future__ import annotations

import math

import torch

from fastlayers.checks import Check
from fastlayers.configs import TransformerConfig
from fastlayers.nn.transformer_layer import TransformerLayer
from fastlayers.reference.transformer_layer import transformer_layer_ref

# (B, S, H, heads, I): an odd S, head dims 16 and 64
SHAPES = [(2, 21, 64, 4, 256), (2, 37, 128, 2, 192)]


def _check(device: torch.device, pre: bool, B: int, S: int, H: int, heads: int, I: int) -> Check:
    g = torch.Generator().manual_seed(0)
    cfg = TransformerConfig(hidden_size=H, heads=heads, intermediate_size=I, attn_dropout_ratio=0.0,
                            hidden_dropout_ratio=0.0, num_hidden_layers=2, initializer_range=0.02,
                            pre_layer_norm=pre)  # fmt: skip
    params = {}
    for name, p in TransformerLayer(cfg, device="meta").named_parameters():
        if p.dim() == 1:
            base = 1.0 if name in ("attn_nw", "norm_w") else 0.0
            params[name] = base + 0.1 * torch.randn(p.shape, generator=g)
        else:
            params[name] = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
    x = torch.randn(B, S, H, generator=g)
    dy = torch.randn(B, S, H, generator=g)
    keep = torch.ones(B, S)
    keep[-1, S // 2 :] = 0  # padded keys in the last sequence
    additive = ((1.0 - keep) * -10000.0)[:, None, None, :]

    def run(backend: str) -> dict[str, torch.Tensor]:
        layer = TransformerLayer(cfg, device=device, backend=backend)
        with torch.no_grad():
            for name, p in layer.named_parameters():
                p.copy_(params[name])
        xi = x.to(device).detach().clone().requires_grad_()  # a fresh leaf per run: grads do not accumulate
        out = layer(xi, keep.to(device))
        out.backward(dy.to(device))
        res = {"out": out.detach(), "dx": xi.grad}
        res.update({f"d{n}": p.grad for n, p in layer.named_parameters()})
        return res

    def reference() -> dict[str, torch.Tensor]:
        p64 = {n: t.to(device, torch.float64).requires_grad_() for n, t in params.items()}
        x64 = x.to(device, torch.float64).requires_grad_()
        out = transformer_layer_ref(x64, p64, heads=heads, attention_mask=additive.to(device, torch.float64),
                                    pre_layer_norm=pre, eps=cfg.layer_norm_eps)  # fmt: skip
        out.backward(dy.to(device, torch.float64))
        res = {"out": out.detach(), "dx": x64.grad}
        res.update({f"d{n}": t.grad for n, t in p64.items()})
        return res

    name = f"{'pre' if pre else 'post'}LN B{B} S{S} H{H} h{heads}"
    return Check(name=name, run=run, reference=reference, dtype=torch.float32, atol=2e-4, rtol=1e-4)


def checks(device: torch.device) -> list[Check]:
    return [_check(device, pre, *shape) for shape in SHAPES for pre in (True, False)]
