"""`python -m benchmarks.bench_bias_geglu [options]`: the same as `fastlayers bench bias_geglu [options]`."""

import sys

from fastlayers.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "bias_geglu", *sys.argv[1:]]))
