"""Side-by-side benchmarks (ours vs the peer, in one run, interleaved, medians and ratios).

Each op has a module `fastlayers.bench.<op>` with `cases(quick: bool, device: torch.device) -> list[Case]`.
`fastlayers bench <op|all>` and `benchmarks/bench_<op>.py` run them through `harness.run`.
"""

BENCHES = {
    "layer_norm": "fastlayers.bench.layer_norm",
    "bias_gelu": "fastlayers.bench.bias_gelu",
    "bias_geglu": "fastlayers.bench.bias_geglu",
    "softmax": "fastlayers.bench.softmax",
    "attention": "fastlayers.bench.attention",
    "transformer": "fastlayers.bench.transformer",
    "sparse": "fastlayers.bench.sparse",
    "random_ltd": "fastlayers.bench.random_ltd",
    "diffusers": "fastlayers.bench.diffusers",
}
