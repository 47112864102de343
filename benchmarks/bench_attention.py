"""`python -m benchmarks.bench_attention [options]`: the same as `fastlayers bench attention [options]`."""

import sys

from fastlayers.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "attention", *sys.argv[1:]]))
