"""Public bias_dropout_residual_layer_norm / layer_norm: dispatch, refusals, FASTLAYERS_BACKEND, bad inputs,
return structure and seeding."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from fastlayers import backends
from fastlayers.functional.layer_norm import LN_OP, OP, bias_dropout_residual_layer_norm, layer_norm
from fastlayers.utils import is_triton_available
from tests.tolerances import assert_close


def _inputs(shape=(2, 5, 64), dtype=torch.float32):
    n = shape[-1]
    return (
        torch.randn(*shape, dtype=dtype),
        torch.randn(n, dtype=dtype),
        torch.randn(*shape, dtype=dtype),
        torch.rand(n, dtype=dtype) + 0.5,
        torch.randn(n, dtype=dtype),
    )


@pytest.fixture(autouse=True)
def _no_env_backend(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)


@pytest.fixture
def no_interpreter(monkeypatch):
    """TRITON_INTERPRET=0 for one test, after triton and our kernels were imported with it on: @triton.jit
    (also triton's own tl.sum helpers) picks interpreter or compiler once, at import."""
    if is_triton_available():
        importlib.import_module("fastlayers.kernels.triton.layer_norm")
    monkeypatch.setenv("TRITON_INTERPRET", "0")


# ---------------------------------------------------------------- dispatch


def test_cpu_picks_torch_automatically_even_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, bias, r, w, b = _inputs()
    assert backends.select(OP, x=x, bias=bias, residual=r, weight=w, ln_bias=b).name == "torch"
    assert backends.select(LN_OP, x=x, weight=w, bias=b).name == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_backend_always_works(dtype):
    x, bias, r, w, b = _inputs(dtype=dtype)
    y, pre = bias_dropout_residual_layer_norm(x, bias, r, w, b, eps=1e-5, return_residual_out=True, backend="reference")
    assert_close(pre, r + x + bias, name="pre")
    assert_close(y, F.layer_norm(r + x + bias, (64,), w, b, 1e-5), name="y")
    assert_close(layer_norm(x, w, b, backend="reference"), F.layer_norm(x, (64,), w, b), name="ln")


def test_explicit_triton_without_interpreter_is_refused_with_reasons(no_interpreter):
    x, bias, r, w, b = _inputs()
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        bias_dropout_residual_layer_norm(x, bias, r, w, b, backend="triton")
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET"):
        layer_norm(x, w, b, backend="triton")


def test_triton_refuses_fp64_and_too_wide_rows(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, bias, r, w, b = _inputs(dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="dtype fp64 not supported"):
        bias_dropout_residual_layer_norm(x, bias, r, w, b, backend="triton")
    x, bias, r, w, b = _inputs(shape=(2, 5000))
    with pytest.raises(NotImplementedError, match="hidden size 5000 > 4096"):
        bias_dropout_residual_layer_norm(x, bias, r, w, b, backend="triton")
    # automatic selection falls back to torch for the same inputs
    assert backends.select(OP, x=x, bias=bias, residual=r, weight=w, ln_bias=b).name == "torch"


def test_fastlayers_backend_env_is_honoured(monkeypatch, no_interpreter):
    x, bias, r, w, b = _inputs()
    monkeypatch.setenv("FASTLAYERS_BACKEND", "reference")
    assert backends.select(OP, x=x, weight=w, ln_bias=b).name == "reference"
    monkeypatch.setenv("FASTLAYERS_BACKEND", f"{OP}=reference,{LN_OP}=torch")
    assert backends.select(OP, x=x, weight=w, ln_bias=b).name == "reference"
    assert backends.select(LN_OP, x=x, weight=w, bias=b).name == "torch"
    # the public op goes through it: an env-requested triton without the interpreter is refused
    monkeypatch.setenv("FASTLAYERS_BACKEND", f"{OP}=triton")
    with pytest.raises(NotImplementedError, match="FASTLAYERS_BACKEND"):
        bias_dropout_residual_layer_norm(x, bias, r, w, b)
    assert layer_norm(x, w, b).shape == x.shape  # other op unaffected


@pytest.mark.interpreter
def test_env_selects_triton_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTLAYERS_BACKEND", f"{LN_OP}=triton")
    x, _, _, w, b = _inputs(shape=(3, 64))
    assert backends.select(LN_OP, x=x, weight=w, bias=b).name == "triton"
    assert_close(layer_norm(x, w, b), F.layer_norm(x, (64,), w, b), name="y")


# ---------------------------------------------------------------- bad inputs (before any kernel)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(weight=torch.ones(63)), ValueError, r"weight must have shape \(64\), got \(63,\)"),
        (dict(ln_bias=torch.ones(64, 1)), ValueError, r"ln_bias must have shape \(64\), got \(64, 1\)"),
        (dict(bias=torch.ones(32)), ValueError, r"bias must have shape \(64\), got \(32,\)"),
        (dict(residual=torch.ones(2, 4, 64)), ValueError, r"residual must have shape \(2, 5, 64\), got \(2, 4, 64\)"),
        (dict(weight=torch.ones(64, dtype=torch.float64)), TypeError, r"weight must have dtype .* got fp64"),
        (dict(residual=torch.ones(2, 5, 64, dtype=torch.float16)), TypeError, r"residual .* got fp16"),
        (dict(x=torch.ones(2, 5, 64, dtype=torch.int32)), TypeError, r"x must have dtype .* got int32"),
        (dict(x=[1.0, 2.0]), TypeError, r"x must be a torch.Tensor, got list"),
        (dict(weight=None), TypeError, r"weight must be a torch.Tensor, got NoneType"),
        (dict(weight=torch.ones(64, device="meta")), ValueError, r"weight is on meta, expected cpu"),
        (dict(x=torch.ones(2, 0)), ValueError, r"non-empty last .* got shape \(2, 0\)"),
    ],
)
def test_bad_tensors_raise_naming_the_value(change, exc, match):
    x, bias, r, w, b = _inputs()
    args = dict(x=x, bias=bias, residual=r, weight=w, ln_bias=b)
    args.update(change)
    with pytest.raises(exc, match=match):
        bias_dropout_residual_layer_norm(args["x"], args["bias"], args["residual"], args["weight"], args["ln_bias"])


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(eps=0.0), ValueError, r"eps must be a number > 0, got 0.0"),
        (dict(eps=-1e-5), ValueError, r"eps must be a number > 0, got -1e-05"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\), got -0.1"),
        (dict(seed=1.5), TypeError, r"seed must be an int or None, got float 1.5"),
        (dict(offset=-1), ValueError, r"offset must be an int >= 0, got -1"),
    ],
)
def test_bad_scalars_raise_naming_the_value(kw, exc, match):
    x, bias, r, w, b = _inputs()
    with pytest.raises(exc, match=match):
        bias_dropout_residual_layer_norm(x, bias, r, w, b, **kw)


def test_layer_norm_bad_inputs():
    x, _, _, w, b = _inputs()
    with pytest.raises(ValueError, match=r"bias must have shape \(64\), got \(65,\)"):
        layer_norm(x, w, torch.ones(65))
    with pytest.raises(ValueError, match="eps must be a number > 0"):
        layer_norm(x, w, b, eps=0)


# ---------------------------------------------------------------- returns, seeding, autograd plumbing


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_return_structure(backend):
    x, bias, r, w, b = _inputs()
    kw = dict(dropout_p=0.2, seed=3, backend=backend)
    y = bias_dropout_residual_layer_norm(x, bias, r, w, b, **kw)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape
    y2, pre = bias_dropout_residual_layer_norm(x, bias, r, w, b, return_residual_out=True, **kw)
    y3, mask = bias_dropout_residual_layer_norm(x, bias, r, w, b, return_mask=True, **kw)
    y4, pre4, mask4 = bias_dropout_residual_layer_norm(
        x, bias, r, w, b, return_residual_out=True, return_mask=True, **kw
    )
    for t in (y2, y3, y4):
        assert torch.equal(t, y)
    assert torch.equal(pre, pre4) and torch.equal(mask, mask4)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert_close(pre, r + torch.where(mask, (x + bias) / 0.8, 0.0), name="pre")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_seed_none_follows_torch_manual_seed(backend):
    x, bias, r, w, b = _inputs()
    torch.manual_seed(42)
    a = bias_dropout_residual_layer_norm(x, bias, r, w, b, dropout_p=0.5, backend=backend)
    torch.manual_seed(42)
    c = bias_dropout_residual_layer_norm(x, bias, r, w, b, dropout_p=0.5, backend=backend)
    d = bias_dropout_residual_layer_norm(x, bias, r, w, b, dropout_p=0.5, backend=backend)
    assert torch.equal(a, c) and not torch.equal(a, d)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_no_dropout_draws_no_random_number(backend):
    x, bias, r, w, b = _inputs()
    state = torch.get_rng_state()
    y0 = bias_dropout_residual_layer_norm(x, bias, r, w, b, dropout_p=0.5, training=False, backend=backend)
    y1 = bias_dropout_residual_layer_norm(x, bias, r, w, b, dropout_p=0.0, backend=backend)
    assert torch.equal(torch.get_rng_state(), state)
    assert_close(y0, y1, name="y")


def test_no_grad_saves_nothing_and_inputs_without_grad_work():
    x, bias, r, w, b = _inputs()
    with torch.no_grad():
        y = bias_dropout_residual_layer_norm(x, bias, r, w, b, dropout_p=0.1, seed=1)
    assert y.grad_fn is None
    w.requires_grad_()
    y = bias_dropout_residual_layer_norm(x, bias, r, w, b, dropout_p=0.1, seed=1)
    (gw,) = torch.autograd.grad(y.sum(), (w,))
    assert gw.shape == w.shape


def test_pre_output_gradient_is_added():
    x, bias, r, w, b = (t.requires_grad_() for t in _inputs())
    y, pre = bias_dropout_residual_layer_norm(x, bias, r, w, b, return_residual_out=True)
    (gr_both,) = torch.autograd.grad((y * y).sum() + 3 * pre.sum(), (r,), retain_graph=True)
    (gr_y,) = torch.autograd.grad((y * y).sum(), (r,))
    assert_close(gr_both, gr_y + 3.0, name="dresidual")


def test_non_contiguous_inputs():
    x, bias, r, w, b = _inputs(shape=(10, 64))
    xt, rt = x.t().contiguous().t(), r.t().contiguous().t()  # (10, 64), column-major
    y = bias_dropout_residual_layer_norm(xt, bias, rt, w, b, eps=1e-5)
    assert_close(y, F.layer_norm(rt + xt + bias, (64,), w, b, 1e-5), name="y")
