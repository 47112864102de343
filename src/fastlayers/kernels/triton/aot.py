"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU.

Each kernel module under `fastlayers.kernels.triton` lists its default launch configurations in a
module-level `AOT_SPECS` (a list of `AotSpec`). `compile_all()` compiles each one with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` and runs the `ptxas` that ships in
the triton wheel on the PTX with `-v` to read registers, spill bytes and shared memory.

`@triton.jit` becomes an interpreter object when TRITON_INTERPRET=1 is set at import, so when that
variable is set `compile_all()` runs itself in a subprocess with the variable removed.

Run: `python -m fastlayers.kernels.triton.aot [--json]` (the `fastlayers kernels` command calls it).
"""

import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

ARCHS = (80, 90)


@dataclass
class AotSpec:
    """One compile case: a kernel plus a full signature and constexpr values (a default config)."""

    name: str  # readable id, e.g. "layer_norm_fwd[fp16,BLOCK_N=1024]"
    kernel: Any  # the @triton.jit function
    signature: dict[str, str]  # arg -> "*fp32" | "*fp16" | "*bf16" | "*i8" | "i32" | "i64" | "fp32" | "constexpr"
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3


def _kernel_modules() -> list[str]:
    import fastlayers.kernels.triton as pkg

    return [
        f"{pkg.__name__}.{m.name}"
        for m in pkgutil.iter_modules(pkg.__path__)
        if not m.name.startswith("_") and m.name != "aot"
    ]


def collect_specs() -> list[AotSpec]:
    specs: list[AotSpec] = []
    for modname in _kernel_modules():
        mod = importlib.import_module(modname)
        found = getattr(mod, "AOT_SPECS", None)
        if found is None:
            continue
        specs.extend(found() if callable(found) else found)
    return specs


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_store": re.compile(r"(\d+) bytes spill stores"),
    "spill_load": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def _ptxas(cc: int) -> str:
    """The ptxas Triton itself uses for this arch (the wheel ships two: sm_90+ needs the newer one)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(cc).path


def _ptxas_info(ptx: str, cc: int) -> dict[str, int]:
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [_ptxas(cc), f"-arch={arch}", "-v", path, "-o", os.path.join(d, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    text = out.stdout + out.stderr
    info = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(text)
        info[key] = int(m.group(1)) if m else 0
    return info


def compile_spec(spec: AotSpec, cc: int) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(spec.kernel, "fn", spec.kernel)
    row: dict[str, Any] = {
        "kernel": spec.name,
        "fn": f"{fn.__module__}.{fn.__name__}",
        "arch": f"sm_{cc}",
        "num_warps": spec.num_warps,
    }
    try:
        src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        info = _ptxas_info(compiled.asm["ptx"], cc)
        row.update(ok=True, shared_bytes=int(compiled.metadata.shared), **info)
    except Exception as e:  # report, do not hide: the test fails on ok=False
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return row


def compile_all(archs=ARCHS) -> list[dict[str, Any]]:
    """Compile every AOT spec for every arch; one row per (kernel config, arch)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        out = subprocess.run(
            [sys.executable, "-m", "fastlayers.kernels.triton.aot", "--json", "--archs", ",".join(map(str, archs))],
            capture_output=True,
            text=True,
            env=env,
        )
        if out.returncode != 0:
            raise RuntimeError(f"AOT compile subprocess failed:\n{out.stderr[-4000:]}")
        return json.loads(out.stdout)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = []
    for spec in collect_specs():
        for cc in archs:
            rows.append(compile_spec(spec, cc))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'kernel':<58} {'arch':<6} {'warps':>5} {'regs':>5} {'spill':>6} {'smem':>7}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("ok"):
            spill = r["spill_store"] + r["spill_load"]
            status = "ok" if spill == 0 else "SPILLS"
            lines.append(
                f"{r['kernel']:<58} {r['arch']:<6} {r['num_warps']:>5} {r['regs']:>5} {spill:>6} "
                f"{r['shared_bytes']:>7}  {status}"
            )
        else:
            lines.append(
                f"{r['kernel']:<58} {r['arch']:<6} {r['num_warps']:>5} {'-':>5} {'-':>6} {'-':>7}  "
                f"FAILED {r.get('error', '')}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m fastlayers.kernels.triton.aot")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)))
    args = ap.parse_args(argv)
    rows = compile_all(tuple(int(a) for a in args.archs.split(",")))
    if args.json:
        print(json.dumps([dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r for r in rows]))
    else:
        print(format_table(rows))
    if args.json:
        return 0
    bad = [r for r in rows if not r.get("ok") or r["spill_store"] + r["spill_load"] > 0]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
