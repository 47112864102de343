"""`python -m benchmarks.bench_layer_norm [options]`: the same as `fastlayers bench layer_norm [options]`."""

import sys

from fastlayers.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "layer_norm", *sys.argv[1:]]))
