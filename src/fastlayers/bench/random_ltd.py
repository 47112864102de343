"""Random-LTD token gather / scatter at GPT-2 / BERT-large shapes, training fwd+bwd: fastlayers vs plain PyTorch.

B = 8 sequences of S = 2048 tokens, R = 1024 kept (half), C = 1024 channels; fp32 on CPU, fp16 on CUDA.
- `token_gather(x, idx)` fwd+bwd vs `torch.gather(x, 1, idx[..., None].expand(B, R, C))` fwd+bwd, batch-first
  (B, S, C) and seq-first (S, B, C) (Megatron's order; the peer gathers along dim 0 with an (R, B, C) index).
- one Random-LTD layer round trip with an identity layer, `GatherTokens` -> `ScatterTokens` fwd+bwd, vs
  `torch.gather` then out-of-place `torch.scatter` (the autograd-exact plain-PyTorch version).
Memory-bound: `extra["MB_moved"]` is the minimum traffic of one fwd+bwd, in MB (1e6 bytes): gather reads and
writes B·R·C elements; its backward writes B·S·C (the zero fill included) and reads B·R·C.
`extra` also records the activation bytes autograd keeps (inputs excluded) for ours and the peer.
Inputs are built in `setup` and dropped in `teardown` so that only one case's tensors are alive at a time.
"""

from __future__ import annotations

import torch

from fastlayers.bench.harness import Case
from fastlayers.functional.random_ltd import GatherTokens, ScatterTokens, gpt_sample_tokens, token_gather
from fastlayers.memory import saved_activation_bytes
from fastlayers.utils import dtype_name


def _dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def _case(b: int, s: int, r: int, c: int, device: torch.device, mode: str) -> Case:
    """mode: "gather" (batch-first), "gather_sbc" (seq-first) or "ltd" (GatherTokens -> ScatterTokens)."""
    dtype = _dtype(device)
    batch_first = mode != "gather_sbc"
    t: dict[str, torch.Tensor] = {}
    extra: dict = {}
    dim = 1 if batch_first else 0  # the sequence dim of x

    def peer_index():
        idx = t["idx"].long()  # (B, R)
        return idx[:, :, None].expand(b, r, c) if batch_first else idx.t()[:, :, None].expand(r, b, c)

    def ours_fwd():
        if mode == "ltd":
            passthrough, part = GatherTokens.apply(t["x"], t["idx"], batch_first)
            return ScatterTokens.apply(passthrough, part, t["idx"], batch_first)
        return token_gather(t["x"], t["idx"], batch_first)

    def peer_fwd():
        part = torch.gather(t["x"], dim, t["index"])
        return torch.scatter(t["x"], dim, t["index"], part) if mode == "ltd" else part

    def step(fwd, dy):
        def run():
            t["x"].grad = None
            fwd().backward(t[dy])

        return run

    def setup():
        t["x"] = torch.randn((b, s, c) if batch_first else (s, b, c), device=device, dtype=dtype, requires_grad=True)
        t["idx"] = gpt_sample_tokens(r, s, b, device=device)[0][0]  # (B, R) int32, sorted
        t["index"] = peer_index()
        t["dpart"] = torch.randn((b, r, c) if batch_first else (r, b, c), device=device, dtype=dtype)
        t["dout"] = torch.randn_like(t["x"])
        elem = t["x"].element_size()
        moved = 2 * b * r * c + b * s * c + b * r * c  # gather fwd (read + write) + bwd (write all, read kept)
        if mode == "ltd":
            moved += 2 * b * s * c + 2 * b * r * c  # clone + scatter fwd, overwrite grad + gather it in bwd
        extra["MB_moved"] = round(moved * elem / 1e6, 1)
        extra["ours_saved_bytes"] = saved_activation_bytes(ours_fwd, exclude=(t["x"],))
        extra["peer_saved_bytes"] = saved_activation_bytes(peer_fwd, exclude=(t["x"],))

    dy = "dout" if mode == "ltd" else "dpart"
    layout = "(B,S,C)" if batch_first else "(S,B,C)"
    title = "GatherTokens->ScatterTokens" if mode == "ltd" else "token_gather"
    peer = "torch.gather + torch.scatter" if mode == "ltd" else "torch.gather(x, dim, idx.expand)"
    return Case(
        name=f"{title} fwd+bwd {layout} B{b} S{s} R{r} C{c} {dtype_name(dtype)}",
        ours=step(ours_fwd, dy),
        peer=step(peer_fwd, dy),
        peer_name=peer,
        extra=extra,
        setup=setup,
        teardown=t.clear,
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    b, s, r, c = (2, 16, 8, 24) if quick else (8, 2048, 1024, 1024)
    return [_case(b, s, r, c, device, mode) for mode in ("gather", "gather_sbc", "ltd")]
