"""Each block_sparse_attention backend (torch; triton under the interpreter) against the reference, fwd + bwd.

Layouts are random with some empty rows (no kept block) and some full rows; masks cover key padding and
attn_mask in both modes, rpe (with its gradient) and rows that every mask removes (zeros, zero grads).
"""

import pytest
import torch

from fastlayers.functional.block_sparse import block_sparse_attention
from fastlayers.reference.block_sparse import block_sparse_attention_ref
from tests.tolerances import assert_close, assert_fwd_bwd_close

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]

# (B, H, S, D, block, features); B*H <= 2 and S <= 128 keep the interpreter fast
CASES = [
    (1, 2, 64, 32, 16, ""),
    (2, 1, 64, 64, 16, "rpe"),
    (1, 2, 128, 80, 32, "kpm_add+am_mul"),
    (2, 1, 128, 64, 64, "kpm_mul+am_add+rpe"),
    (1, 1, 128, 32, 16, "dead+rpe1"),
    (1, 2, 128, 64, 32, "kpm_mul+rpe1"),
]


def _case_id(c):
    b, h, s, d, block, feats = c
    return f"B{b}H{h}S{s}D{d}blk{block}-{feats or 'plain'}"


def make_layout(h, nb, density=0.35):
    layout = (torch.rand(h, nb, nb) < density).long()
    layout[0, :, 0] = 1  # a global column
    layout[0, 1] = 0  # an empty row: zeros out
    layout[-1, -1] = 1  # a full row (BigBird-style global row)
    return layout


def make_inputs(case, dtype):
    B, H, S, D, block, feats = case
    q, k, v = (torch.randn(B, H, S, D, dtype=dtype, requires_grad=True) for _ in range(3))
    kw = {}
    if "rpe" in feats:
        rpe = torch.randn(1 if "rpe1" in feats else B, H, S, S, dtype=dtype, requires_grad=True)
        kw["rpe"] = rpe
    if "kpm_add" in feats:
        kw["key_padding_mask"] = torch.randn(B, S, dtype=dtype)
        kw["key_padding_mask_mode"] = "add"
    if "kpm_mul" in feats:
        kpm = (torch.rand(B, S) > 0.25).to(dtype)
        kpm[-1, S // 2 :] = 0  # BERT-style padding at the end of the last sequence
        kw["key_padding_mask"] = kpm
        kw["key_padding_mask_mode"] = "mul"
    if "am_mul" in feats:
        am = (torch.rand(S, S) > 0.2).long()
        am[3] = 0  # query row 3 sees no key at all
        kw["attn_mask"] = am
        kw["attn_mask_mode"] = "mul"
    if "am_add" in feats:
        kw["attn_mask"] = torch.randn(S, S, dtype=dtype)
        kw["attn_mask_mode"] = "add"
    if "dead" in feats:  # every key masked for batch row 0 in rows 5..9 (and the layout's empty row)
        am = torch.ones(S, S)
        am[5:10] = 0
        kw["attn_mask"] = am
        kw["attn_mask_mode"] = "mul"
    return q, k, v, kw


def _check(backend, case, dtype, layout=None):
    B, H, S, D, block, feats = case
    layout = make_layout(H, S // block) if layout is None else layout
    q, k, v, kw = make_inputs(case, dtype)
    out = block_sparse_attention(q, k, v, layout, block=block, backend=backend, **kw)
    ref = block_sparse_attention_ref(q, k, v, layout, block=block, upcast=True, **kw)
    grads_of = [q, k, v] + ([kw["rpe"]] if "rpe" in kw else [])
    return out, assert_fwd_bwd_close(out, ref, grads_of, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, case, dtype):
    _check(backend, case, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero_with_zero_grads(backend):
    case = (1, 2, 64, 32, 16, "dead")
    layout = make_layout(2, 4)
    out, (dq, dk, dv) = _check(backend, case, torch.float32, layout)
    assert out[0, :, 5:10].abs().max() == 0 and dq[0, :, 5:10].abs().max() == 0
    assert out[0, 0, 16:32].abs().max() == 0 and dq[0, 0, 16:32].abs().max() == 0  # layout's empty row


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["empty", "full", "diag"])
def test_extreme_layouts(backend, kind):
    H, nb, block = 2, 4, 16
    layout = {
        "empty": torch.zeros(H, nb, nb, dtype=torch.long),
        "full": torch.ones(H, nb, nb, dtype=torch.bool),
        "diag": torch.eye(nb, dtype=torch.int32).expand(H, nb, nb).contiguous(),
    }[kind]
    out, _ = _check(backend, (1, H, nb * block, 16, block, ""), torch.float32, layout)
    if kind == "empty":
        assert out.abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_128_and_noncontiguous_inputs(backend):
    B, H, S, D, block = 1, 2, 128, 32, 128
    layout = torch.ones(H, 1, 1, dtype=torch.long)
    base = torch.randn(B, S, H, D, 3)
    q, k, v = (base[..., i].transpose(1, 2).requires_grad_() for i in range(3))  # (B, H, S, D), strided
    out = block_sparse_attention(q, k, v, layout, block=block, backend=backend, softmax_scale=0.5)
    ref = block_sparse_attention_ref(q, k, v, layout, block=block, softmax_scale=0.5)
    assert_close(out, ref, torch.float32)
    dq, dk = torch.autograd.grad(out.square().sum(), [q, k])
    rdq, rdk = torch.autograd.grad(ref.square().sum(), [q, k])
    assert_close(dq, rdq, torch.float32, "bwd")
    assert_close(dk, rdk, torch.float32, "bwd")


def test_torch_float64_and_layout_cache_sees_in_place_edits():
    B, H, S, D, block = 1, 2, 64, 16, 16
    layout = make_layout(H, S // block)
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64) for _ in range(3))
    out = block_sparse_attention(q, k, v, layout, block=block, backend="torch")
    assert_close(out, block_sparse_attention_ref(q, k, v, layout, block=block), torch.float64)
    layout[1] = 1 - layout[1]  # same tensor, new content: the cached plan must not be reused
    out = block_sparse_attention(q, k, v, layout, block=block, backend="torch")
    assert_close(out, block_sparse_attention_ref(q, k, v, layout, block=block), torch.float64)


@pytest.mark.parametrize("block", [16, 32, 64])
def test_torch_varied_row_counts(block):
    """Rows with 1..nb kept blocks (many groups), the BigBird pattern (global rows + window) and the Fixed
    pattern (rows of a window share their key blocks: merged into one SDPA entry), with every bias."""
    H, nb = 3, 8
    S = nb * block
    layout = torch.zeros(H, nb, nb, dtype=torch.long)
    for i in range(nb):
        layout[0, i, : i + 1] = 1  # causal: every count from 1 to nb
        layout[1, i, max(0, i - 1) : i + 2] = 1  # window
        layout[2, i, (i // 3) * 3 : (i // 3) * 3 + 3] = 1  # windows of 3 blocks (the last one short)
    layout[1, 0] = 1
    layout[1, :, 0] = 1
    layout[2, :, 2] = 1  # a global column
    _check("torch", (2, H, S, 32, block, "kpm_mul+am_add+rpe"), torch.float32, layout)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("d", [16, 40, 64, 128])
def test_torch_sweep(block, d, dtype):
    S = 256 if block < 128 else 512
    _check("torch", (2, 3, S, d, block, "kpm_mul+am_add+rpe"), dtype)


def test_torch_cpu_fast_path_with_constant_biases():
    """rpe and masks that need no gradient go through the CPU flash path (custom Function), grads still exact."""
    case = (2, 2, 128, 32, 32, "kpm_mul+am_add")
    layout = make_layout(2, 4)
    q, k, v, kw = make_inputs(case, torch.float32)
    kw["rpe"] = torch.randn(1, 2, 128, 128)
    out = block_sparse_attention(q, k, v, layout, block=32, backend="torch", **kw)
    if q.device.type == "cpu":
        assert type(out.grad_fn).__name__ == "BlockSparseAttentionTorchFunctionBackward"
    ref = block_sparse_attention_ref(q, k, v, layout, block=32, **kw)
    assert_fwd_bwd_close(out, ref, [q, k, v], torch.float32)


@pytest.mark.parametrize("chunk_bytes", [1, 40_000])
def test_torch_cpu_fast_path_in_chunks(monkeypatch, chunk_bytes):
    """Groups split into many SDPA calls (one entry each, or a few) give the same result and gradients."""
    from fastlayers.kernels.torch import block_sparse as kt

    monkeypatch.setattr(kt, "CHUNK_BYTES", chunk_bytes)
    H, nb, block = 2, 8, 16
    layout = make_layout(H, nb, density=0.5)
    layout[1, :, 2] = 1
    layout[1, 4:6] = 0
    layout[1, 4:6, 4:6] = 1  # two identical rows: one merged entry
    q, k, v, kw = make_inputs((2, H, nb * block, 32, block, "kpm_mul"), torch.float32)
    out = block_sparse_attention(q, k, v, layout, block=block, backend="torch", **kw)
    ref = block_sparse_attention_ref(q, k, v, layout, block=block, **kw)
    assert_fwd_bwd_close(out, ref, [q, k, v], torch.float32)
