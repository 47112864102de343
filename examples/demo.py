"""`make demo`: what fastlayers is, in one run on this machine.

1. `fastlayers info`      versions, devices, backends
2. `fastlayers check`     every op on this device against its reference
3. `fastlayers kernels`   every Triton kernel compiled for sm_80 / sm_90 (registers, spills, smem)
4. `fastlayers bench all --quick`   ours vs the peer, side by side (small shapes)
5. a HF BERT patched with `patch_bert`: outputs match, then a few training steps
6. long-sequence block-sparse attention
"""

import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def step(title: str, argv: list[str]) -> None:
    print(f"\n### {title}\n$ {' '.join(argv)}", flush=True)
    subprocess.run(argv, check=True)


def main() -> None:
    fl = [sys.executable, "-m", "fastlayers.cli"]
    step("fastlayers info", fl + ["info"])
    step("fastlayers check (CPU: torch backend vs reference)", fl + ["check"])
    step("fastlayers kernels (ahead-of-time compile, no GPU needed)", fl + ["kernels"])
    step("fastlayers bench all --quick", fl + ["bench", "all", "--quick", "--rounds", "1", "--reps", "2"])
    step(
        "HF BERT patched with fastlayers.integrations.hf.patch_bert", [sys.executable, str(HERE / "bert_patch_demo.py")]
    )
    step("long-sequence block-sparse attention", [sys.executable, str(HERE / "sparse_long_sequence.py")])
    print("\ndemo finished")


if __name__ == "__main__":
    main()
