"""`python -m benchmarks.bench_transformer [options]`: the same as `fastlayers bench transformer [options]`."""

import sys

from fastlayers.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "transformer", *sys.argv[1:]]))
