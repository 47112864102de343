"""Block-sparse attention vs dense SDPA: `python -m benchmarks.bench_sparse [--quick] [--json] [--plot OUT.png]`."""

import argparse

import torch

from fastlayers.bench import harness, sparse

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--plot", default=None, metavar="OUT.png")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    records = harness.run(sparse.cases(args.quick, device), device_type=device.type, progress=not args.json)
    print(harness.to_json(records) if args.json else harness.format_table(records))
    if args.plot:
        harness.plot(records, args.plot)
