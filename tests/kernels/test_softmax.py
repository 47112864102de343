"""Each masked_softmax backend (torch; triton under the interpreter) against masked_softmax_ref, fwd and bwd.

Dropout cases run the reference with the backend's own keep mask (torch: fastlayers.utils.keep_mask; triton:
the mask the forward kernel returns with return_mask=True).
"""

import pytest
import torch

from fastlayers.functional.softmax import masked_softmax
from fastlayers.reference.softmax import masked_softmax_ref
from fastlayers.utils import keep_mask
from tests.tolerances import assert_close

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]

# (B, H, S_q, S_k, mask kind); B*H*S_q <= 512 rows keeps the interpreter fast
CASES = [
    (1, 1, 1, 1, None),
    (2, 2, 7, 7, "key"),
    (1, 3, 21, 37, "full"),
    (2, 1, 37, 119, "row"),
    (1, 2, 64, 128, "2d"),
    (2, 2, 9, 21, "dead"),
    (1, 1, 3, 509, "key"),
]


def _id(c):
    return f"B{c[0]}H{c[1]}Sq{c[2]}Sk{c[3]}-{c[4]}"


def make_mask(kind, b, h, s_q, s_k):
    if kind is None:
        return None
    if kind == "key":
        m = torch.zeros(b, 1, 1, s_k)
        m[..., s_k - s_k // 3 :] = -10000.0
        return m
    if kind == "row":
        return torch.randn(b, 1, s_q, s_k)
    if kind == "full":
        return torch.randn(b, h, s_q, s_k)
    if kind == "2d":
        return torch.randn(s_q, s_k)
    if kind == "dead":  # -inf padding, row 2 of batch 0 fully masked, batch 1 fully masked
        m = torch.zeros(b, 1, s_q, s_k)
        m[0, ..., s_k - 4 :] = float("-inf")
        m[0, :, 2] = float("-inf")
        m[1:] = float("-inf")
        return m
    raise ValueError(kind)


def backend_keep(backend, scores, mask, scale, dropout_p, seed, offset):
    if backend == "triton":
        from fastlayers.kernels.triton.softmax import masked_softmax_fwd

        return masked_softmax_fwd(scores, mask, scale, dropout_p, seed, offset, return_mask=True)[2]
    return keep_mask(tuple(scores.shape), dropout_p, seed, scores.device, offset)


def run_case(backend, dtype, b, h, s_q, s_k, kind, dropout_p, checkpoint=False, seed=5, offset=0):
    scores = (torch.randn(b, h, s_q, s_k) * 3).to(dtype)
    mask = make_mask(kind, b, h, s_q, s_k)
    g = torch.randn(b, h, s_q, s_k).to(dtype)
    x = scores.clone().requires_grad_()
    out = masked_softmax(
        x, mask, scale=0.7, dropout_p=dropout_p, seed=seed, offset=offset, checkpoint=checkpoint, backend=backend
    )
    (dx,) = torch.autograd.grad(out, x, g)
    keep = backend_keep(backend, scores, mask, 0.7, dropout_p, seed, offset) if dropout_p > 0 else None
    xr = scores.clone().requires_grad_()
    ref = masked_softmax_ref(xr, mask, scale=0.7, dropout_p=dropout_p, keep_mask=keep, upcast=True)
    (dref,) = torch.autograd.grad(ref, xr, g)
    assert out.dtype == dtype and dx.dtype == dtype
    assert_close(out, ref, name="out")
    assert_close(dx, dref, kind="bwd", name="dscores")
    if kind == "dead":
        assert (out[1] == 0).all() and (out[0, :, 2] == 0).all()
        assert (dx[1] == 0).all() and (dx[0, :, 2] == 0).all()
    return out, dx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_reference(backend, dtype, case):
    run_case(backend, dtype, *case, dropout_p=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=_id)
@pytest.mark.parametrize("checkpoint", [True, False], ids=["ckpt", "keepmask"])
def test_dropout_matches_reference_with_the_backends_mask(backend, dtype, case, checkpoint):
    run_case(backend, dtype, *case, dropout_p=0.25, checkpoint=checkpoint, seed=99, offset=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_true_and_false_give_identical_results(backend):
    torch.manual_seed(1)
    a = run_case(backend, torch.float32, 2, 2, 7, 21, "key", dropout_p=0.3, checkpoint=True)
    torch.manual_seed(1)
    b = run_case(backend, torch.float32, 2, 2, 7, 21, "key", dropout_p=0.3, checkpoint=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_scores(backend):
    base = torch.randn(2, 9, 3, 12)  # (B, S_q, H, S_k): a transposed view is (B, H, S_q, S_k) with odd strides
    scores = base.transpose(1, 2)
    mask = torch.randn(2, 1, 1, 12)
    out = masked_softmax(scores, mask, scale=0.5, backend=backend)
    assert_close(out, masked_softmax_ref(scores.contiguous(), mask, scale=0.5), name="strided")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_scores_stay_nan(backend):
    scores = torch.randn(1, 1, 3, 8)
    scores[0, 0, 1, 3] = float("nan")
    out = masked_softmax(scores, backend=backend)
    assert torch.isnan(out[0, 0, 1]).all() and torch.isfinite(out[0, 0, [0, 2]]).all()
