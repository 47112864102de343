"""Attention core fwd+bwd vs F.scaled_dot_product_attention: `python -m benchmarks.bench_attention [--quick]`."""

import argparse

import torch

from fastlayers.bench import attention, harness

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    records = harness.run(attention.cases(args.quick, device), device_type=device.type)
    print(harness.to_json(records) if args.json else harness.format_table(records))
