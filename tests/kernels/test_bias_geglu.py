"""Each bias_geglu backend (torch; triton under the interpreter) against the reference.

The reference runs in float64 on the same inputs; the forward output and the gradients of x and bias are
compared with the tolerance of the test dtype.
"""

import pytest
import torch

from fastlayers.functional.bias_geglu import bias_geglu
from fastlayers.reference.geglu import bias_geglu_ref
from tests.tolerances import assert_close

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
DTYPES = [torch.float32, torch.float16]
ACTS = ["gelu", "silu"]
# rows x C (x is rows x 2C): rows 1 / 7 / 509, C = 40 (not a multiple of 16) and 1232 (two 1024-wide
# column tiles in Triton, DeepSpeed's test width)
SHAPES = [(1, 40), (7, 40), (509, 40), (7, 1232)]


def _leaves(*ts):
    return [None if t is None else t.detach().requires_grad_() for t in ts]


def _grads(out, inputs, dout):
    present = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(out, present, dout))
    return [None if t is None else next(got) for t in inputs]


def _reference(x, bias, dy, activation):
    """float64 reference output and grads on the same inputs."""
    xr, br = _leaves(x.double(), None if bias is None else bias.double())
    yr = bias_geglu_ref(xr, br, activation=activation)
    return yr, *_grads(yr, [xr, br], dy.double())


def _check(backend, x, bias, dy, activation, dtype):
    x, bias = _leaves(x, bias)
    y = bias_geglu(x, bias, activation=activation, backend=backend)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], x.shape[-1] // 2)
    dx, dbias = _grads(y, [x, bias], dy)
    yr, dxr, dbr = _reference(x, bias, dy, activation)
    assert_close(y, yr, dtype, "fwd", name="y")
    assert_close(dx, dxr, dtype, "bwd", name="dx")
    assert dx.dtype == dtype
    if bias is not None:
        assert_close(dbias, dbr, dtype, "bwd", name="dbias")
        assert dbias.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"M{r}C{c}" for r, c in SHAPES])
def test_bias_geglu_matches_reference(backend, dtype, activation, shape):
    r, c = shape
    x = torch.randn(r, 2 * c, dtype=dtype) * 3  # reaches both activation tails
    bias = torch.randn(2 * c, dtype=dtype)
    dy = torch.randn(r, c, dtype=dtype)
    _check(backend, x, bias, dy, activation, dtype)


@pytest.mark.parametrize("activation", ACTS)
def test_torch_backend_large_odd_shape(activation):
    x = torch.randn(509, 2 * 1232) * 3
    bias = torch.randn(2 * 1232)
    dy = torch.randn(509, 1232)
    _check("torch", x, bias, dy, activation, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("activation", ACTS)
def test_bias_geglu_without_bias(backend, dtype, activation):
    x = torch.randn(7, 2 * 40, dtype=dtype) * 3
    dy = torch.randn(7, 40, dtype=dtype)
    _check(backend, x, None, dy, activation, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
def test_bias_geglu_3d(backend, activation, has_bias):
    x = torch.randn(2, 9, 2 * 48) * 3  # (b, s, 2C)
    bias = torch.randn(2 * 48) if has_bias else None
    dy = torch.randn(2, 9, 48)
    _check(backend, x, bias, dy, activation, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_bias_still_added_in_backward(backend):
    """bias without requires_grad: no dbias is computed, but x + bias is still where dx is taken."""
    x = (torch.randn(7, 2 * 40) * 3).requires_grad_()
    bias = torch.randn(2 * 40) * 3
    dy = torch.randn(7, 40)
    y = bias_geglu(x, bias, backend=backend)
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().double().requires_grad_()
    (dxr,) = torch.autograd.grad(bias_geglu_ref(xr, bias.double()), xr, dy.double())
    assert_close(dx, dxr, torch.float32, "bwd", name="dx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row_strided", "transposed"])
def test_bias_geglu_non_contiguous_input_and_grad(backend, layout):
    base = torch.randn(40, 90) * 3
    # row stride 90 with unit column stride (no copy needed), or a transposed view (column stride != 1)
    x = base[:, :66] if layout == "row_strided" else base[:34, :66].t()
    x = x.detach().requires_grad_()
    assert not x.is_contiguous()
    bias = torch.randn(2 * x.shape[-1])[::2].detach().requires_grad_()  # stride-2 bias
    y = bias_geglu(x, bias, backend=backend)
    y.sum().backward()  # the upstream gradient is an expanded (stride-0) tensor
    xr, br = _leaves(x.double(), bias.double())
    bias_geglu_ref(xr, br).sum().backward()
    assert_close(y, bias_geglu_ref(x.double(), bias.double()), torch.float32, name="y")
    assert_close(x.grad, xr.grad, torch.float32, "bwd", name="dx")
    assert_close(bias.grad, br.grad, torch.float32, "bwd", name="dbias")


@pytest.mark.interpreter
@pytest.mark.parametrize("activation", ACTS)
def test_triton_bwd_launcher_partial_dbias_over_many_row_programs(activation):
    """More rows than one program covers: the per-program fp32 partials must sum to the full dbias."""
    from fastlayers.kernels.triton.bias_geglu import bias_geglu_bwd, bias_geglu_fwd

    x = torch.randn(300, 2 * 24) * 3
    bias = torch.randn(2 * 24)
    dy = torch.randn(300, 24)
    yr, dxr, dbr = _reference(x, bias, dy, activation)
    assert_close(bias_geglu_fwd(x, bias, activation), yr, torch.float32, name="y")
    dx, dbias = bias_geglu_bwd(dy, x, bias, activation)
    assert_close(dx, dxr, torch.float32, "bwd", name="dx")
    assert_close(dbias, dbr, torch.float32, "bwd", name="dbias")
    dx2, none = bias_geglu_bwd(dy, x, bias, activation, need_dbias=False)
    assert none is None
    assert torch.equal(dx2, dx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_geglu_empty_rows(backend):
    x = torch.randn(0, 2 * 40, requires_grad=True)
    bias = torch.randn(2 * 40, requires_grad=True)
    y = bias_geglu(x, bias, backend=backend)
    assert y.shape == (0, 40)
    dx, dbias = torch.autograd.grad(y, (x, bias), torch.randn(0, 40))
    assert dx.shape == x.shape and torch.equal(dbias, torch.zeros_like(bias))


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_torch_backend_fp64_and_bf16(activation, dtype):
    x = torch.randn(7, 2 * 1232, dtype=dtype) * 3
    bias = torch.randn(2 * 1232, dtype=dtype)
    dy = torch.randn(7, 1232, dtype=dtype)
    _check("torch", x, bias, dy, activation, dtype)
