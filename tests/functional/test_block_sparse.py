"""block_sparse_attention: dispatch, refusal reasons, bad input, and memory linear in the kept blocks (torch)."""

import pytest
import torch

from fastlayers import backends
from fastlayers.functional.block_sparse import block_sparse_attention
from fastlayers.memory import saved_activation_bytes
from fastlayers.reference.block_sparse import block_sparse_attention_ref
from tests.tolerances import assert_close

OP = "block_sparse_attention"


def _inputs(B=1, H=2, S=64, D=16, block=16, dtype=torch.float32, requires_grad=False):
    q, k, v = (torch.randn(B, H, S, D, dtype=dtype, requires_grad=requires_grad) for _ in range(3))
    layout = (torch.rand(H, S // block, S // block) < 0.5).long()
    return q, k, v, layout


def test_cpu_default_is_torch_and_reference_always_works(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    q, k, v, layout = _inputs()
    assert backends.select(OP, None, q=q, k=k, v=v, block=16).name == "torch"
    ref = block_sparse_attention(q, k, v, layout, block=16, backend="reference")
    assert_close(block_sparse_attention(q, k, v, layout, block=16), ref)


def test_env_var_is_honoured(monkeypatch):
    q, k, v, layout = _inputs()
    monkeypatch.setenv(backends.ENV_VAR, f"{OP}=reference")
    assert backends.select(OP, None, q=q, k=k, v=v, block=16).name == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        block_sparse_attention(q, k, v, layout, block=16)


def test_triton_refusal_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v, layout = _inputs(S=48, block=8)
    with pytest.raises(NotImplementedError, match=r"block=8 not supported"):
        block_sparse_attention(q, k, v, torch.ones(2, 6, 6, dtype=torch.long), block=8, backend="triton")
    q, k, v, layout = _inputs(S=32, D=320, block=16)
    with pytest.raises(NotImplementedError, match="head dim 320"):
        block_sparse_attention(q, k, v, layout, block=16, backend="triton")
    q, k, v, layout = _inputs(dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="dtype fp64"):
        block_sparse_attention(q, k, v, layout, block=16, backend="triton")
    q, k, v, layout = _inputs(requires_grad=True)
    am = torch.zeros(64, 64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="no gradient for attn_mask"):
        block_sparse_attention(q, k, v, layout, block=16, attn_mask=am, attn_mask_mode="add", backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(NotImplementedError, match="only under the interpreter"):
        block_sparse_attention(q, k, v, layout, block=16, backend="triton")


@pytest.mark.parametrize(
    "change, err, match",
    [
        (dict(S=60), ValueError, "multiple of block=16"),
        (dict(layout=torch.ones(2, 3, 3)), ValueError, r"layout must have shape \(2, 4, 4\)"),
        (dict(layout=torch.ones(2, 4, 4)), TypeError, "layout must have dtype"),
        (dict(layout=torch.full((2, 4, 4), 2)), ValueError, "only 0 and 1"),
        (dict(block=0), ValueError, "block must be a positive int"),
        (dict(block=16.0), ValueError, "block must be a positive int"),
        (dict(k=torch.randn(1, 2, 64, 8)), ValueError, r"k must have shape \(1, 2, 64, 16\)"),
        (dict(v=torch.randn(1, 2, 64, 16, dtype=torch.float64)), TypeError, "v must have q's dtype"),
        (dict(q=torch.randn(2, 64, 16)), ValueError, "q must have 4 dims"),
        (dict(q=torch.ones(1, 2, 64, 16, dtype=torch.int32)), TypeError, "q must have dtype"),
        (dict(rpe=torch.randn(1, 2, 64, 32)), ValueError, r"rpe must have shape \(1 or 1, 2, 64, 64\)"),
        (dict(rpe=torch.randn(3, 2, 64, 64)), ValueError, "rpe must have shape"),
        (dict(rpe=torch.randn(1, 2, 64, 64, dtype=torch.float16)), TypeError, "rpe must have q's dtype"),
        (dict(key_padding_mask=torch.ones(1, 1, 1, 64)), ValueError, r"key_padding_mask must have shape \(1, 64\)"),
        (dict(key_padding_mask=torch.ones(1, 64, dtype=torch.long)), TypeError, "'add' mode must be a float"),
        (dict(attn_mask=torch.ones(64, 32)), ValueError, r"attn_mask must have shape \(64, 64\)"),
        (dict(attn_mask_mode="xor"), ValueError, "attn_mask_mode must be one of"),
        (dict(key_padding_mask_mode="mult"), ValueError, "key_padding_mask_mode must be one of"),
        (dict(softmax_scale="0.1"), TypeError, "softmax_scale must be a float"),
    ],
)
def test_bad_input_raises_before_any_kernel(change, err, match):
    S = change.pop("S", 64)
    q, k, v, layout = _inputs(S=S)
    args = dict(q=q, k=k, v=v, layout=layout, block=16)
    args.update(change)
    with pytest.raises(err, match=match):
        block_sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("layout"), backend="torch", **args)


def test_mul_mode_accepts_bool_and_int_masks():
    q, k, v, layout = _inputs(B=2)
    kpm = torch.rand(2, 64) > 0.3
    am = (torch.rand(64, 64) > 0.3).int()
    kw = dict(block=16, key_padding_mask=kpm, key_padding_mask_mode="mul", attn_mask=am)
    out = block_sparse_attention(q, k, v, layout, **kw)
    assert_close(out, block_sparse_attention_ref(q, k, v, layout, **kw))


def _torch_memory(density, rpe_grad=False, S=1024, block=32, H=4, D=32):
    torch.manual_seed(1)
    nb = S // block
    layout = (torch.rand(H, nb, nb) < density).long()
    layout[:, torch.arange(nb), torch.arange(nb)] = 1
    q, k, v = (torch.randn(1, H, S, D, requires_grad=True) for _ in range(3))
    rpe = torch.randn(1, H, S, S, requires_grad=rpe_grad)
    saved = saved_activation_bytes(
        lambda: block_sparse_attention(q, k, v, layout, block=block, rpe=rpe), exclude=(q, k, v, rpe)
    )
    return saved, float(layout.float().mean()), q.numel() * 4


def test_torch_cpu_path_saves_only_out_and_lse():
    """The CPU flash path recomputes its gathers in backward: saved bytes = out + log-sum-exps, any density."""
    small, _, q_bytes = _torch_memory(0.1)
    large, _, _ = _torch_memory(0.4)
    assert small == large
    assert q_bytes <= small <= q_bytes * (1 + 2 / 32), (small, q_bytes)  # out (B,H,S,D) + lse (B,H,S) fp32


def test_torch_autograd_path_saved_memory_scales_with_kept_blocks():
    """With rpe needing its gradient (autograd through the gathers), saved bytes grow with the kept blocks, not
    with S²: 4x the density -> about 4x the memory, far below the dense probabilities."""
    small, d_small, _ = _torch_memory(0.1, rpe_grad=True)
    large, d_large, _ = _torch_memory(0.4, rpe_grad=True)
    S, H = 1024, 4
    dense_scores = H * S * S * 4  # what a dense implementation keeps (probabilities, fp32)
    ratio = large / small
    assert 0.6 * d_large / d_small <= ratio <= 1.3 * d_large / d_small, (ratio, d_large / d_small)
    assert small < 0.5 * dense_scores, (small, dense_scores)
