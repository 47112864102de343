"""Bias + GELU (and GELU -> linear) fwd+bwd vs eager PyTorch.

Run: `python -m benchmarks.bench_bias_gelu [--quick] [--json]`.
"""

import argparse

import torch

from fastlayers.bench import bias_gelu, harness

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    records = harness.run(bias_gelu.cases(args.quick, device), progress=not args.json, device_type=device.type)
    print(harness.to_json(records) if args.json else harness.format_table(records))
