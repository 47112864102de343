"""`python -m benchmarks.bench_softmax [options]`: the same as `fastlayers bench softmax [options]`."""

import sys

from fastlayers.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "softmax", *sys.argv[1:]]))
