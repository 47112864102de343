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

Model case: one training step (forward + backward, no optimizer) of a transformers GPT-2 built from a config
(random weights; 6 layers, width 256, 4 heads, vocab 512, dropout 0 so that both sides run SDPA's fused CPU kernel;
B=2, S=1024) converted with `convert_to_random_ltd` (layers 1-4 keep R=512 tokens, layers 0 and 5 the full
sequence) vs the same model unconverted. `work_limit` is the speedup if time were proportional to the matmul FLOPs
(per layer and sequence of n tokens 24·n·w² + 4·n²·w, plus the LM head 2·S·w·V): `_gpt2_flops`.
"""

from __future__ import annotations

import copy

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


def _gpt2_flops(tokens: list[int], s: int, width: int, vocab: int) -> float:
    """Forward matmul FLOPs of one sequence: layers seeing `tokens[i]` tokens (projections, MLP, attention), LM head."""
    return sum(24 * n * width**2 + 4 * n * n * width for n in tokens) + 2 * s * width * vocab


def _gpt2_case(b: int, s: int, r: int, width: int, n_layer: int, device: torch.device) -> Case:
    """A GPT-2 training step with Random-LTD on the middle layers vs the same model without it."""
    t: dict = {}
    ids = list(range(1, n_layer - 1))
    full = _gpt2_flops([s] * n_layer, s, width, 512)
    kept = _gpt2_flops([r if i in ids else s for i in range(n_layer)], s, width, 512)
    extra: dict = {"work_limit": round(full / kept, 3)}

    def setup():
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        from fastlayers.integrations.random_ltd import convert_to_random_ltd

        cfg = GPT2Config(
            vocab_size=512, n_positions=s, n_embd=width, n_layer=n_layer, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0
        )
        cfg.attn_pdrop = 0.0
        cfg.bos_token_id = cfg.eos_token_id = 0
        torch.manual_seed(0)
        t["peer"] = GPT2LMHeadModel(cfg).to(device).train()
        t["ours"] = copy.deepcopy(t["peer"])
        ltd = {
            "total_layer_num": n_layer,
            "random_ltd_layer_num": len(ids),
            "random_ltd_layer_id": ids,
            "model_mask_name": "attention_mask",
            "model_type": "decoder",
            "hidden_state_order": "batch_seq_dim",
            "random_ltd_schedule": {
                "min_value": r,
                "max_value": s,
                "schedule_type": "fixed_linear",
                "schedule_config": {"require_steps": 1000, "seq_per_step": 16},
            },
            "global_batch_size": b,
        }
        convert_to_random_ltd(t["ours"], GPT2Block, config=ltd)
        t["tokens"] = torch.randint(0, 512, (b, s), device=device)

    def step(name):
        def run():
            model = t[name]
            model.zero_grad(set_to_none=True)
            model(input_ids=t["tokens"], labels=t["tokens"]).loss.backward()

        return run

    return Case(
        name=f"GPT-2 train step, Random-LTD layers 1-{n_layer - 2} at R{r} of S{s}, B{b} width{width} fp32",
        ours=step("ours"),
        peer=step("peer"),
        peer_name="transformers GPT2LMHeadModel (no token dropping)",
        extra=extra,
        setup=setup,
        teardown=t.clear,
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    b, s, r, c = (2, 16, 8, 24) if quick else (8, 2048, 1024, 1024)
    out = [_case(b, s, r, c, device, mode) for mode in ("gather", "gather_sbc", "ltd")]
    out.append(_gpt2_case(*((2, 32, 16, 32, 4) if quick else (2, 1024, 512, 256, 6)), device))
    return out
