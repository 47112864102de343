"""bias_gelu_ref / bias_gelu_linear_ref against torch built-ins, plus float64 gradchecks."""

import pytest
import torch
import torch.nn.functional as F

from fastlayers.reference.activations import bias_gelu_linear_ref, bias_gelu_ref, gelu_ref
from tests.tolerances import assert_close

APPROX = ["none", "tanh"]


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("has_bias", [True, False])
def test_bias_gelu_ref_matches_f_gelu(approximate, dtype, has_bias):
    x = torch.randn(3, 7, 97, dtype=dtype) * 3
    bias = torch.randn(97, dtype=dtype) if has_bias else None
    want = F.gelu(x + bias if has_bias else x, approximate=approximate)
    assert_close(bias_gelu_ref(x, bias, approximate=approximate), want, name="y")


@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_ref_tails(approximate):
    # large |u|: gelu(u) -> u for u >> 0 and -> 0 for u << 0, no NaN/inf
    u = torch.tensor([-40.0, -10.0, -1e-4, 0.0, 1e-4, 10.0, 40.0], dtype=torch.float64)
    assert_close(gelu_ref(u, approximate), F.gelu(u, approximate=approximate), name="tails")


@pytest.mark.parametrize("approximate", APPROX)
def test_bias_gelu_ref_upcast_half(approximate):
    x = torch.randn(5, 64, dtype=torch.float16) * 3
    bias = torch.randn(64, dtype=torch.float16)
    out = bias_gelu_ref(x, bias, approximate=approximate, upcast=True)
    assert out.dtype == torch.float16
    want = F.gelu(x.double() + bias.double(), approximate=approximate)
    # computed in fp32 and rounded once: within half an fp16 ulp (plus fp32 noise) of the exact value
    assert_close(out, want.half(), atol=2e-3, rtol=1e-3, name="y")


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("checkpoint", [False, True])
def test_bias_gelu_linear_ref_matches_torch(approximate, checkpoint):
    x = torch.randn(2, 5, 40, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, 40, dtype=torch.float64, requires_grad=True)
    ob = torch.randn(24, dtype=torch.float64, requires_grad=True)
    out = bias_gelu_linear_ref(x, bias, w, ob, approximate=approximate, checkpoint=checkpoint)
    want = F.linear(F.gelu(x + bias, approximate=approximate), w, ob)
    assert_close(out, want, name="out")
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, bias, w, ob), dout)
    ref = torch.autograd.grad(want, (x, bias, w, ob), dout)
    for name, g, r in zip(("dx", "dbias", "dweight", "dout_bias"), got, ref, strict=True):
        assert_close(g, r, kind="bwd", name=name)


@pytest.mark.parametrize("approximate", APPROX)
def test_bias_gelu_ref_gradcheck(approximate):
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: bias_gelu_ref(a, b, approximate=approximate), (x, bias))
    assert torch.autograd.gradgradcheck(lambda a, b: bias_gelu_ref(a, b, approximate=approximate), (x, bias))


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("checkpoint", [False, True])
def test_bias_gelu_linear_ref_gradcheck(approximate, checkpoint):
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    ob = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def fn(a, b, c, d):
        return bias_gelu_linear_ref(a, b, c, d, approximate=approximate, checkpoint=checkpoint)

    assert torch.autograd.gradcheck(fn, (x, bias, w, ob))


def test_gelu_ref_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="'sigmoid'"):
        gelu_ref(torch.zeros(3), "sigmoid")
