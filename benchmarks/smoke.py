"""Smoke run of every benchmark (quick shapes, one round): keeps the scripts from rotting.

Times printed here are not results; the figures in README come from the full runs named there.
"""

import importlib
import sys

import torch

from fastlayers.bench import BENCHES, harness


def main() -> int:
    device = torch.device("cpu")
    failed = []
    for name, modname in BENCHES.items():
        try:
            cases = importlib.import_module(modname).cases(quick=True, device=device)
            records = harness.run(cases, rounds=1, reps=1, warmup=0, progress=False)
        except Exception as e:  # report every broken benchmark, then fail
            failed.append(f"{name}: {type(e).__name__}: {e}")
            continue
        print(f"== {name} (smoke, {len(records)} cases)")
        print(harness.format_table(records))
    if failed:
        print("benchmark smoke failures:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    print(f"benchmark smoke: {len(BENCHES)} benchmarks ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
