"""Each bias_geglu backend (torch; triton under the interpreter) against the reference.

The reference runs in float64 on the same inputs; the forward output and the gradients of x and bias are
compared with the tolerance of the test dtype.
"""

import pytest
import torch

from fastlayers.functional.bias_geglu import bias_geglu
from fastlayers.reference.geglu import bias_geglu_ref
from tests._elementwise_helpers import check_launchers, check_strided, each_backend_dtype, grads, leaves, ref_grads
from tests.tolerances import assert_close

ACTS = ["gelu", "silu"]
# rows x C (x is rows x 2C): rows 1 / 7 / 509, C = 40 (not a multiple of 16) and 1232 (two 1024-wide
# column tiles in Triton, DeepSpeed's test width)
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
SHAPES = [(1, 40), (7, 40), (509, 40), (7, 1232)]


def _reference(x, bias, dy, activation):
    """float64 reference output and grads on the same inputs."""
    return ref_grads(lambda x, b: bias_geglu_ref(x, b, activation=activation), x, bias, dy)


def _check(backend, x, bias, dy, activation, dtype):
    x, bias = leaves(x, bias)
    y = bias_geglu(x, bias, activation=activation, backend=backend)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], x.shape[-1] // 2)
    dx, dbias = grads(y, [x, bias], dy)
    yr, dxr, dbr = _reference(x, bias, dy, activation)
    assert_close(y, yr, dtype, "fwd", name="y")
    assert_close(dx, dxr, dtype, "bwd", name="dx")
    assert dx.dtype == dtype
    if bias is not None:
        assert_close(dbias, dbr, dtype, "bwd", name="dbias")
        assert dbias.dtype == dtype


@each_backend_dtype
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


@each_backend_dtype
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
    assert not x.is_contiguous()
    check_strided(lambda x, b: bias_geglu(x, b, backend=backend), bias_geglu_ref, x)


@pytest.mark.interpreter
@pytest.mark.parametrize("activation", ACTS)
def test_triton_bwd_launcher_partial_dbias_over_many_row_programs(activation):
    """More rows than one program covers: the per-program fp32 partials must sum to the full dbias."""
    from fastlayers.kernels.triton.bias_geglu import bias_geglu_bwd, bias_geglu_fwd

    x = torch.randn(300, 2 * 24) * 3
    bias = torch.randn(2 * 24)
    dy = torch.randn(300, 24)
    reference = _reference(x, bias, dy, activation)
    check_launchers(bias_geglu_fwd, bias_geglu_bwd, x, bias, dy, activation, reference)


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
