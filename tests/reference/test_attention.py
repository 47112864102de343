"""attention_ref against F.scaled_dot_product_attention, the fully-masked-row rule, dropout, float64 gradcheck."""

import pytest
import torch
import torch.nn.functional as F

from fastlayers.reference.attention import attention_ref
from fastlayers.reference.softmax import masked_softmax_ref
from tests.tolerances import assert_close


def _sdpa(q, k, v, bias=None, causal=False, scale=None):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias, is_causal=causal, scale=scale
    )
    return out.transpose(1, 2)


def _bias(kind, b, h, s_q, s_k, dtype):
    shape = {"key": (b, 1, 1, s_k), "row": (b, 1, s_q, s_k), "full": (b, h, s_q, s_k), "2d": (s_q, s_k)}[kind]
    return torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "b,h,s_q,s_k,d", [(1, 1, 1, 1, 16), (2, 3, 7, 7, 16), (1, 2, 21, 37, 64), (2, 2, 37, 21, 80)], ids=str
)
@pytest.mark.parametrize("bias_kind", [None, "key", "row", "full", "2d"])
def test_matches_sdpa(dtype, b, h, s_q, s_k, d, bias_kind):
    q = torch.randn(b, s_q, h, d, dtype=dtype)
    k, v = torch.randn(2, b, s_k, h, d, dtype=dtype)
    bias = None if bias_kind is None else _bias(bias_kind, b, h, s_q, s_k, dtype)
    assert_close(attention_ref(q, k, v, attn_bias=bias, softmax_scale=0.3), _sdpa(q, k, v, bias, scale=0.3), name="out")


@pytest.mark.parametrize("s_q,s_k", [(7, 7), (5, 9)])
def test_causal_matches_sdpa_is_causal(s_q, s_k):
    q = torch.randn(2, s_q, 3, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, s_k, 3, 16, dtype=torch.float64)
    assert_close(attention_ref(q, k, v, causal=True), _sdpa(q, k, v, causal=True), name="causal")


def test_fully_masked_rows_give_zero_output_and_grads():
    q, k, v = (torch.randn(2, 5, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.zeros(2, 1, 5, 5, dtype=torch.float64)
    bias[1] = float("-inf")  # batch 1: every row dead
    bias[0, 0, 3] = float("-inf")  # batch 0: row 3 dead
    out = attention_ref(q, k, v, attn_bias=bias)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all() and (out[0, 3] == 0).all()
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[1] == 0).all() and (q.grad[0, 3] == 0).all()
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


def test_dropout_is_softmax_dropout_then_pv():
    q, k, v = (torch.randn(1, 6, 2, 16, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(1, 2, 6, 6) >= 0.2
    bias = torch.randn(1, 1, 1, 6, dtype=torch.float64)
    s = torch.matmul(q.transpose(1, 2), k.transpose(1, 2).transpose(-1, -2))  # (B, H, S_q, S_k)
    p = masked_softmax_ref(s, bias, scale=0.25, dropout_p=0.2, keep_mask=keep)
    want = torch.matmul(p, v.transpose(1, 2)).transpose(1, 2)
    out = attention_ref(q, k, v, attn_bias=bias, softmax_scale=0.25, dropout_p=0.2, keep_mask=keep)
    assert_close(out, want, name="dropout")


def test_upcast_returns_input_dtype():
    q, k, v = (torch.randn(1, 9, 2, 16).half() for _ in range(3))
    out = attention_ref(q, k, v, upcast=True)
    assert out.dtype == torch.float16
    assert_close(out, attention_ref(q.float(), k.float(), v.float()).half(), name="upcast")


def test_gradcheck_float64():
    q, k, v = (torch.randn(1, 4, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(1, 2, 4, 4) >= 0.3
    fn = lambda q, k, v, bias: attention_ref(  # noqa: E731
        q, k, v, attn_bias=bias, dropout_p=0.3, keep_mask=keep, causal=True
    )
    assert torch.autograd.gradcheck(fn, (q, k, v, bias))
