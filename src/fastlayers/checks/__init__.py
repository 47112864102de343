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
