"""`python -m benchmarks.bench_transformer [--quick] [--json]`: the training layer vs HF BertLayer and
nn.TransformerEncoderLayer (same cases as `fastlayers bench transformer`)."""

import argparse

import torch

from fastlayers.bench import harness, transformer

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one round (smoke)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    records = harness.run(
        transformer.cases(quick=args.quick, device=device),
        rounds=1 if args.quick else 3,
        reps=1 if args.quick else 3,
        progress=not args.json,
        device_type=device.type,
    )
    print(harness.to_json(records) if args.json else harness.format_table(records))
