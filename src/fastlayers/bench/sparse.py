"""Block-sparse attention (torch path by default on CPU) vs dense F.scaled_dot_product_attention.

Layouts from `fastlayers.sparsity_config` at block 64: BigBird (1 random, 3 sliding, 1 global), Fixed (defaults),
LocalSlidingWindow (3 blocks, unidirectional). B=1, H=12, D=64, fp32; forward (no grad) and fwd+bwd.
`extra`: `density` (kept-block share), `work_limit` = 1/density (the speedup if time were proportional to the
kept blocks; the harness adds `speedup_vs_limit` = measured speedup / work_limit), and the saved-activation MiB
for fwd+bwd. FLOPs count the kept blocks only: 4·B·H·S²·D·density (fwd), ×3.5 for
fwd+bwd. The linear-growth case runs BigBird at S=32768 against ours at S=8192 (no dense peer: too slow);
its ours/peer ratio is the time growth for `length_ratio` = 4x the length (linear: near 4).

`FASTLAYERS_BENCH_SPARSE="LAYOUTS:SEQS"` (e.g. `bigbird:8192,32768` or `bigbird,window:4096`) runs only those
layouts and sequence lengths (32768 selects the BigBird growth case; the other lengths the dense comparisons).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fastlayers.bench.harness import Case
from fastlayers.functional.block_sparse import block_sparse_attention
from fastlayers.memory import saved_activation_bytes

B, H, D, BLOCK = 1, 12, 64, 64


def _layouts(block: int):
    from fastlayers.sparsity_config import (
        BigBirdSparsityConfig,
        FixedSparsityConfig,
        LocalSlidingWindowSparsityConfig,
    )

    return {
        "bigbird": BigBirdSparsityConfig(
            num_heads=H, block=block, num_random_blocks=1, num_sliding_window_blocks=3, num_global_blocks=1, seed=0
        ),
        "fixed": FixedSparsityConfig(num_heads=H, block=block),
        "window": LocalSlidingWindowSparsityConfig(num_heads=H, block=block, num_sliding_window_blocks=3),
    }


class _Inputs:
    """q, k, v, dout (and the layout) built in `setup` and dropped in `teardown`, so big cases do not pile up."""

    def __init__(self, s: int, config, device: torch.device):
        self.s, self.config, self.device = s, config, device
        self.t: dict[str, torch.Tensor] = {}

    def setup(self) -> None:
        g = torch.Generator().manual_seed(self.s)
        for name in ("q", "k", "v", "dout"):
            self.t[name] = torch.randn(B, H, self.s, D, generator=g).to(self.device)
        for name in ("q", "k", "v"):
            self.t[name].requires_grad_(True)
        self.t["layout"] = self.config.make_layout(self.s)

    def teardown(self) -> None:
        self.t.clear()


def _case(name: str, cfg, s: int, mode: str, device: torch.device, peer_inputs: _Inputs | None = None) -> Case:
    inp = _Inputs(s, cfg, device)
    density = float((cfg.make_layout(s) != 0).float().mean())

    def ours_fwd(x=inp):
        return block_sparse_attention(x.t["q"], x.t["k"], x.t["v"], x.t["layout"], block=cfg.block)

    def dense_fwd():
        return F.scaled_dot_product_attention(inp.t["q"], inp.t["k"], inp.t["v"])

    def call(fwd, x):
        if mode == "fwd":

            def run():
                with torch.no_grad():
                    fwd()

        else:

            def run():
                for t in ("q", "k", "v"):
                    x.t[t].grad = None
                fwd().backward(x.t["dout"])

        return run

    extra: dict = {"density": round(density, 4)}
    if peer_inputs is None:
        peer, peer_name = call(dense_fwd, inp), "F.scaled_dot_product_attention (dense)"
        extra["work_limit"] = round(1 / density, 2)  # the harness adds speedup_vs_limit
    else:  # growth case: ours/peer is the time growth for s / peer_inputs.s times the length
        peer = call(lambda: ours_fwd(peer_inputs), peer_inputs)
        peer_name = f"ours, same layout at S={peer_inputs.s}"
        extra["length_ratio"] = round(s / peer_inputs.s, 2)

    def setup():
        inp.setup()
        if peer_inputs is not None:
            peer_inputs.setup()
        if mode == "fwd+bwd":
            extra["ours_saved_MiB"] = round(saved_activation_bytes(ours_fwd, exclude=(*inp.t.values(),)) / 2**20, 1)
            if peer_inputs is None:
                extra["peer_saved_MiB"] = round(
                    saved_activation_bytes(dense_fwd, exclude=(*inp.t.values(),)) / 2**20, 1
                )

    def teardown():
        inp.teardown()
        if peer_inputs is not None:
            peer_inputs.teardown()

    flops = 4 * B * H * s * s * D * density * (1.0 if mode == "fwd" else 3.5)
    return Case(
        name=f"block_sparse {name} {mode} S{s}",
        ours=call(ours_fwd, inp),
        peer=peer,
        peer_name=peer_name,
        flops=flops,
        extra=extra,
        setup=setup,
        teardown=teardown,
    )


def cases(quick: bool, device: torch.device) -> list[Case]:
    if quick:
        layouts = _layouts(16)
        return [_case(n, layouts[n], 256, m, device) for n in ("bigbird", "window") for m in ("fwd", "fwd+bwd")]
    layouts = _layouts(BLOCK)
    names, seqs = list(layouts), [2048, 4096, 8192, 16384, 32768]
    spec = os.environ.get("FASTLAYERS_BENCH_SPARSE")
    if spec:
        want, _, lengths = spec.partition(":")
        names = [n.strip() for n in want.split(",") if n.strip()] or names
        unknown = [n for n in names if n not in layouts]
        if unknown:
            raise ValueError(f"FASTLAYERS_BENCH_SPARSE: unknown layouts {unknown}; known: {list(layouts)}")
        if lengths.strip():
            seqs = [int(x) for x in lengths.split(",")]
    out = [_case(n, layouts[n], s, m, device) for n in names for s in seqs if s != 32768 for m in ("fwd", "fwd+bwd")]
    if "bigbird" in names and 32768 in seqs:
        for m in ("fwd", "fwd+bwd"):
            out.append(
                _case("bigbird", layouts["bigbird"], 32768, m, device, _Inputs(8192, layouts["bigbird"], device))
            )
    return out
