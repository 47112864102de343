"""`fastlayers check layer_norm`: bias_dropout_residual_layer_norm (invertible off/on, with and without dropout)
and layer_norm, forward and backward of each backend against the float64 reference on the same inputs.

Dropout masks differ between backends, so a dropout check runs the reference inside `run(backend)` with the
mask that backend returned and reports the error in units of the tolerance, |out - ref| / (atol + rtol·|ref|),
against zeros with atol 1: the same pass/fail as allclose(out, ref, atol, rtol).
"""

from __future__ import annotations

import torch

from fastlayers.checks import Check
from fastlayers.functional.layer_norm import bias_dropout_residual_layer_norm, layer_norm
from fastlayers.reference.norm import bias_dropout_residual_layer_norm_ref, layer_norm_ref
from fastlayers.utils import dtype_name

# (atol, rtol) per dtype, the backward tolerances of tests/tolerances.py (outputs and grads share one check)
TOLS = {torch.float32: (9e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}
ROWS, N = 64, 768  # BERT-base hidden, few enough rows for the Triton interpreter
P, SEED = 0.1, 1234
NAMES = ("x", "bias", "residual", "weight", "ln_bias")


def _inputs(device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {
        "x": torch.randn(ROWS, N, generator=g),
        "bias": torch.randn(N, generator=g),
        "residual": torch.randn(ROWS, N, generator=g) * 2,
        "weight": torch.rand(N, generator=g) + 0.5,  # away from 0: the invertible backward divides by it
        "ln_bias": torch.randn(N, generator=g),
        "dy": torch.randn(ROWS, N, generator=g),
        "dpre": torch.randn(ROWS, N, generator=g),
    }
    return {k: v.to(device=device, dtype=dtype) for k, v in t.items()}


def _run(fn, t: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """fn(*leaves) -> (y, pre[, mask]); forward, backward with dy and dpre; outputs and the five grads."""
    cast = (lambda v: v) if dtype is None else (lambda v: v.to(dtype))
    leaves = [cast(t[k]).detach().requires_grad_() for k in NAMES]
    y, pre, *_ = fn(*leaves)
    grads = torch.autograd.grad((y, pre), leaves, (cast(t["dy"]), cast(t["dpre"])))
    return {"y": y.detach(), "pre": pre.detach(), **{f"d{k}": g for k, g in zip(NAMES, grads, strict=True)}}


def _fused_check(device, dtype, invertible) -> Check:
    t = _inputs(device, dtype)

    def run(backend):
        return _run(
            lambda *a: bias_dropout_residual_layer_norm(
                *a, eps=1e-5, invertible=invertible, return_residual_out=True, backend=backend
            ),
            t,
        )

    def reference():
        return _run(
            lambda *a: bias_dropout_residual_layer_norm_ref(*a, eps=1e-5, return_residual_out=True), t, torch.float64
        )

    atol, rtol = TOLS[dtype]
    name = f"fused {'invertible' if invertible else 'saved-input'} {dtype_name(dtype)}"
    return Check(name, run, reference, dtype, atol, rtol)


def _dropout_check(device, dtype, invertible) -> Check:
    t = _inputs(device, dtype)
    atol, rtol = TOLS[dtype]

    def run(backend):
        masks = []

        def ours(*a):
            y, pre, mask = bias_dropout_residual_layer_norm(
                *a,
                eps=1e-5,
                dropout_p=P,
                seed=SEED,
                invertible=invertible,
                return_residual_out=True,
                return_mask=True,
                backend=backend,
            )
            masks.append(mask)
            return y, pre

        out = _run(ours, t)
        ref = _run(
            lambda *a: bias_dropout_residual_layer_norm_ref(
                *a, eps=1e-5, dropout_p=P, keep_mask=masks[0], return_residual_out=True
            ),
            t,
            torch.float64,
        )
        kept = masks[0].float().mean().item()
        if abs(kept - (1 - P)) > 0.02:
            raise AssertionError(f"kept fraction {kept:.4f}, expected {1 - P} ± 0.02")
        return {k: (out[k].double() - ref[k]).abs() / (atol + rtol * ref[k].abs()) for k in ref}

    def reference():
        shapes = {"y": (ROWS, N), "pre": (ROWS, N), "dx": (ROWS, N), "dresidual": (ROWS, N)}
        return {
            k: torch.zeros(shapes.get(k, (N,)), dtype=torch.float64, device=device)
            for k in ("y", "pre") + tuple(f"d{k}" for k in NAMES)
        }

    name = f"fused dropout p={P} {'invertible' if invertible else 'saved-input'} {dtype_name(dtype)} (err/tol)"
    return Check(name, run, reference, dtype, 1.0, 0.0)


def _layer_norm_check(device, dtype) -> Check:
    t = _inputs(device, dtype)

    def _ln_run(op, cast_to=None):
        cast = (lambda v: v) if cast_to is None else (lambda v: v.to(cast_to))
        x, w, b = (cast(t[k]).detach().requires_grad_() for k in ("x", "weight", "ln_bias"))
        y = op(x, w, b)
        dx, dw, db = torch.autograd.grad(y, (x, w, b), cast(t["dy"]))
        return {"y": y.detach(), "dx": dx, "dweight": dw, "dbias": db}

    def run(backend):
        return _ln_run(lambda x, w, b: layer_norm(x, w, b, backend=backend))

    def reference():
        return _ln_run(layer_norm_ref, torch.float64)

    atol, rtol = TOLS[dtype]
    return Check(f"layer_norm {dtype_name(dtype)}", run, reference, dtype, atol, rtol)


def checks(device: torch.device) -> list[Check]:
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    out = []
    for dtype in dtypes:
        out += [_fused_check(device, dtype, False), _fused_check(device, dtype, True)]
        out += [_dropout_check(device, dtype, False), _dropout_check(device, dtype, True)]
        out.append(_layer_norm_check(device, dtype))
    return out
