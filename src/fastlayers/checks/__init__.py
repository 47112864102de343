"""`fastlayers check`: run every op on the current device against the reference.

Each op has a module `fastlayers.checks.<op>` with `checks(device) -> list[Check]`. A Check runs the op
with one backend (forward and backward) and the reference on the same inputs; the harness runs it for
every backend that can run on the device and compares outputs and gradients.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

CHECKS = {
    "layer_norm": "fastlayers.checks.layer_norm",
    "bias_gelu": "fastlayers.checks.bias_gelu",
    "bias_geglu": "fastlayers.checks.bias_geglu",
    "softmax": "fastlayers.checks.softmax",
    "attention": "fastlayers.checks.attention",
    "transformer": "fastlayers.checks.transformer",
    "sparse": "fastlayers.checks.sparse",
    "random_ltd": "fastlayers.checks.random_ltd",
    "bias_add": "fastlayers.checks.bias_add",
}


@dataclass
class Check:
    """`run(backend)` returns named tensors (outputs, then grads); `reference()` returns the same names."""

    name: str
    run: Callable[[str], dict[str, torch.Tensor]]
    reference: Callable[[], dict[str, torch.Tensor]]
    dtype: torch.dtype
    atol: float
    rtol: float
    backends: tuple[str, ...] = ("torch", "triton")


# (atol, rtol) per dtype, the backward tolerances of tests/tolerances.py (outputs and grads share one check)
BWD_TOLS = {torch.float32: (9e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}


def run_fwd_bwd(fn, t: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """fn(**leaves) forward and backward, the leaves being every entry of t but "dout" (the upstream gradient),
    cast to `dtype` if given; returns the output ("out") and the grads of every leaf ("d<name>")."""
    leaves = {k: (v if dtype is None else v.to(dtype)).detach().requires_grad_() for k, v in t.items() if k != "dout"}
    out = fn(**leaves)
    dout = t["dout"] if dtype is None else t["dout"].to(dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    return {"out": out.detach(), **{f"d{k}": g for k, g in zip(leaves, grads, strict=True)}}


def fwd_bwd_check(name: str, fn, ref, t: dict[str, torch.Tensor], dtype: torch.dtype) -> Check:
    """A Check of `fn(backend, **leaves)` against the float64 `ref(**leaves)` on the inputs t (see run_fwd_bwd),
    with the BWD_TOLS of dtype."""

    def run(backend):
        return run_fwd_bwd(lambda **leaves: fn(backend, **leaves), t)

    def reference():
        return run_fwd_bwd(ref, t, torch.float64)

    atol, rtol = BWD_TOLS[dtype]
    return Check(name, run, reference, dtype, atol, rtol)


@dataclass
class Result:
    op: str
    check: str
    backend: str
    ok: bool
    max_err: float
    detail: str = ""


def _compare(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], atol: float, rtol: float):
    worst, bad = 0.0, []
    for k, r in ref.items():
        o = out[k]
        if not torch.isfinite(o).all():
            bad.append(f"{k}: non-finite")
            continue
        err = (o.double() - r.double()).abs()
        worst = max(worst, err.max().item() if err.numel() else 0.0)
        if not torch.allclose(o.double(), r.double(), atol=atol, rtol=rtol):
            bad.append(f"{k}: max|err|={err.max().item():.2e}")
    return worst, bad


def run_checks(device: torch.device, ops: list[str] | None = None) -> list[Result]:
    from fastlayers import backends

    results = []
    for op in ops or list(CHECKS):
        mod = importlib.import_module(CHECKS[op])
        for chk in mod.checks(device):
            ref = chk.reference()
            for b in chk.backends:
                if b not in backends.available_backends(device.type):
                    continue
                try:
                    out = chk.run(b)
                except NotImplementedError as e:  # backend refuses this dtype/shape: report, not a failure
                    results.append(Result(op, chk.name, b, True, 0.0, "skipped: " + str(e).splitlines()[0]))
                    continue
                except Exception as e:
                    results.append(Result(op, chk.name, b, False, float("nan"), f"{type(e).__name__}: {e}"))
                    continue
                worst, bad = _compare(out, ref, chk.atol, chk.rtol)
                results.append(Result(op, chk.name, b, not bad, worst, "; ".join(bad)))
    return results
