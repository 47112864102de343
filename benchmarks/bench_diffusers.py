"""`python -m benchmarks.bench_diffusers [options]`: the same as `fastlayers bench diffusers [options]`."""

import sys

from fastlayers.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "diffusers", *sys.argv[1:]]))
