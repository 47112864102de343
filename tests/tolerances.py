"""One tolerance table for the whole suite, keyed by (dtype, "fwd" | "bwd"), and the assert helpers."""

import torch

TOL = {
    (torch.float64, "fwd"): (1e-10, 1e-8),
    (torch.float64, "bwd"): (1e-8, 1e-6),
    (torch.float32, "fwd"): (3e-4, 2e-5),
    (torch.float32, "bwd"): (9e-4, 1e-4),
    (torch.float16, "fwd"): (4e-3, 4e-4),
    (torch.float16, "bwd"): (2e-2, 2e-2),
    (torch.bfloat16, "fwd"): (2e-2, 5e-3),
    (torch.bfloat16, "bwd"): (1e-1, 5e-2),
}


def tol(dtype: torch.dtype, kind: str = "fwd") -> tuple[float, float]:
    return TOL[(dtype, kind)]


def _stats(out: torch.Tensor, ref: torch.Tensor) -> str:
    d = (out.double() - ref.double()).abs()
    return (
        f"max|err|={d.max().item():.3e} mean|err|={d.mean().item():.3e} "
        f"max|ref|={ref.double().abs().max().item():.3e} shape={tuple(out.shape)}"
    )


def assert_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype | None = None,
    kind: str = "fwd",
    atol: float | None = None,
    rtol: float | None = None,
    name: str = "",
) -> None:
    """Elementwise closeness with the table's tolerances; prints max/mean errors on failure."""
    a, r = tol(dtype or out.dtype, kind)
    atol = a if atol is None else atol
    rtol = r if rtol is None else rtol
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in output"
    ok = torch.allclose(out.double(), ref.double(), atol=atol, rtol=rtol)
    assert ok, f"{name}: not close (atol={atol}, rtol={rtol}): {_stats(out, ref)}"


def assert_close_to_reference(
    out: torch.Tensor,
    ref_fp32: torch.Tensor,
    ref_lowprec: torch.Tensor,
    atol: float = 1e-5,
    factor: float = 2.0,
    name: str = "",
) -> None:
    """flash-attn's relative rule: max|out - ref32| <= factor * max|ref_low - ref32| + atol."""
    assert torch.isfinite(out).all(), f"{name}: non-finite values in output"
    err = (out.double() - ref_fp32.double()).abs().max().item()
    base = (ref_lowprec.double() - ref_fp32.double()).abs().max().item()
    assert err <= factor * base + atol, (
        f"{name}: max|out-ref32|={err:.3e} > {factor}*max|ref_low-ref32| ({base:.3e}) + {atol:.1e}"
    )


def assert_fwd_bwd_close(out, ref, inputs, dtype: torch.dtype, names=("dq", "dk", "dv", "drpe")):
    """out matches ref (fwd tolerance), and so do the gradients of `inputs` for one random upstream gradient (bwd
    tolerance); returns our gradients."""
    assert_close(out, ref, dtype, name="out")
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, dout)
    want = torch.autograd.grad(ref, inputs, dout)
    for n, g, w in zip(names[: len(got)], got, want, strict=True):
        assert_close(g, w, dtype, "bwd", name=n)
    return got
