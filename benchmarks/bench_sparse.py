"""`python -m benchmarks.bench_sparse [options]`: the same as `fastlayers bench sparse [options]`."""

import sys

from fastlayers.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "sparse", *sys.argv[1:]]))
