"""Each bias_gelu / bias_gelu_linear backend (torch; triton under the interpreter) against the reference.

The reference runs in float64 on the same inputs; forward outputs and all gradients are compared with the
tolerance of the test dtype. For the linear variant in fp16 (the matmul rounds in fp16), flash-attn's
relative rule is used against the fp16 reference computed with upcast=True.
"""

import pytest
import torch

from fastlayers.functional.bias_gelu import bias_gelu, bias_gelu_linear
from fastlayers.reference.activations import bias_gelu_linear_ref, bias_gelu_ref
from tests._elementwise_helpers import check_launchers, check_strided, each_backend_dtype, grads, leaves, ref_grads
from tests.tolerances import assert_close, assert_close_to_reference, tol

APPROX = ["none", "tanh"]
# rows x width: non-powers of two, rows 1 / 7 / 97; 1023 and 1500 span two 1024-wide column tiles in Triton
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
SHAPES = [(r, n) for r in (1, 7, 97) for n in (64, 1023, 1500)]


@each_backend_dtype
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"M{r}N{n}" for r, n in SHAPES])
def test_bias_gelu_matches_reference(backend, dtype, approximate, shape):
    r, n = shape
    x = torch.randn(r, n, dtype=dtype) * 3  # reaches both GELU tails
    bias = torch.randn(n, dtype=dtype)
    dy = torch.randn(r, n, dtype=dtype)
    x, bias = leaves(x, bias)
    y = bias_gelu(x, bias, approximate=approximate, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape
    dx, dbias = grads(y, [x, bias], dy)

    yr, dxr, dbr = ref_grads(lambda x, b: bias_gelu_ref(x, b, approximate=approximate), x, bias, dy)
    assert_close(y, yr, dtype, "fwd", name="y")
    assert_close(dx, dxr, dtype, "bwd", name="dx")
    assert_close(dbias, dbr, dtype, "bwd", name="dbias")
    assert dbias.dtype == dtype


@each_backend_dtype
@pytest.mark.parametrize("approximate", APPROX)
def test_bias_gelu_without_bias_3d(backend, dtype, approximate):
    x = (torch.randn(2, 7, 100, dtype=dtype) * 3).requires_grad_()
    dy = torch.randn(2, 7, 100, dtype=dtype)
    y = bias_gelu(x, None, approximate=approximate, backend=backend)
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().double().requires_grad_()
    yr = bias_gelu_ref(xr, None, approximate=approximate)
    (dxr,) = torch.autograd.grad(yr, xr, dy.double())
    assert_close(y, yr, dtype, "fwd", name="y")
    assert_close(dx, dxr, dtype, "bwd", name="dx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("linear", [False, True], ids=["act", "linear"])
def test_frozen_bias_still_added_in_backward(backend, linear):
    """bias without requires_grad: no dbias is computed, but x + bias is still what dx is taken at."""
    x = (torch.randn(7, 64) * 3).requires_grad_()
    bias = torch.randn(64) * 3
    w = torch.randn(16, 64)
    dy = torch.randn(7, 16 if linear else 64)
    xr = x.detach().double().requires_grad_()
    if linear:
        y = bias_gelu_linear(x, bias, w, approximate="tanh", checkpoint=True, backend=backend)
        yr = bias_gelu_linear_ref(xr, bias.double(), w.double(), approximate="tanh")
    else:
        y = bias_gelu(x, bias, approximate="tanh", backend=backend)
        yr = bias_gelu_ref(xr, bias.double(), approximate="tanh")
    (dx,) = torch.autograd.grad(y, x, dy)
    (dxr,) = torch.autograd.grad(yr, xr, dy.double())
    assert_close(dx, dxr, torch.float32, "bwd", name="dx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row_strided", "transposed"])
def test_bias_gelu_non_contiguous_input_and_grad(backend, layout):
    base = torch.randn(40, 80) * 3
    # row stride 80 with unit column stride (no copy needed), or a transposed view (column stride != 1)
    x = base[:, :33] if layout == "row_strided" else base[:33, :].t()
    check_strided(
        lambda x, b: bias_gelu(x, b, approximate="tanh", backend=backend),
        lambda x, b: bias_gelu_ref(x, b, approximate="tanh"),
        x,
    )


LINEAR_SHAPES = [(7, 64, 48), (37, 1023, 24)]  # (rows, N, M)


@each_backend_dtype
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("checkpoint", [False, True], ids=["save", "ckpt"])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=[f"M{r}N{n}O{m}" for r, n, m in LINEAR_SHAPES])
def test_bias_gelu_linear_matches_reference(backend, dtype, approximate, checkpoint, shape):
    r, n, m = shape
    x = torch.randn(r, n, dtype=dtype) * 2
    bias = torch.randn(n, dtype=dtype)
    w = torch.randn(m, n, dtype=dtype) / n**0.5
    ob = torch.randn(m, dtype=dtype)
    dout = torch.randn(r, m, dtype=dtype)
    inputs = leaves(x, bias, w, ob)
    out = bias_gelu_linear(*inputs, approximate=approximate, checkpoint=checkpoint, backend=backend)
    assert out.dtype == dtype and out.shape == (r, m)
    got = [out, *grads(out, inputs, dout)]

    def reference(dt, upcast):
        ins = leaves(*(t.to(dt) for t in inputs))
        o = bias_gelu_linear_ref(*ins, approximate=approximate, upcast=upcast)
        return [o, *grads(o, ins, dout.to(dt))]

    hi = reference(torch.float64, False)
    low = reference(dtype, True)
    for name, g, h, lo, kind in zip(
        ("out", "dx", "dbias", "dweight", "dout_bias"), got, hi, low, ("fwd", "bwd", "bwd", "bwd", "bwd"), strict=True
    ):
        assert g.dtype == dtype, name
        if dtype == torch.float32:
            assert_close(g, h, dtype, kind, name=name)
        else:  # fp16 matmuls round in fp16: stay within 2x the fp16 reference's own error
            assert_close_to_reference(g, h, lo, atol=tol(dtype, kind)[0], name=name)


@pytest.mark.interpreter
@pytest.mark.parametrize("approximate", APPROX)
def test_triton_bwd_launcher_partial_dbias_over_many_row_programs(approximate):
    """More rows than one program covers: the per-program fp32 partials must sum to the full dbias."""
    from fastlayers.kernels.triton.bias_gelu import bias_gelu_bwd, bias_gelu_fwd

    x = torch.randn(300, 48) * 3
    bias = torch.randn(48)
    dy = torch.randn(300, 48)
    reference = ref_grads(lambda x, b: bias_gelu_ref(x, b, approximate=approximate), x, bias, dy)
    check_launchers(bias_gelu_fwd, bias_gelu_bwd, x, bias, dy, approximate, reference)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_torch_backend_fp64_and_bf16(approximate, dtype):
    x = (torch.randn(7, 1023, dtype=dtype) * 3).requires_grad_()
    bias = torch.randn(1023, dtype=dtype, requires_grad=True)
    dy = torch.randn(7, 1023, dtype=dtype)
    y = bias_gelu(x, bias, approximate=approximate, backend="torch")
    dx, dbias = torch.autograd.grad(y, (x, bias), dy)
    yr, dxr, dbr = ref_grads(lambda x, b: bias_gelu_ref(x, b, approximate=approximate), x, bias, dy)
    assert_close(y, yr, dtype, name="y")
    assert_close(dx, dxr, dtype, "bwd", name="dx")
    assert_close(dbias, dbr, dtype, "bwd", name="dbias")
