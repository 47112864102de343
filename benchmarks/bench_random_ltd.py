"""`python -m benchmarks.bench_random_ltd [options]`: the same as `fastlayers bench random_ltd [options]`."""

import sys

from fastlayers.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "random_ltd", *sys.argv[1:]]))
