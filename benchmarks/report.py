"""Turn `fastlayers bench <op> --json` output into the Markdown table rows used in README.

Usage: `python -m benchmarks.report bench_out/transformer.json [more.json ...] [--cols saved_ratio,gemm_share]`
"""

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--cols", default="", help="comma-separated extra fields to add as columns")
    args = ap.parse_args()
    cols = [c for c in args.cols.split(",") if c]
    print("| case | ours ms | peer ms | ours/peer | peer | " + " | ".join(cols) + (" |" if cols else ""))
    print("|---|---|---|---|---|" + "---|" * len(cols))
    for path in args.files:
        with open(path) as f:
            for r in json.load(f):
                times = [f"{r['ours_ms']:.1f}", f"{r['peer_ms']:.1f}", f"{r['ratio']:.2f}"]
                cells = [r["name"], *times, r["peer"], *(str(r.get(c, "")) for c in cols)]
                print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
