"""Each attention backend (torch; triton under the interpreter) against attention_ref, forward and backward.

Dropout cases run the reference with the backend's own keep mask (torch: fastlayers.utils.keep_mask; triton:
`attention_dropout_mask`, which evaluates the kernel's tl.rand stream).
"""

import pytest
import torch

from fastlayers.functional.attention import attention
from fastlayers.reference.attention import attention_ref
from fastlayers.utils import keep_mask
from tests.tolerances import assert_close, assert_close_to_reference

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]

# (B, H, S_q, S_k, D, bias kind, causal); B*H <= 4 and S <= 128 keep the interpreter fast
CASES = [
    (1, 2, 1, 1, 16, None, False),
    (2, 2, 7, 7, 16, "key", False),
    (1, 3, 21, 37, 64, "full", False),
    (2, 1, 37, 37, 80, "row", True),
    (1, 2, 119, 119, 64, "2d", False),
    (2, 2, 21, 21, 32, "dead", False),
    (1, 1, 119, 119, 128, "pad10000", True),
    (1, 2, 37, 21, 64, None, True),
]


def _case_id(c):
    b, h, s_q, s_k, d, bias, causal = c
    return f"B{b}H{h}Sq{s_q}Sk{s_k}D{d}-{bias}" + ("-causal" if causal else "")


def make_bias(kind, b, h, s_q, s_k, dtype):
    if kind is None:
        return None
    if kind == "key":
        return torch.randn(b, 1, 1, s_k, dtype=dtype)
    if kind == "row":
        return torch.randn(b, 1, s_q, s_k, dtype=dtype)
    if kind == "full":
        return torch.randn(b, h, s_q, s_k, dtype=dtype)
    if kind == "2d":
        return torch.randn(s_q, s_k, dtype=dtype)
    if kind == "pad10000":  # BERT-style padding: last keys get -10000
        bias = torch.zeros(b, 1, 1, s_k, dtype=dtype)
        bias[..., s_k - 5 :] = -10000.0
        return bias
    if kind == "dead":  # padding with -inf, plus fully masked rows (batch 1 entirely, batch 0 rows 3 and 4)
        bias = torch.zeros(b, 1, s_q, s_k, dtype=dtype)
        bias[0, :, :, s_k - 4 :] = float("-inf")
        bias[0, :, 3:5] = float("-inf")
        bias[1:] = float("-inf")
        return bias
    raise ValueError(kind)


def backend_keep(backend, shape, dropout_p, seed, offset):
    if backend == "triton":
        from fastlayers.kernels.triton.attention import attention_dropout_mask

        return attention_dropout_mask(*shape, dropout_p, seed, offset, torch.device("cpu"))
    return keep_mask(shape, dropout_p, seed, "cpu", offset)


def run(backend, q, k, v, dout, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, backend=backend, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def reference(q, k, v, dout, upcast, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attention_ref(q, k, v, upcast=upcast, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def check_against_reference(backend, dtype, b, h, s_q, s_k, d, bias_kind, causal, dropout_p, seed=1234, offset=0):
    q = torch.randn(b, s_q, h, d).to(dtype)
    k, v = torch.randn(2, b, s_k, h, d).to(dtype)
    dout = torch.randn(b, s_q, h, d).to(dtype)
    bias = make_bias(bias_kind, b, h, s_q, s_k, torch.float32)
    bias = bias.to(dtype) if bias is not None else None
    kw = dict(attn_bias=bias, softmax_scale=None, causal=causal, dropout_p=dropout_p)
    got = run(backend, q, k, v, dout, seed=seed, offset=offset, **kw)
    keep = backend_keep(backend, (b, h, s_q, s_k), dropout_p, seed, offset) if dropout_p > 0 else None
    if dtype == torch.float32:
        want = reference(q, k, v, dout, False, keep_mask=keep, **kw)
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
            assert_close(g, w, kind="fwd" if name == "out" else "bwd", name=name)
    else:  # flash-attn's relative rule against an fp32 reference and the fp16 reference
        want32 = reference(q, k, v, dout, True, keep_mask=keep, **kw)
        want16 = reference(q, k, v, dout, False, keep_mask=keep, **kw)
        for name, g, w32, w16 in zip(("out", "dq", "dk", "dv"), got, want32, want16, strict=True):
            assert g.dtype == dtype
            assert_close_to_reference(g, w32, w16, atol=2e-3, name=name)
    if bias_kind == "dead":
        out, dq = got[0], got[1]
        assert (out[1] == 0).all() and (out[0, 3:5] == 0).all(), "fully masked rows must give zeros"
        assert (dq[1] == 0).all() and (dq[0, 3:5] == 0).all(), "fully masked rows must give zero dq"
        assert (got[2][1] == 0).all() and (got[3][1] == 0).all(), "a fully masked batch gives zero dk, dv"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(backend, dtype, case):
    check_against_reference(backend, dtype, *case, dropout_p=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4], CASES[5]], ids=_case_id)
def test_dropout_matches_reference_with_the_backends_mask(backend, dtype, case):
    check_against_reference(backend, dtype, *case, dropout_p=0.2, seed=77, offset=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_qkv_views(backend):
    b, s, h, d = 2, 21, 2, 32
    qkv = torch.randn(b, s, 3, h, d)
    q, k, v = qkv.unbind(2)  # (B, S, H, D) views with stride 3*H*D along S
    dout = torch.randn(b, s, h, d)
    got = run(backend, q, k, v, dout)
    want = reference(q.contiguous(), k.contiguous(), v.contiguous(), dout, False)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close(g, w, kind="fwd" if name == "out" else "bwd", name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_result_and_offset_changes_mask(backend):
    q, k, v = torch.randn(3, 1, 16, 2, 16)
    a = attention(q, k, v, dropout_p=0.5, seed=5, backend=backend)
    assert torch.equal(a, attention(q, k, v, dropout_p=0.5, seed=5, backend=backend))
    assert not torch.equal(a, attention(q, k, v, dropout_p=0.5, seed=5, offset=1, backend=backend))
    assert not torch.equal(a, attention(q, k, v, dropout_p=0.5, seed=6, backend=backend))


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_torch_long_odd_sequence(dropout_p):
    # S = 509 (prime), D = 80; too big for the interpreter, cheap for the torch backend
    check_against_reference("torch", torch.float32, 1, 2, 509, 509, 80, "pad10000", True, dropout_p=dropout_p)


@pytest.mark.interpreter
def test_triton_dropout_mask_keep_fraction():
    from fastlayers.kernels.triton.attention import attention_dropout_mask

    keep = attention_dropout_mask(2, 2, 64, 128, 0.3, 123, 0, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (2, 2, 64, 128)
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    assert not torch.equal(keep[0, 0], keep[0, 1]), "each head draws its own stream"
    other = attention_dropout_mask(2, 2, 64, 128, 0.3, 123, 1, torch.device("cpu"))
    assert (keep != other).float().mean().item() > 0.2, "the offset changes the mask"
