"""masked_softmax(): dispatch, refusals, FASTLAYERS_BACKEND, checkpoint memory, keep fraction, mask grad, bad input."""

import pytest
import torch

from fastlayers import backends
from fastlayers.functional.softmax import masked_softmax
from fastlayers.memory import saved_activation_bytes
from fastlayers.reference.softmax import masked_softmax_ref
from fastlayers.utils import keep_mask
from tests.tolerances import assert_close


def test_default_backend_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("FASTLAYERS_BACKEND", raising=False)
    assert backends.select("masked_softmax", scores=torch.randn(1, 1, 2, 2)).name == "torch"


def test_reference_backend_always_works():
    s = torch.randn(2, 2, 3, 5, dtype=torch.float64)
    assert_close(masked_softmax(s, scale=0.3, backend="reference"), torch.softmax(s * 0.3, -1), name="ref")


def test_env_var(monkeypatch):
    s = torch.randn(1, 1, 2, 2)
    monkeypatch.setenv("FASTLAYERS_BACKEND", "masked_softmax=reference,attention=torch")
    assert backends.select("masked_softmax", scores=s).name == "reference"
    monkeypatch.setenv("FASTLAYERS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(NotImplementedError, match="interpreter"):
        masked_softmax(s)


def test_triton_refusals(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(NotImplementedError, match="S_k=9000"):
        masked_softmax(torch.randn(1, 1, 1, 9000), backend="triton")
    mask = torch.zeros(1, 1, 1, 4, requires_grad=True)
    with pytest.raises(NotImplementedError, match="mask requires grad"):
        masked_softmax(torch.randn(1, 1, 2, 4), mask, backend="triton")
    with pytest.raises(NotImplementedError, match="fp64"):
        masked_softmax(torch.randn(1, 1, 2, 4, dtype=torch.float64), backend="triton")


def test_checkpoint_saves_fewer_bytes_same_results():
    s = torch.randn(2, 3, 16, 16, requires_grad=True)
    mask = torch.zeros(2, 1, 1, 16)
    res = {}
    for ckpt in (True, False):

        def fn(ckpt=ckpt):
            return masked_softmax(s, mask, dropout_p=0.2, seed=4, checkpoint=ckpt)

        out = fn()
        (g,) = torch.autograd.grad(out, s, torch.ones_like(out))
        res[ckpt] = (out, g, saved_activation_bytes(fn, exclude=(s, mask)))
    assert torch.equal(res[True][0], res[False][0]) and torch.equal(res[True][1], res[False][1])
    n = s.numel()
    assert res[True][2] == 4 * n  # p only
    assert res[False][2] == 4 * n + n  # p + bool mask


def test_training_false_and_p0_draw_no_random_numbers():
    s = torch.randn(1, 2, 3, 4)
    state = torch.get_rng_state()
    a = masked_softmax(s, dropout_p=0.5, training=False)
    b = masked_softmax(s, dropout_p=0.0)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, torch.softmax(s, -1)) or torch.allclose(a, torch.softmax(s, -1))
    assert torch.allclose(b, torch.softmax(s, -1))


def test_keep_fraction():
    s = torch.zeros(4, 4, 64, 64)  # uniform probabilities: out = keep / (64 (1-p))
    p = 0.3
    out = masked_softmax(s, dropout_p=p, seed=8)
    frac = (out > 0).float().mean().item()
    assert abs(frac - (1 - p)) < 0.01
    assert torch.allclose(out[out > 0], torch.full((), 1 / 64 / (1 - p)))


def test_seed_none_follows_manual_seed():
    s = torch.randn(1, 2, 8, 8)
    torch.manual_seed(5)
    a = masked_softmax(s, dropout_p=0.5)
    torch.manual_seed(5)
    assert torch.equal(a, masked_softmax(s, dropout_p=0.5))


def test_torch_and_reference_share_the_mask():
    s = torch.randn(2, 2, 5, 7, dtype=torch.float64)
    a = masked_softmax(s, dropout_p=0.4, seed=3, offset=1, backend="torch")
    b = masked_softmax(s, dropout_p=0.4, seed=3, offset=1, backend="reference")
    assert_close(a, b, name="same mask")


def test_mask_gradient_on_torch_backend():
    s = torch.randn(2, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(2, 1, 1, 6, dtype=torch.float64, requires_grad=True)
    out = masked_softmax(s, mask, scale=0.5, dropout_p=0.2, seed=1, backend="torch")
    keep = keep_mask((2, 2, 4, 6), 0.2, 1, "cpu", 0)
    ref = masked_softmax_ref(s, mask, scale=0.5, dropout_p=0.2, keep_mask=keep)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (s, mask), g), torch.autograd.grad(ref, (s, mask), g), strict=True):
        assert_close(a, b, kind="bwd")


@pytest.mark.parametrize(
    "scores,mask,kw,exc,match",
    [
        (torch.randn(2, 3, 4), None, {}, ValueError, "scores must have 4 dims"),
        (torch.randn(1, 1, 2, 2).int(), None, {}, TypeError, "scores must have dtype"),
        (torch.randn(2, 1, 3, 4), torch.zeros(2, 1, 1, 5), {}, ValueError, r"mask of shape \(2, 1, 1, 5\)"),
        (torch.randn(2, 1, 3, 4), torch.zeros(3, 1, 1, 4), {}, ValueError, "not broadcastable"),
        (torch.randn(2, 1, 3, 4), torch.zeros(2, 1, 1, 4, dtype=torch.bool), {}, TypeError, "mask must have dtype"),
        (torch.randn(1, 1, 2, 2), None, {"dropout_p": 1.0}, ValueError, "dropout_p"),
        (torch.randn(1, 1, 2, 2), None, {"dropout_p": -0.5}, ValueError, "dropout_p"),
    ],
)
def test_bad_input(scores, mask, kw, exc, match):
    with pytest.raises(exc, match=match):
        masked_softmax(scores, mask, **kw)
