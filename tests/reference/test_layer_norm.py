"""The LayerNorm references against F.layer_norm / F.dropout, and a float64 gradcheck of the fused reference."""

import pytest
import torch
import torch.nn.functional as F

from fastlayers.reference.norm import bias_dropout_residual_layer_norm_ref, layer_norm_ref
from fastlayers.utils import keep_mask
from tests.tolerances import assert_close

SHAPES = [(r, n) for r in (1, 7, 97) for n in (64, 1023, 1500)]


def _params(n, dtype):
    w = torch.rand(n, dtype=dtype) + 0.5
    b = torch.randn(n, dtype=dtype)
    return w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0]}N{s[1]}")
def test_layer_norm_ref_matches_f_layer_norm(shape, dtype):
    x = torch.randn(*shape, dtype=dtype) * 3 + 1
    w, b = _params(shape[-1], dtype)
    assert_close(layer_norm_ref(x, w, b, eps=1e-5), F.layer_norm(x, shape[-1:], w, b, 1e-5), name="y")


def test_layer_norm_ref_leading_dims_and_no_affine():
    x = torch.randn(2, 3, 5, 64)
    assert_close(layer_norm_ref(x, None, None, eps=1e-6), F.layer_norm(x, (64,), eps=1e-6), name="y")


def test_layer_norm_ref_upcast_half_rounds_once():
    x = torch.randn(7, 1023, dtype=torch.float16)
    w, b = _params(1023, torch.float16)
    out = layer_norm_ref(x, w, b, upcast=True)
    want = F.layer_norm(x.float(), (1023,), w.float(), b.float()).half()
    assert out.dtype == torch.float16
    assert_close(out, want, name="y")


@pytest.mark.parametrize("shape", [(1, 64), (97, 1500)], ids=lambda s: f"M{s[0]}N{s[1]}")
def test_fused_ref_without_dropout_is_layer_norm_of_sum(shape):
    x, r = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    bias = torch.randn(shape[-1], dtype=torch.float64)
    w, b = _params(shape[-1], torch.float64)
    y, pre = bias_dropout_residual_layer_norm_ref(x, bias, r, w, b, eps=1e-12, return_residual_out=True)
    assert_close(pre, r + x + bias, name="pre")
    assert_close(y, F.layer_norm(r + x + bias, shape[-1:], w, b, 1e-12), name="y")


def test_fused_ref_dropout_uses_keep_mask_and_scales():
    x, r = torch.randn(7, 64, dtype=torch.float64), torch.randn(7, 64, dtype=torch.float64)
    bias = torch.randn(64, dtype=torch.float64)
    w, b = _params(64, torch.float64)
    p = 0.3
    mask = torch.rand(7, 64) >= p
    y, pre = bias_dropout_residual_layer_norm_ref(
        x, bias, r, w, b, dropout_p=p, keep_mask=mask, return_residual_out=True
    )
    want_pre = r + (x + bias) * mask / (1 - p)
    assert_close(pre, want_pre, name="pre")
    assert_close(y, F.layer_norm(want_pre, (64,), w, b, 1e-12), name="y")


def test_fused_ref_mask_comes_from_utils_keep_mask():
    x = torch.randn(3, 5, 64)
    w, b = _params(64, torch.float32)
    _, mask = bias_dropout_residual_layer_norm_ref(
        x, None, None, w, b, dropout_p=0.25, seed=11, offset=2, return_mask=True
    )
    assert torch.equal(mask, keep_mask((3, 5, 64), 0.25, 11, "cpu", 2))
    _, other = bias_dropout_residual_layer_norm_ref(
        x, None, None, w, b, dropout_p=0.25, seed=11, offset=3, return_mask=True
    )
    assert not torch.equal(mask, other)


@pytest.mark.parametrize("training,p", [(False, 0.5), (True, 0.0)])
def test_fused_ref_no_dropout_draws_nothing(training, p):
    x = torch.randn(4, 64)
    w, b = _params(64, torch.float32)
    state = torch.get_rng_state()
    y, mask = bias_dropout_residual_layer_norm_ref(
        x, None, None, w, b, dropout_p=p, training=training, return_mask=True
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert bool(mask.all())
    assert_close(y, F.layer_norm(x, (64,), w, b, 1e-12), name="y")


@pytest.mark.parametrize("with_bias,with_residual", [(True, True), (False, True), (True, False)])
def test_fused_ref_gradcheck_float64(with_bias, with_residual):
    n = 6
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n, dtype=torch.float64, requires_grad=True) if with_bias else None
    r = torch.randn(3, n, dtype=torch.float64, requires_grad=True) if with_residual else None
    w = (torch.rand(n, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(n, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, n) >= 0.3

    def fn(*ts):
        it = iter(ts)
        xx = next(it)
        bb = next(it) if with_bias else None
        rr = next(it) if with_residual else None
        return bias_dropout_residual_layer_norm_ref(
            xx, bb, rr, next(it), next(it), eps=1e-5, dropout_p=0.3, keep_mask=mask, return_residual_out=True
        )

    inputs = tuple(t for t in (x, bias, r, w, b) if t is not None)
    assert torch.autograd.gradcheck(fn, inputs)
