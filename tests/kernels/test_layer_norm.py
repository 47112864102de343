"""Each bias_dropout_residual_layer_norm backend (torch; triton under the interpreter) against the reference.

The reference runs in float64 on the same inputs, with the backend's own keep mask (`return_mask=True`), and
forward outputs (y, pre) and all five gradients are compared with the tolerance of the test dtype.
Interpreter cases stay tiny (the interpreter costs milliseconds per program instance and per Philox draw).
"""

import pytest
import torch

from fastlayers.functional.layer_norm import bias_dropout_residual_layer_norm, layer_norm
from fastlayers.memory import saved_activation_bytes
from fastlayers.reference.norm import bias_dropout_residual_layer_norm_ref
from fastlayers.utils import keep_mask
from tests.tolerances import assert_close, tol

SHAPES = [(r, n) for r in (1, 7, 97) for n in (64, 1023, 1500)]
NAMES = ("x", "bias", "residual", "weight", "ln_bias")


def _inputs(shape, dtype, with_bias=True, with_residual=True):
    n = shape[-1]
    x = torch.randn(*shape, dtype=dtype).requires_grad_()
    bias = torch.randn(n, dtype=dtype).requires_grad_() if with_bias else None
    r = torch.randn(*shape, dtype=dtype).requires_grad_() if with_residual else None
    w = (torch.rand(n, dtype=dtype) + 0.5).requires_grad_()  # away from 0: the invertible path divides by w
    b = torch.randn(n, dtype=dtype).requires_grad_()
    return x, bias, r, w, b


def _grads(outs, inputs, douts):
    present = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(outs, present, douts))
    return [None if t is None else next(got) for t in inputs]


def _check_against_reference(
    backend, shape, dtype, *, p, invertible, with_bias=True, with_residual=True, return_pre=True
):
    inputs = _inputs(shape, dtype, with_bias, with_residual)
    kw = dict(eps=1e-5, dropout_p=p, seed=1234, invertible=invertible)
    outs = bias_dropout_residual_layer_norm(
        *inputs, **kw, return_residual_out=return_pre, return_mask=True, backend=backend
    )
    *outs, mask = outs
    assert mask.dtype == torch.bool and mask.shape == inputs[0].shape
    ref_in = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    ref = bias_dropout_residual_layer_norm_ref(
        *ref_in, eps=1e-5, dropout_p=p, keep_mask=mask, return_residual_out=return_pre
    )
    ref = list(ref) if return_pre else [ref]
    for name, o, r in zip(("y", "pre")[: len(outs)], outs, ref, strict=True):
        assert o.dtype == dtype
        assert_close(o, r, dtype, "fwd", name=name)
    douts = [torch.randn_like(o) for o in outs]
    got = _grads(outs, inputs, douts)
    want = _grads(ref, ref_in, [d.double() for d in douts])
    for name, g, r in zip(NAMES, got, want, strict=True):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == dtype
        # the (N,) grads sum over M rows of rounded terms: atol grows like sqrt(M)
        rows = inputs[0].numel() // shape[-1]
        atol = None if name in ("x", "residual") else tol(dtype, "bwd")[0] * max(1.0, rows / 8) ** 0.5
        assert_close(g, r, dtype, "bwd", atol=atol, name="d" + name)
    return mask


# ---------------------------------------------------------------- torch backend: every dtype, every shape


@pytest.mark.parametrize("invertible", [False, True], ids=["saved-input", "invertible"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}N{s[1]}")
def test_torch_matches_reference_fp32(shape, invertible):
    _check_against_reference("torch", shape, torch.float32, p=0.1, invertible=invertible)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("invertible", [False, True], ids=["saved-input", "invertible"])
def test_torch_matches_reference_other_dtypes(dtype, invertible):
    _check_against_reference("torch", (2, 97, 1023), dtype, p=0.2, invertible=invertible)


@pytest.mark.parametrize(
    "with_bias,with_residual,p",
    [(False, False, 0.0), (True, False, 0.3), (False, True, 0.0), (False, False, 0.3), (True, True, 0.0)],
)
@pytest.mark.parametrize("invertible", [False, True], ids=["saved-input", "invertible"])
def test_torch_feature_combinations(with_bias, with_residual, p, invertible):
    _check_against_reference(
        "torch", (3, 5, 64), torch.float32, p=p, invertible=invertible, with_bias=with_bias, with_residual=with_residual
    )


def test_torch_mask_is_utils_keep_mask_and_matches_reference_bitwise():
    x, bias, r, w, b = _inputs((4, 9, 64), torch.float32)
    y, mask = bias_dropout_residual_layer_norm(
        x, bias, r, w, b, dropout_p=0.4, seed=7, offset=3, return_mask=True, backend="torch"
    )
    assert torch.equal(mask, keep_mask((4, 9, 64), 0.4, 7, "cpu", 3))
    ref = bias_dropout_residual_layer_norm_ref(x, bias, r, w, b, dropout_p=0.4, seed=7, offset=3)
    assert_close(y, ref, name="y")


# ---------------------------------------------------------------- triton backend under the interpreter

TRITON_CASES = [
    # (shape, dtype, p, invertible, with_bias, with_residual)
    ((7, 1023), torch.float32, 0.2, False, True, True),
    ((7, 1023), torch.float32, 0.2, True, True, True),
    ((7, 1023), torch.float16, 0.2, False, True, True),
    ((7, 1023), torch.float16, 0.2, True, True, True),
    ((1, 64), torch.float32, 0.0, False, False, False),
    ((2, 16, 64), torch.float32, 0.0, True, True, False),
    ((97, 64), torch.float32, 0.0, False, True, True),
    ((7, 1500), torch.float32, 0.0, False, True, True),
]


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "shape,dtype,p,invertible,with_bias,with_residual",
    TRITON_CASES,
    ids=[
        f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}-p{c[2]}-{'inv' if c[3] else 'std'}-b{int(c[4])}r{int(c[5])}"
        for c in TRITON_CASES
    ],
)
def test_triton_matches_reference(shape, dtype, p, invertible, with_bias, with_residual):
    _check_against_reference(
        "triton", shape, dtype, p=p, invertible=invertible, with_bias=with_bias, with_residual=with_residual
    )


@pytest.mark.interpreter
def test_triton_without_pre_output_and_backward_through_pre_only():
    # return_residual_out=False and invertible: the kernel does not write pre at all
    _check_against_reference("triton", (5, 64), torch.float32, p=0.25, invertible=True, return_pre=False)
    # only pre is used downstream: dy is None in backward
    x, bias, r, w, b = _inputs((5, 64), torch.float32)
    _, pre = bias_dropout_residual_layer_norm(x, bias, r, w, b, return_residual_out=True, backend="triton")
    gx, gr = torch.autograd.grad(pre.sum(), (x, r))
    assert torch.equal(gx, torch.ones_like(x)) and torch.equal(gr, torch.ones_like(r))


@pytest.mark.interpreter
def test_triton_mask_regenerated_in_backward_matches_returned_mask():
    from fastlayers.kernels.triton import layer_norm as triton_ln

    x = torch.randn(6, 128)
    w, b = torch.rand(128) + 0.5, torch.randn(128)
    key = triton_ln.dropout_seed(99, 1)
    y, pre, mean, rstd, mask = triton_ln.layer_norm_fwd(x, None, None, w, b, 1e-5, 0.5, key, return_mask=True)
    assert torch.equal(pre, torch.where(mask, x * 2.0, 0.0))
    dx, dbias, dres, dw, db = triton_ln.layer_norm_bwd(
        torch.zeros_like(x),
        pre,
        w,
        b,
        mean,
        rstd,
        invertible=False,
        dpre_out=torch.ones_like(x),
        dropout_p=0.5,
        seed=key,
    )
    assert torch.equal(dx, mask.float() * 2.0)  # dpre = 1 everywhere, scaled by the regenerated mask
    assert dbias is None and dres is dx


# ---------------------------------------------------------------- invertible vs saved input

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_invertible_gives_the_same_grads(backend):
    inputs = _inputs((7, 200), torch.float32)
    grads = []
    for inv in (False, True):
        y, pre = bias_dropout_residual_layer_norm(
            *inputs, dropout_p=0.3, seed=5, invertible=inv, return_residual_out=True, backend=backend
        )
        torch.manual_seed(1)
        douts = [torch.randn_like(y), torch.randn_like(pre)]
        grads.append((y.detach(), _grads([y, pre], inputs, douts)))
    (y0, g0), (y1, g1) = grads
    assert torch.equal(y0, y1)
    for name, a, c in zip(NAMES, g0, g1, strict=True):
        assert_close(c, a, torch.float32, "bwd", name="d" + name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invertible_saves_fewer_bytes(backend):
    x, bias, r, w, b = _inputs((16, 128), torch.float32)
    next_w = torch.nn.Parameter(torch.randn(64, 128))

    def saved(inv, consumer):
        def fn():
            y = bias_dropout_residual_layer_norm(
                x, bias, r, w, b, dropout_p=0.1, seed=3, invertible=inv, backend=backend
            )
            return y @ next_w.t() if consumer else y  # the next Linear keeps y anyway

        return saved_activation_bytes(fn, exclude=(x, bias, r, w, b))

    pre_bytes = x.numel() * x.element_size()
    alone_std, alone_inv = saved(False, False), saved(True, False)
    assert alone_inv < alone_std  # mean is not saved
    with_next_std, with_next_inv = saved(False, True), saved(True, True)
    assert with_next_std - with_next_inv >= pre_bytes  # pre is not saved: y is shared with the next layer


@pytest.mark.parametrize("backend", ["torch"])
def test_torch_saves_a_one_byte_mask(backend):
    x, bias, r, w, b = _inputs((16, 128), torch.float32)
    m, n = x.shape
    nbytes = saved_activation_bytes(
        lambda: bias_dropout_residual_layer_norm(x, bias, r, w, b, dropout_p=0.1, seed=3, backend=backend),
        exclude=(x, bias, r, w, b),
    )
    assert nbytes == m * n * 4 + m * n * 1 + 2 * m * 4  # pre (fp32) + bool mask + mean + rstd


# ---------------------------------------------------------------- dropout statistics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_fraction(backend, p):
    x = torch.randn(48, 1024)  # 49k draws: 0.01 is > 4 standard deviations of the kept fraction
    w, b = torch.ones(1024), torch.zeros(1024)
    _, mask = bias_dropout_residual_layer_norm(
        x, None, None, w, b, dropout_p=p, seed=2024, return_mask=True, backend=backend
    )
    kept = mask.float().mean().item()
    assert abs(kept - (1 - p)) < 0.01, kept
    rows = mask.float().mean(1)  # every row is drawn, not just the first ones
    assert rows.min().item() > (1 - p) - 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds_and_offsets_change_the_mask_and_training_false_disables_it(backend):
    x = torch.randn(8, 256)
    w, b = torch.ones(256), torch.zeros(256)
    kw = dict(dropout_p=0.5, return_mask=True, backend=backend)
    m0 = bias_dropout_residual_layer_norm(x, None, None, w, b, seed=1, **kw)[1]
    assert torch.equal(m0, bias_dropout_residual_layer_norm(x, None, None, w, b, seed=1, **kw)[1])
    assert not torch.equal(m0, bias_dropout_residual_layer_norm(x, None, None, w, b, seed=2, **kw)[1])
    assert not torch.equal(m0, bias_dropout_residual_layer_norm(x, None, None, w, b, seed=1, offset=1, **kw)[1])
    y, m = bias_dropout_residual_layer_norm(x, None, None, w, b, seed=1, training=False, **kw)
    assert bool(m.all())
    assert_close(y, torch.nn.functional.layer_norm(x, (256,), w, b, 1e-12), name="y")


# ---------------------------------------------------------------- plain layer_norm


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("invertible", [False, True], ids=["saved-input", "invertible"])
def test_layer_norm_matches_f_layer_norm(backend, invertible):
    x = (torch.randn(3, 7, 1023) * 2 + 1).requires_grad_()
    w = (torch.rand(1023) + 0.5).requires_grad_()
    b = torch.randn(1023).requires_grad_()
    y = layer_norm(x, w, b, eps=1e-5, invertible=invertible, backend=backend)
    want = torch.nn.functional.layer_norm(x, (1023,), w, b, 1e-5)
    assert_close(y, want, name="y")
    dy = torch.randn_like(y)
    for name, g, r in zip(
        ("x", "weight", "bias"),
        torch.autograd.grad(y, (x, w, b), dy),
        torch.autograd.grad(want, (x, w, b), dy),
        strict=True,
    ):
        assert_close(g, r, torch.float32, "bwd", name="d" + name)
