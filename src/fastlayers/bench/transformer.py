"""Training layer benchmark: `TransformerLayer` (post-LN, BERT) forward+backward vs HF `BertLayer` (sdpa) and
vs `nn.TransformerEncoderLayer`, BERT-base (768 / 12 heads / 3072), batch 8, S 128 and 512, fp32, dropout 0.1.

Extra columns (measured in the case's setup, same run):
- `saved_mib` / `peer_saved_mib` / `saved_ratio`: activation bytes autograd keeps (parameters and input excluded,
  `fastlayers.saved_activation_bytes`); the all-flags case is the issue's <= 0.55x target; the flags-off case also
  reports the ratio with each memory flag alone (`ratio_<flag>`).
- `gemm_gflops`: this machine's fp32 GEMM rate, one (B·S, H) @ (H, I) matmul; `gemm_share`: the layer's FLOP rate
  (fwd+bwd FLOPs = 3 x forward GEMM FLOPs, timed in setup interleaved with the GEMM) as a share of it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from fastlayers.bench.harness import Case
from fastlayers.configs import TransformerConfig
from fastlayers.memory import saved_activation_bytes
from fastlayers.nn.transformer_layer import TransformerLayer

FLAGS = ("normalize_invertible", "gelu_checkpoint", "attn_dropout_checkpoint")
SHORT = {"normalize_invertible": "invertible", "gelu_checkpoint": "gelu_ckpt", "attn_dropout_checkpoint": "attn_ckpt"}
DROPOUT = 0.1


def flops_fwd_bwd(B: int, S: int, H: int, I: int) -> float:
    """Matmul FLOPs of one forward + backward: forward = 2·B·S·(4H² + 2HI) (qkv, out-proj, FFN) + 4·B·S²·H
    (scores and context); backward = 2x forward."""
    return 3.0 * (2.0 * B * S * (4 * H * H + 2 * H * I) + 4.0 * B * S * S * H)


def _ours(H: int, heads: int, I: int, **flags) -> TransformerLayer:
    cfg = TransformerConfig(hidden_size=H, heads=heads, intermediate_size=I, attn_dropout_ratio=DROPOUT,
                            hidden_dropout_ratio=DROPOUT, num_hidden_layers=12, initializer_range=0.02,
                            pre_layer_norm=False, **flags)  # fmt: skip
    return TransformerLayer(cfg)


def _hf_layer(H: int, heads: int, I: int) -> torch.nn.Module:
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    cfg = BertConfig(hidden_size=H, num_attention_heads=heads, intermediate_size=I, hidden_dropout_prob=DROPOUT,
                     attention_probs_dropout_prob=DROPOUT, attn_implementation="sdpa")  # fmt: skip
    return BertLayer(cfg)


def _tel_layer(H: int, heads: int, I: int) -> torch.nn.Module:
    return torch.nn.TransformerEncoderLayer(H, heads, I, dropout=DROPOUT, activation="gelu", batch_first=True,
                                            norm_first=False, layer_norm_eps=1e-12)  # fmt: skip


def _step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def fn():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = layer(x)
        out.backward(dy)

    return fn


def _median_ms(fn: Callable[[], object], reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _gemm_rate(
    B: int, S: int, H: int, I: int, device: torch.device, ours: Callable[[], None], flops: float, rounds: int
) -> tuple[float, float]:
    """(GEMM GFLOP/s, layer share of it). Each round times the GEMM just before and just after one layer step
    and takes the layer's rate over their mean (pairing cancels slow drifts of a shared machine); medians over
    rounds."""
    a = torch.randn(B * S, H, device=device)
    b = torch.randn(H, I, device=device)
    gemm = lambda: torch.mm(a, b)  # noqa: E731
    gemm_flops = 2.0 * B * S * H * I
    gemm()
    ours()  # warm-up (the harness's own warm-up comes after setup)
    rates, shares = [], []
    for _ in range(rounds):
        before = _median_ms(gemm, 3, device)
        layer_ms = _median_ms(ours, 1, device)
        after = _median_ms(gemm, 3, device)
        rate = gemm_flops / ((before + after) / 2) / 1e6
        rates.append(rate)
        shares.append(flops / layer_ms / 1e6 / rate)
    return statistics.median(rates), statistics.median(shares)


def _case(
    kind: str, B: int, S: int, H: int, heads: int, I: int, device: torch.device, all_flags: bool, quick: bool
) -> Case:
    flags = dict.fromkeys(FLAGS, True) if all_flags else {}
    state: dict = {}
    flops = flops_fwd_bwd(B, S, H, I)
    extra: dict = {}

    def setup():
        torch.manual_seed(0)
        ours = _ours(H, heads, I, **flags).to(device).train()
        peer = (_hf_layer if kind == "hf" else _tel_layer)(H, heads, I).to(device).train()
        x = torch.randn(B, S, H, device=device, requires_grad=True)
        dy = torch.randn(B, S, H, device=device)
        state.update(ours=_step(ours, x, dy), peer=_step(peer, x, dy))
        peer_bytes = saved_activation_bytes(lambda: peer(x), exclude=(x, peer))
        ours_bytes = saved_activation_bytes(lambda: ours(x), exclude=(x, ours))
        extra.update(saved_mib=round(ours_bytes / 2**20, 2), peer_saved_mib=round(peer_bytes / 2**20, 2),
                     saved_ratio=round(ours_bytes / peer_bytes, 3))  # fmt: skip
        if not all_flags and kind == "hf":
            for f in FLAGS:
                one = _ours(H, heads, I, **{f: True}).to(device).train()
                one_bytes = saved_activation_bytes(lambda one=one: one(x), exclude=(x, one))
                extra[f"ratio_{SHORT[f]}"] = round(one_bytes / peer_bytes, 3)
        if kind == "hf":
            gemm, share = _gemm_rate(B, S, H, I, device, state["ours"], flops, rounds=1 if quick else 5)
            extra.update(gemm_gflops=round(gemm, 1), gemm_share=round(share, 3))

    def teardown():
        state.clear()

    peer_name = "HF BertLayer (sdpa)" if kind == "hf" else "nn.TransformerEncoderLayer"
    name = f"transformer fwd+bwd B{B} S{S} H{H} {'all-flags' if all_flags else 'flags-off'} vs {kind}"
    case = Case(name=name, ours=lambda: state["ours"](), peer=lambda: state["peer"](), peer_name=peer_name,
                flops=flops, extra=extra, setup=setup, teardown=teardown)  # fmt: skip
    return case


def cases(quick: bool, device: torch.device) -> list[Case]:
    """BERT-base at S 128 and 512 (quick: a tiny layer) vs HF BertLayer (flags off and all memory flags) and vs
    nn.TransformerEncoderLayer (flags off)."""
    shapes = [(2, 32, 128, 4, 512)] if quick else [(8, 128, 768, 12, 3072), (8, 512, 768, 12, 3072)]
    out = []
    for B, S, H, heads, I in shapes:
        out.append(_case("hf", B, S, H, heads, I, device, all_flags=False, quick=quick))
        out.append(_case("hf", B, S, H, heads, I, device, all_flags=True, quick=quick))
    for B, S, H, heads, I in shapes:
        out.append(_case("tel", B, S, H, heads, I, device, all_flags=False, quick=quick))
    return out


__all__ = ["cases", "flops_fwd_bwd"]
