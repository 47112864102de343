"""block_sparse_attention_ref against SDPA with the dense mask; float64 gradcheck on tiny shapes."""

import pytest
import torch
import torch.nn.functional as F

from fastlayers.reference.block_sparse import (
    block_sparse_attention_ref,
    dense_mask_and_bias,
    layout_to_dense_mask,
    mask_to_additive,
)
from tests.tolerances import assert_close


def test_layout_to_dense_mask_expands_blocks():
    layout = torch.tensor([[[1, 0], [0, 1]], [[0, 1], [1, 1]]])
    m = layout_to_dense_mask(layout, 3)
    assert m.shape == (2, 6, 6) and m.dtype == torch.bool
    for h in range(2):
        for i in range(6):
            for j in range(6):
                assert bool(m[h, i, j]) == bool(layout[h, i // 3, j // 3])
    assert torch.equal(layout_to_dense_mask(layout[0].bool(), 2), layout_to_dense_mask(layout[0], 2))


def test_mask_modes():
    m = torch.tensor([0.0, 1.0, 2.5])
    assert torch.equal(mask_to_additive(m, "mul", torch.float32), torch.tensor([float("-inf"), 0.0, 0.0]))
    assert torch.equal(mask_to_additive(m, "add", torch.float32), m)
    with pytest.raises(ValueError, match="mask mode"):
        mask_to_additive(m, "xor", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [4, 16])
def test_matches_sdpa_with_dense_mask(dtype, block):
    B, H, S, D = 2, 3, 64, 16
    nb = S // block
    layout = (torch.rand(H, nb, nb) < 0.4).long()
    layout[:, torch.arange(nb), torch.arange(nb)] = 1  # no empty row: SDPA and ref agree everywhere
    q, k, v = (torch.randn(B, H, S, D, dtype=dtype) for _ in range(3))
    rpe = torch.randn(1, H, S, S, dtype=dtype)
    kpm = torch.randn(B, S, dtype=dtype)
    am = (torch.rand(S, S) > 0.2).to(dtype)
    am[torch.arange(S), torch.arange(S)] = 1
    out = block_sparse_attention_ref(
        q, k, v, layout, block=block, softmax_scale=0.3, rpe=rpe, key_padding_mask=kpm, attn_mask=am
    )
    bias = dense_mask_and_bias(layout, block, S, dtype=dtype) + rpe + kpm[:, None, None, :]
    bias = bias.masked_fill(am == 0, float("-inf"))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)
    assert_close(out, expected, dtype)


def test_empty_rows_give_zeros_and_zero_grads():
    B, H, S, D, block = 1, 2, 32, 8, 8
    layout = torch.ones(H, 4, 4, dtype=torch.long)
    layout[0, 1] = 0  # head 0, query block 1: no key
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kpm = torch.ones(B, S)
    am = torch.ones(S, S)
    am[20] = 0  # query row 20 fully masked by attn_mask ("mul")
    out = block_sparse_attention_ref(
        q, k, v, layout, block=block, key_padding_mask=kpm, key_padding_mask_mode="mul", attn_mask=am
    )
    assert torch.isfinite(out).all()
    assert out[0, 0, 8:16].abs().max() == 0 and out[0, :, 20].abs().max() == 0
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(dq).all() and dq[0, 0, 8:16].abs().max() == 0 and dq[0, :, 20].abs().max() == 0


def test_gradcheck_float64():
    B, H, S, D, block = 1, 2, 8, 4, 2
    layout = torch.tensor([[[1, 0, 0, 1], [1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]]] * 2)
    layout[1, 2, 0] = 1
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rpe = torch.randn(1, H, S, S, dtype=torch.float64, requires_grad=True)
    kpm = torch.randn(B, S, dtype=torch.float64)

    def f(q, k, v, rpe):
        return block_sparse_attention_ref(q, k, v, layout, block=block, rpe=rpe, key_padding_mask=kpm)

    assert torch.autograd.gradcheck(f, (q, k, v, rpe))


def test_upcast_fp16_close_to_fp32():
    B, H, S, D, block = 1, 2, 32, 16, 16
    layout = torch.ones(H, 2, 2, dtype=torch.long)
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    ref = block_sparse_attention_ref(q, k, v, layout, block=block)
    out = block_sparse_attention_ref(q.half(), k.half(), v.half(), layout, block=block, upcast=True)
    assert out.dtype == torch.float16
    assert_close(out, ref, torch.float16)
