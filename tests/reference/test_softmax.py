"""masked_softmax_ref against torch.softmax, the all -inf row rule, dropout with a given mask, float64 gradcheck."""

import pytest
import torch

from fastlayers.reference.softmax import masked_softmax_ref, safe_softmax_ref
from tests.tolerances import assert_close

B, H, SQ, SK = 2, 3, 5, 7
MASK_SHAPES = [None, (B, 1, 1, SK), (B, 1, SQ, SK), (B, H, SQ, SK), (SQ, SK)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=str)
def test_matches_torch_softmax(dtype, mask_shape):
    s = torch.randn(B, H, SQ, SK, dtype=dtype)
    mask = None if mask_shape is None else torch.randn(mask_shape, dtype=dtype) * 3
    out = masked_softmax_ref(s, mask, scale=0.37)
    want = torch.softmax(s * 0.37 + (0 if mask is None else mask), dim=-1)
    assert_close(out, want, name="p")


def test_fully_masked_rows_give_zero_output_and_grad():
    s = torch.randn(B, H, SQ, SK, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(B, 1, SQ, SK, dtype=torch.float64)
    mask[0, 0, 2] = float("-inf")  # one dead row in batch 0
    mask[1, 0, :, :3] = float("-inf")  # partly masked rows stay normal
    p = masked_softmax_ref(s, mask, scale=2.0)
    assert torch.isfinite(p).all()
    assert (p[0, :, 2] == 0).all()
    assert torch.allclose(p[1].sum(-1), torch.ones(H, SQ, dtype=torch.float64))
    assert (p[1, ..., :3] == 0).all()
    (p * torch.randn_like(p)).sum().backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[0, :, 2] == 0).all()


def test_safe_softmax_equals_softmax_on_finite_rows():
    x = torch.randn(4, 9, dtype=torch.float64)
    assert torch.equal(safe_softmax_ref(x), torch.softmax(x, -1))


def test_dropout_uses_the_given_keep_mask():
    s = torch.randn(B, H, SQ, SK, dtype=torch.float64)
    keep = torch.rand(B, H, SQ, SK) >= 0.3
    out = masked_softmax_ref(s, None, dropout_p=0.3, keep_mask=keep)
    assert_close(out, torch.softmax(s, -1) * keep / 0.7, name="dropped")
    assert torch.equal(masked_softmax_ref(s, None, dropout_p=0.3, keep_mask=keep, training=False), torch.softmax(s, -1))


def test_dropout_without_keep_mask_is_refused():
    with pytest.raises(ValueError, match="keep_mask"):
        masked_softmax_ref(torch.randn(1, 1, 2, 2), dropout_p=0.1)


def test_upcast_computes_in_fp32_and_returns_input_dtype():
    s = torch.randn(B, H, SQ, SK).half()
    out = masked_softmax_ref(s, None, scale=0.5, upcast=True)
    assert out.dtype == torch.float16
    assert_close(out, torch.softmax(s.float() * 0.5, -1).half(), name="upcast")


def test_gradcheck_float64():
    s = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    mask[0, 0, 1] = float("-inf")  # a dead row: zero gradient, still smooth
    keep = torch.rand(1, 2, 3, 4) >= 0.25
    assert torch.autograd.gradcheck(
        lambda x: masked_softmax_ref(x, mask, scale=0.7, dropout_p=0.25, keep_mask=keep), (s,)
    )
