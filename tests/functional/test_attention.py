"""attention(): dispatch, refusals, FASTLAYERS_BACKEND, dropout_checkpoint, keep fraction, bias grad, bad input."""

import pytest
import torch

from fastlayers import backends
from fastlayers.functional.attention import attention
from fastlayers.memory import saved_activation_bytes
from fastlayers.reference.attention import attention_ref
from fastlayers.utils import keep_mask
from tests.tolerances import assert_close, assert_fwd_bwd_close


def qkv(b=2, s=9, h=2, d=16, dtype=torch.float32, grad=False):
    return tuple(torch.randn(b, s, h, d, dtype=dtype, requires_grad=grad) for _ in range(3))


def test_default_backend_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    q, k, v = qkv()
    assert backends.select("attention", q=q, k=k, v=v).name == "torch"


def test_reference_backend_always_works():
    q, k, v = qkv(dtype=torch.float64)
    out = attention(q, k, v, backend="reference")
    assert_close(out, attention_ref(q, k, v), name="out")


def test_env_var_selects_backend(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setenv("FASTLAYERS_BACKEND", "attention=reference")
    assert backends.select("attention", q=q, k=k, v=v).name == "reference"
    monkeypatch.setenv("FASTLAYERS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(NotImplementedError, match="interpreter"):
        attention(q, k, v)


def test_triton_refusal_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv(d=160)
    with pytest.raises(NotImplementedError, match="head dim D=160"):
        attention(q, k, v, backend="triton")
    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="fp64"):
        attention(q, k, v, backend="triton")
    q, k, v = qkv()
    bias = torch.zeros(2, 1, 1, 9, requires_grad=True)
    with pytest.raises(NotImplementedError, match="attn_bias requires grad"):
        attention(q, k, v, attn_bias=bias, backend="triton")


def test_unknown_backend_is_a_value_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown backend"):
        attention(q, k, v, backend="cuda-magic")


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_dropout_checkpoint_same_results_fewer_saved_bytes(dropout_p):
    q, k, v = qkv(b=2, s=33, h=3, d=16, grad=True)
    bias = torch.zeros(2, 1, 1, 33)
    bias[1, ..., -7:] = -10000.0
    res = {}
    for ckpt in (True, False):
        out = attention(q, k, v, attn_bias=bias, dropout_p=dropout_p, seed=11, dropout_checkpoint=ckpt)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        nbytes = saved_activation_bytes(
            lambda ckpt=ckpt: attention(q, k, v, attn_bias=bias, dropout_p=dropout_p, seed=11, dropout_checkpoint=ckpt),
            exclude=(q, k, v, bias),
        )
        res[ckpt] = (out, grads, nbytes)
    assert torch.equal(res[True][0], res[False][0])
    for a, b in zip(res[True][1], res[False][1], strict=True):
        assert torch.equal(a, b)
    mask_bytes = 2 * 3 * 33 * 33  # one bool per probability
    p_bytes = 2 * 3 * 33 * 33 * 4
    if dropout_p > 0:
        assert res[False][2] - res[True][2] == mask_bytes
        assert res[True][2] == p_bytes + 3 * q.numel() * 4  # P plus q, k, v (re-laid out as (B*H, S, D))
    else:  # no dropout: SDPA's fused kernel and backward, which keep out and the log-sum-exp only
        assert res[False][2] == res[True][2] == q.numel() * 4 + 2 * 3 * 33 * 4


def test_no_dropout_with_grad_runs_sdpa_and_matches_reference():
    """dropout 0 with grad takes SDPA (its backward), bias without grad; a fully masked row gives 0 and 0 grads."""
    q, k, v = qkv(b=2, s=21, h=3, d=16, grad=True)
    bias = torch.zeros(2, 1, 21, 21)
    bias[1, :, 5] = float("-inf")
    out = attention(q, k, v, attn_bias=bias, causal=True, backend="torch")
    assert "AttentionTorchFunction" not in type(out.grad_fn).__name__
    ref = attention(q, k, v, attn_bias=bias, causal=True, backend="reference")
    got = assert_fwd_bwd_close(out, ref, (q, k, v), torch.float32)
    assert out[1, 5].abs().max() == 0 and got[0][1, 5].abs().max() == 0
    bias.requires_grad_(True)  # a bias that needs its gradient keeps the Function that gives it one
    out = attention(q, k, v, attn_bias=bias, backend="torch")
    assert "AttentionTorchFunction" in type(out.grad_fn).__name__


def test_torch_dropout_matches_reference_backend_bit_for_bit_mask():
    q, k, v = qkv(dtype=torch.float64)
    a = attention(q, k, v, dropout_p=0.4, seed=3, offset=2, backend="torch")
    b = attention(q, k, v, dropout_p=0.4, seed=3, offset=2, backend="reference")
    assert_close(a, b, name="same mask")


def test_keep_fraction_is_one_minus_p():
    # v = ones and the probabilities are uniform (q = 0): out[b, i, h] = sum_j keep_ij / (S (1-p))
    b, s, h, d, p = 2, 128, 4, 16, 0.3
    q = torch.zeros(b, s, h, d)
    k = torch.randn(b, s, h, d)
    v = torch.ones(b, s, h, d)
    out = attention(q, k, v, dropout_p=p, seed=9)
    frac = (out[..., 0] * (1 - p)).mean().item()
    assert abs(frac - (1 - p)) < 0.01


def test_seed_none_follows_torch_manual_seed():
    q, k, v = qkv()
    torch.manual_seed(123)
    a = attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(123)
    b = attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b)


def test_no_dropout_draws_no_random_number():
    q, k, v = qkv()
    state = torch.get_rng_state()
    attention(q, k, v, dropout_p=0.0)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("grad", [False, True])
def test_no_dropout_paths_match_reference(grad):  # no grad: the SDPA path; grad: the Function
    q, k, v = qkv(dtype=torch.float64, grad=grad)
    bias = torch.zeros(2, 1, 9, 9, dtype=torch.float64)
    bias[0, 0, 4] = float("-inf")
    with torch.set_grad_enabled(grad):
        out = attention(q, k, v, attn_bias=bias, causal=True)
    want = attention_ref(q, k, v, attn_bias=bias, causal=True)
    assert_close(out, want, name="sdpa path")
    assert (out[0, 4] == 0).all()
    if grad:
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), g)
        for name, a, b in zip(("dq", "dk", "dv"), got, torch.autograd.grad(want, (q, k, v), g), strict=True):
            assert_close(a, b, kind="bwd", name=name)
        assert (got[0][0, 4] == 0).all(), "fully masked row: zero dq"


def test_bias_gradient_on_torch_backend():
    q, k, v = qkv(dtype=torch.float64, grad=True)
    bias = torch.randn(1, 2, 9, 9, dtype=torch.float64, requires_grad=True)
    keep = keep_mask((2, 2, 9, 9), 0.25, 5, "cpu", 0)
    out = attention(q, k, v, attn_bias=bias, dropout_p=0.25, seed=5, causal=True, backend="torch")
    ref = attention_ref(q, k, v, attn_bias=bias, dropout_p=0.25, keep_mask=keep, causal=True)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), g)
    want = torch.autograd.grad(ref, (q, k, v, bias), g)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), got, want, strict=True):
        assert_close(a, b, kind="bwd", name=name)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(2, 9, 16), *qkv()[1:]), ValueError, "q must have 4 dims"),
        (lambda: (qkv()[0], torch.randn(2, 9, 3, 16), torch.randn(2, 9, 3, 16)), ValueError, "head count"),
        (lambda: (qkv()[0], torch.randn(2, 9, 2, 32), torch.randn(2, 9, 2, 32)), ValueError, "head dim"),
        (lambda: (qkv()[0], torch.randn(3, 9, 2, 16), torch.randn(3, 9, 2, 16)), ValueError, "batch"),
        (lambda: (qkv()[0], qkv()[1], torch.randn(2, 8, 2, 16)), ValueError, "same shape"),
        (lambda: (qkv()[0], qkv()[1].double(), qkv()[2]), TypeError, "share a dtype"),
        (lambda: (qkv()[0].int(), *qkv()[1:]), TypeError, "dtype"),
        (lambda: ([1.0], *qkv()[1:]), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(make, exc, match):
    q, k, v = make()
    with pytest.raises(exc, match=match):
        attention(q, k, v)


@pytest.mark.parametrize("shape", [(2, 1, 1, 8), (2, 3, 9, 9), (9, 10), (3, 1, 1, 9)])
def test_bias_not_broadcastable_names_the_shape(shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"attn_bias of shape " + repr(shape).replace("(", r"\(").replace(")", r"\)")):
        attention(q, k, v, attn_bias=torch.zeros(shape))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_p_out_of_range(p):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, k, v, dropout_p=p)
