"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 in each default config, with no spills."""

import ast
import functools
import pathlib

import pytest

pytest.importorskip("triton")

from fastlayers.kernels.triton.aot import compile_all, format_table  # noqa: E402

KDIR = pathlib.Path(__file__).resolve().parents[2] / "src" / "fastlayers" / "kernels" / "triton"


@functools.lru_cache(maxsize=1)
def _rows():
    return compile_all()


def _launched_kernels() -> set[str]:
    """Names of every `@triton.jit` function called `_*_kernel` in kernels/triton (helpers are inlined)."""
    names = set()
    for path in KDIR.glob("*.py"):
        if path.name.startswith("_") or path.name == "aot.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                decos = [ast.unparse(d) for d in node.decorator_list]
                if any("jit" in d for d in decos):
                    names.add(f"fastlayers.kernels.triton.{path.stem}.{node.name}")
    return names


@pytest.mark.aot
def test_every_kernel_compiles_for_sm80_sm90_without_spills():
    rows = _rows()
    assert rows, "no AOT specs found"
    table = format_table(rows)
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "kernels failed to compile:\n" + table
    spills = [r for r in rows if r["spill_store"] + r["spill_load"] > 0]
    assert not spills, "kernels spill registers:\n" + table
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}


@pytest.mark.aot
def test_every_launched_kernel_has_an_aot_spec():
    covered = {r["fn"] for r in _rows()}
    missing = _launched_kernels() - covered
    assert not missing, f"kernels without AOT_SPECS: {sorted(missing)}"
