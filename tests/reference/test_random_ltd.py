"""Random-LTD references (token gather / scatter / gather gradient, sampling, mask gathering) against torch
built-ins and DeepSpeed's formulas written out, plus a float64 gradcheck."""

import pytest
import torch

from fastlayers.reference.tokens import (
    gather_mask_ref,
    sample_token_indices,
    token_gather_grad_ref,
    token_gather_ref,
    token_scatter_ref_,
)
from tests.tolerances import assert_close

LAYOUTS = [True, False]
IDX_DTYPES = [torch.int32, torch.int64]


def _indices(b, s, r, dtype=torch.int64):
    return torch.stack([torch.randperm(s)[:r].sort().values for _ in range(b)]).to(dtype)


def _act(b, s, c, batch_first, dtype=torch.float64):
    return torch.randn((b, s, c) if batch_first else (s, b, c), dtype=dtype)


@pytest.mark.parametrize("batch_first", LAYOUTS, ids=["bsc", "sbc"])
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=["i32", "i64"])
def test_token_gather_ref_matches_torch_gather(batch_first, idx_dtype):
    b, s, r, c = 3, 11, 5, 7
    x, idx = _act(b, s, c, batch_first), _indices(b, s, r, idx_dtype)
    out = token_gather_ref(x, idx, batch_first)
    xb = x if batch_first else x.transpose(0, 1)  # (B, S, C)
    want = torch.gather(xb, 1, idx.long()[:, :, None].expand(b, r, c))  # (B, R, C)
    assert torch.equal(out, want if batch_first else want.transpose(0, 1))
    assert out.shape == ((b, r, c) if batch_first else (r, b, c))
    out.zero_()  # a new tensor, not a view of x
    assert x.abs().sum() > 0


@pytest.mark.parametrize("batch_first", LAYOUTS, ids=["bsc", "sbc"])
@pytest.mark.parametrize("idx_dtype", IDX_DTYPES, ids=["i32", "i64"])
def test_token_scatter_ref_matches_index_copy(batch_first, idx_dtype):
    b, s, r, c = 3, 11, 5, 7
    x, idx = _act(b, s, c, batch_first), _indices(b, s, r, idx_dtype)
    part = _act(b, r, c, batch_first)
    want = (x if batch_first else x.transpose(0, 1)).clone()
    pb = part if batch_first else part.transpose(0, 1)
    for i in range(b):
        want[i].index_copy_(0, idx[i].long(), pb[i])
    got = token_scatter_ref_(x, part, idx, batch_first)
    assert got is x
    assert torch.equal(x if batch_first else x.transpose(0, 1), want)


@pytest.mark.parametrize("batch_first", LAYOUTS, ids=["bsc", "sbc"])
def test_token_gather_ref_gradcheck(batch_first):
    x = _act(2, 6, 3, batch_first).requires_grad_()
    idx = torch.tensor([[0, 2, 2, 5], [1, 3, 4, 4]])  # repeated positions: the gradient must add up

    def fn(t):
        return token_gather_ref(t, idx, batch_first)

    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("batch_first", LAYOUTS, ids=["bsc", "sbc"])
def test_token_gather_grad_ref_is_index_add_and_matches_autograd(batch_first):
    b, s, c = 2, 7, 4
    x = _act(b, s, c, batch_first).requires_grad_()
    idx = torch.tensor([[1, 1, 6], [0, 3, 5]])
    out = token_gather_ref(x, idx, batch_first)
    g = torch.randn_like(out)
    (want,) = torch.autograd.grad(out, x, g)
    got = token_gather_grad_ref(g, idx, s, batch_first)
    assert_close(got, want, kind="bwd", name="dact")
    gb, dx = (g, got) if batch_first else (g.transpose(0, 1), got.transpose(0, 1))
    assert_close(dx[0, 1], gb[0, 0] + gb[0, 1], kind="bwd", name="repeated position: sum")
    assert torch.equal(dx[0, 0], torch.zeros(c, dtype=dx.dtype))  # dropped position: zero


def test_sample_token_indices_is_deepspeeds_draw_sorted():
    torch.manual_seed(7)
    got = sample_token_indices(5, 13, 3, layers=2)
    torch.manual_seed(7)
    # dropping_utils.gpt_sample_tokens: multinomial without replacement, reshape, int32, then token_sort_
    ds = torch.multinomial(torch.ones(2 * 3, 13), num_samples=5, replacement=False).reshape(2, 3, 5).to(torch.int32)
    assert got.dtype == torch.int32 and got.shape == (2, 3, 5)
    assert torch.equal(got, ds.sort(dim=-1).values)
    assert (got[..., 1:] > got[..., :-1]).all()


def _ds_bert_mask(mask, idx):
    """DeepSpeed bert_sample_tokens' per-layer mask: per sequence, rows then columns (mask has batch B)."""
    return torch.cat([mask[i : i + 1, :, idx[i], :][:, :, :, idx[i]] for i in range(idx.shape[0])], dim=0)


@pytest.mark.parametrize("heads", [1, 2])
def test_gather_mask_ref_matches_deepspeed_rows_and_columns(heads):
    b, s, r = 3, 10, 4
    mask = torch.randn(b, heads, s, s)
    idx = _indices(b, s, r, torch.int32)
    got = gather_mask_ref(mask, idx)
    assert got.shape == (b, heads, r, r)
    assert torch.equal(got, _ds_bert_mask(mask, idx.long()))


def test_gather_mask_ref_shared_batch_and_key_padding():
    b, s, r = 3, 9, 4
    idx = _indices(b, s, r)
    shared = torch.randint(0, 2, (1, 1, s, s)).bool()
    assert torch.equal(gather_mask_ref(shared, idx), _ds_bert_mask(shared.expand(b, 1, s, s), idx))
    pad = torch.randn(b, 1, 1, s)  # key-padding mask: only the key columns are gathered
    got = gather_mask_ref(pad, idx)
    assert got.shape == (b, 1, 1, r)
    for i in range(b):
        assert torch.equal(got[i, 0, 0], pad[i, 0, 0, idx[i]])
