"""`python -m benchmarks.bench_bias_gelu [options]`: the same as `fastlayers bench bias_gelu [options]`."""

import sys

from fastlayers.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "bias_gelu", *sys.argv[1:]]))
