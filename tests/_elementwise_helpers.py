"""Helpers shared by the tests of the bias + activation ops (bias_gelu, bias_geglu): autograd leaves and grads,
the float64 reference, and checks that are the same for both ops."""

import pytest
import torch

from tests.tolerances import assert_close

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
DTYPES = [torch.float32, torch.float16]


def each_backend_dtype(test):
    """Parametrize a test over BACKENDS and DTYPES (ids fp32, fp16): the two stacked parametrize marks
    `backend` (outer) and `dtype`, as if written above the test's other parametrize marks."""
    test = pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])(test)
    return pytest.mark.parametrize("backend", BACKENDS)(test)


def leaves(*ts):
    """Detached copies of ts that require grad (None stays None)."""
    return [None if t is None else t.detach().requires_grad_() for t in ts]


def grads(out, inputs, dout):
    """d out / d inputs given the upstream gradient dout, None where an input is None."""
    present = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(out, present, dout))
    return [None if t is None else next(got) for t in inputs]


def ref_grads(ref, x, bias, dy):
    """float64 `ref(x, bias)` and its grads (dx, dbias) on the same inputs."""
    xr, br = leaves(x.double(), None if bias is None else bias.double())
    yr = ref(xr, br)
    return yr, *grads(yr, [xr, br], dy.double())


def backend_of(out, grad_fns: dict[str, str]) -> str:
    """The backend whose autograd Function made out (`grad_fns`: backend -> grad_fn class name), else reference."""
    name = type(out.grad_fn).__name__
    for backend, fn_name in grad_fns.items():
        if name == fn_name:
            return backend
    return "reference"


def check_strided(op, ref, x):
    """op(x, bias) on a non-contiguous fp32 x, a stride-2 bias and an expanded (stride-0) upstream gradient,
    against the float64 reference `ref(x, bias)`: output, dx and dbias."""
    x = x.detach().requires_grad_()
    bias = torch.randn(2 * x.shape[-1])[::2].detach().requires_grad_()  # stride-2 bias
    y = op(x, bias)
    y.sum().backward()  # the upstream gradient is an expanded (stride-0) tensor
    xr, br = leaves(x.double(), bias.double())
    ref(xr, br).sum().backward()
    assert_close(y, ref(x.double(), bias.double()), torch.float32, name="y")
    assert_close(x.grad, xr.grad, torch.float32, "bwd", name="dx")
    assert_close(bias.grad, br.grad, torch.float32, "bwd", name="dbias")


def check_launchers(fwd, bwd, x, bias, dy, mode, reference):
    """The Triton launchers `fwd(x, bias, mode)` / `bwd(dy, x, bias, mode, need_dbias=...)` in fp32 against
    `reference` = (y, dx, dbias): the per-program fp32 dbias partials must sum to the full dbias, and
    need_dbias=False gives no dbias and the same dx."""
    yr, dxr, dbr = reference
    assert_close(fwd(x, bias, mode), yr, torch.float32, name="y")
    dx, dbias = bwd(dy, x, bias, mode)
    assert_close(dx, dxr, torch.float32, "bwd", name="dx")
    assert_close(dbias, dbr, torch.float32, "bwd", name="dbias")
    dx2, none = bwd(dy, x, bias, mode, need_dbias=False)
    assert none is None
    assert torch.equal(dx2, dx)
