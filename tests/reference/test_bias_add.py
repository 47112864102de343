"""nhwc_bias_add_ref against DeepSpeed's test references (plain broadcast adds), layouts, dtypes, gradients."""

import pytest
import torch

from fastlayers.reference.bias_add import nhwc_bias_add_ref
from tests.tolerances import assert_close

CL = torch.channels_last


def _nchw_cl(n, c, h, w, dtype=torch.float16):
    return torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=CL)


def _ds_refs(act, bias, other=None, other_bias=None):
    """DeepSpeed's tests/unit/ops/spatial/test_nhwc_bias_add.py references, as the spec states them."""
    b = bias.reshape(1, -1, 1, 1)
    if other is None:
        return act + b
    if other_bias is None:
        return (act + b) + other
    return (act + b) + (other + other_bias.reshape(1, -1, 1, 1))


@pytest.mark.parametrize("variant", ["bias", "other", "other_bias"])
@pytest.mark.parametrize("c", [192, 320, 7])
def test_matches_deepspeed_reference_fp16_channels_last(variant, c):
    act = _nchw_cl(2, c, 4, 3)
    bias = torch.randn(c).half()
    other = _nchw_cl(2, c, 4, 3) if variant != "bias" else None
    other_bias = torch.randn(c).half() if variant == "other_bias" else None
    out = nhwc_bias_add_ref(act, bias, other, other_bias)
    assert torch.equal(out, _ds_refs(act, bias, other, other_bias))  # same ops in the same order
    assert out.dtype == torch.float16 and out.is_contiguous(memory_format=CL)
    up = nhwc_bias_add_ref(act, bias, other, other_bias, upcast=True)
    want = _ds_refs(act.double(), bias.double(), *(None if t is None else t.double() for t in (other, other_bias)))
    assert up.dtype == torch.float16 and up.is_contiguous(memory_format=CL)
    assert_close(up, want, torch.float16, name="upcast")
    # fp32 sums of these fp16 values are exact, so the upcast result is the fp64 sum rounded once
    assert torch.equal(up, want.half())


@pytest.mark.parametrize("variant", ["bias", "other", "other_bias"])
def test_3d_bias_along_last_dim(variant):
    act = torch.randn(2, 5, 9)
    bias = torch.randn(9)
    other = torch.randn(2, 5, 9) if variant != "bias" else None
    other_bias = torch.randn(9) if variant == "other_bias" else None
    want = act + bias
    if other is not None:
        want = want + (other if other_bias is None else other + other_bias)
    assert torch.equal(nhwc_bias_add_ref(act, bias, other, other_bias), want)


def test_any_4d_layout_is_computed_per_channel():
    act = torch.randn(2, 3, 4, 5)  # NCHW contiguous
    bias = torch.randn(3)
    out = nhwc_bias_add_ref(act, bias)
    assert out.is_contiguous()
    for ch in range(3):
        assert torch.equal(out[:, ch], act[:, ch] + bias[ch])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_dtypes_and_upcast_keeps_fp64(dtype):
    act = _nchw_cl(1, 6, 2, 2, dtype)
    bias = torch.randn(6).to(dtype)
    out = nhwc_bias_add_ref(act, bias, upcast=True)
    assert out.dtype == dtype
    if dtype == torch.float64:
        assert torch.equal(out, act + bias.reshape(1, -1, 1, 1))  # fp64 is not downcast to fp32


def test_inputs_not_modified_and_new_tensor():
    act = _nchw_cl(1, 4, 2, 2, torch.float32)
    other = _nchw_cl(1, 4, 2, 2, torch.float32)
    a0, o0 = act.clone(), other.clone()
    out = nhwc_bias_add_ref(act, torch.randn(4), other, torch.randn(4))
    assert torch.equal(act, a0) and torch.equal(other, o0)
    assert out.data_ptr() not in (act.data_ptr(), other.data_ptr())


def test_gradcheck_fp64():
    act = torch.randn(1, 3, 2, 2, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    other = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    other_bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(nhwc_bias_add_ref, (act, bias, other, other_bias))


def test_errors():
    with pytest.raises(ValueError, match=r"4-D NCHW or 3-D \(B, S, C\), got shape \(2, 3\)"):
        nhwc_bias_add_ref(torch.randn(2, 3), torch.randn(3))
    with pytest.raises(ValueError, match="other_bias was given without other"):
        nhwc_bias_add_ref(torch.randn(1, 2, 3), torch.randn(3), None, torch.randn(3))
