"""bias_geglu_ref against the direct torch formula (DeepSpeed's test reference), plus float64 gradchecks."""

import pytest
import torch
import torch.nn.functional as F

from fastlayers.reference.geglu import bias_geglu_ref, gate_act_ref
from tests.tolerances import assert_close

ACTS = ["gelu", "silu"]
TORCH_ACT = {"gelu": F.gelu, "silu": F.silu}


def _direct(x, bias, activation):
    h, g = (x if bias is None else x + bias).chunk(2, dim=-1)
    return h * TORCH_ACT[activation](g)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("has_bias", [True, False])
def test_bias_geglu_ref_matches_direct_formula(activation, dtype, has_bias):
    x = torch.randn(3, 7, 2 * 97, dtype=dtype) * 3
    bias = torch.randn(2 * 97, dtype=dtype) if has_bias else None
    out = bias_geglu_ref(x, bias, activation=activation)
    assert out.shape == (3, 7, 97) and out.dtype == dtype
    assert_close(out, _direct(x, bias, activation), name="out")


@pytest.mark.parametrize("activation", ACTS)
def test_gate_act_ref_tails(activation):
    # large |g|: act(g) -> g for g >> 0 and -> 0 for g << 0, no NaN/inf
    g = torch.tensor([-40.0, -10.0, -1e-4, 0.0, 1e-4, 10.0, 40.0], dtype=torch.float64)
    assert_close(gate_act_ref(g, activation), TORCH_ACT[activation](g), name="tails")


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_bias_geglu_ref_upcast_half_matches_deepspeed_formula(activation, dtype):
    x = torch.randn(5, 2 * 64, dtype=dtype) * 3
    bias = torch.randn(2 * 64, dtype=dtype)
    out = bias_geglu_ref(x, bias, activation=activation, upcast=True)
    assert out.dtype == dtype
    # DeepSpeed's test: h * act(gate.float()).to(dtype), the product in the half dtype
    h, g = (x + bias).chunk(2, dim=-1)
    ds = h * TORCH_ACT[activation](g.float()).to(dtype)
    exact = _direct(x.double(), bias.double(), activation)
    # computed in fp32 and rounded once: no further from the exact value than DeepSpeed's (twice-rounded) formula
    err = (out.double() - exact).abs().max().item()
    ds_err = (ds.double() - exact).abs().max().item()
    assert err <= ds_err + 1e-6, f"upcast err {err:.3e} > DeepSpeed formula err {ds_err:.3e}"


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("has_bias", [True, False])
def test_bias_geglu_ref_gradcheck(activation, has_bias):
    x = (torch.randn(3, 2 * 11, dtype=torch.float64) * 2).requires_grad_()
    bias = torch.randn(2 * 11, dtype=torch.float64, requires_grad=True) if has_bias else None
    inputs = (x, bias) if has_bias else (x,)

    def fn(*ts):
        return bias_geglu_ref(*ts, activation=activation)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_bias_geglu_ref_grads_match_direct_formula():
    x = torch.randn(2, 5, 2 * 40, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2 * 40, dtype=torch.float64, requires_grad=True)
    for activation in ACTS:
        out = bias_geglu_ref(x, bias, activation=activation)
        want = _direct(x, bias, activation)
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, bias), dout)
        ref = torch.autograd.grad(want, (x, bias), dout)
        for name, g, r in zip(("dx", "dbias"), got, ref, strict=True):
            assert_close(g, r, kind="bwd", name=f"{activation} {name}")


def test_bias_geglu_ref_rejects_odd_width_and_unknown_activation():
    with pytest.raises(ValueError, match=r"even last dim.*\(4, 9\)"):
        bias_geglu_ref(torch.zeros(4, 9))
    with pytest.raises(ValueError, match="'relu'"):
        bias_geglu_ref(torch.zeros(4, 8), activation="relu")
