"""The `fastlayers` command: info, check, kernels, bench."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys

import torch


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_info(args) -> int:
    import fastlayers
    from fastlayers import backends
    from fastlayers.utils import is_triton_available, triton_interpret

    print(f"fastlayers {fastlayers.__version__}")
    print(f"python     {platform.python_version()} ({platform.machine()})")
    print(f"torch      {torch.__version__} (threads {torch.get_num_threads()})")
    if is_triton_available():
        import triton

        print(
            f"triton     {triton.__version__}"
            + ("  [TRITON_INTERPRET=1: interpreter on CPU]" if triton_interpret() else "")
        )
    else:
        print("triton     not installed")
    for mod in ("transformers", "diffusers", "deepspeed"):
        try:
            m = importlib.import_module(mod)
            print(f"{mod:<10} {m.__version__}")
        except Exception:
            print(f"{mod:<10} not installed")
    print("devices:")
    print("  cpu")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    else:
        print("  (no CUDA device)")
    print("backends by device:")
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(
            f"  {dev}: {', '.join(backends.available_backends(dev))} (priority {' -> '.join(backends.PRIORITY[dev])})"
        )
    print("ops:")
    for op in backends.registered_ops():
        print(f"  {op:<34} {', '.join(sorted(backends.impls(op)))}")
    return 0


def cmd_check(args) -> int:
    import fastlayers  # noqa: F401  (registers the ops)
    from fastlayers.checks import CHECKS, run_checks

    device = _device(args.device)
    ops = None if args.op in (None, "all") else [args.op]
    if ops and ops[0] not in CHECKS:
        print(f"unknown op {ops[0]!r}; choose from {sorted(CHECKS)}", file=sys.stderr)
        return 2
    results = run_checks(device, ops)
    width = max(len(f"{r.op}/{r.check}") for r in results) if results else 10
    n_bad = 0
    for r in results:
        status = "PASS" if r.ok else "FAIL"
        n_bad += not r.ok
        print(f"{status}  {r.op + '/' + r.check:<{width}}  {r.backend:<7} max|err|={r.max_err:.2e}  {r.detail}")
    print(f"{len(results) - n_bad} passed, {n_bad} failed")
    return 1 if n_bad else 0


def cmd_kernels(args) -> int:
    from fastlayers.utils import is_triton_available

    if not is_triton_available():
        print("triton is not installed: pip install 'fastlayers[triton]'", file=sys.stderr)
        return 2
    from fastlayers.kernels.triton.aot import compile_all, format_table

    archs = tuple(int(a) for a in args.archs.split(","))
    rows = compile_all(archs)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
    bad = [r for r in rows if not r["ok"] or r["spill_store"] + r["spill_load"] > 0]
    if not args.json:
        print(f"{len(rows)} kernel builds, {len(bad)} failed or spilling")
    return 1 if bad else 0


def cmd_bench(args) -> int:
    import fastlayers  # noqa: F401
    from fastlayers.bench import BENCHES, harness

    device = _device(args.device)
    names = list(BENCHES) if args.op == "all" else [args.op]
    for n in names:
        if n not in BENCHES:
            print(f"unknown benchmark {n!r}; choose from {sorted(BENCHES)} or all", file=sys.stderr)
            return 2
    records = []
    for n in names:
        mod = importlib.import_module(BENCHES[n])
        cases = [c for c in mod.cases(quick=args.quick, device=device) if args.filter in c.name]
        recs = harness.run(cases, rounds=args.rounds, reps=args.reps, progress=not args.json, device_type=device.type)
        records.extend(recs)
        if not args.json:
            print(f"\n== {n} ({device.type}, torch {torch.__version__}, {torch.get_num_threads()} threads)")
            print(harness.format_table(recs))
    if args.json:
        print(harness.to_json(records))
    if args.plot:
        harness.plot(records, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastlayers", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices, backends")
    p = sub.add_parser("check", help="run every op on this device against the reference")
    p.add_argument("op", nargs="?", default="all")
    p.add_argument("--device", default=None)
    p = sub.add_parser("kernels", help="compile every Triton kernel for sm_80/sm_90; registers, spills, smem")
    p.add_argument("--archs", default="80,90")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("bench", help="ours vs the peer, side by side, interleaved")
    p.add_argument("op", nargs="?", default="all")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, metavar="OUT.png")
    p.add_argument("--quick", action="store_true", help="small shapes, for smoke runs and the demo")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--filter", default="", metavar="TEXT", help="only the cases whose name contains TEXT")
    args = ap.parse_args(argv)
    return {"info": cmd_info, "check": cmd_check, "kernels": cmd_kernels, "bench": cmd_bench}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
