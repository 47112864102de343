"""SparseSelfAttention / BertSparseSelfAttention vs dense attention with the layout expanded to an element mask."""

import math
from types import SimpleNamespace

import pytest
import torch

from fastlayers.nn.sparse_self_attention import BertSparseSelfAttention, SparseSelfAttention
from fastlayers.sparsity_config import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    LocalSlidingWindowSparsityConfig,
    SparsityConfig,
    VariableSparsityConfig,
)
from tests.tolerances import assert_close


def dense_reference(q, k, v, layout, block, rpe=None, kpm=None, am=None, kpm_mode="add", am_mode="mul"):
    """Dense masked attention in float64: scores outside the layout are -inf; rows with no key give zeros."""
    q, k, v = q.double(), k.double(), v.double()
    S, D = q.shape[-2], q.shape[-1]
    keep = (layout != 0).repeat_interleave(block, -2).repeat_interleave(block, -1)  # (H, S, S)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    if rpe is not None:
        scores = scores + rpe.double()

    def additive(m, mode):
        m = m.double()
        return m if mode == "add" else torch.zeros_like(m).masked_fill(m == 0, float("-inf"))

    if kpm is not None:
        scores = scores + additive(kpm.reshape(kpm.shape[0], S), kpm_mode)[:, None, None, :]
    if am is not None:
        scores = scores + additive(am.reshape(S, S), am_mode)
    scores = scores.masked_fill(~keep, float("-inf"))
    empty = torch.isinf(scores).all(-1, keepdim=True) & (scores < 0).all(-1, keepdim=True)
    p = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return p @ v


def qkv(B, H, S, D, dtype, requires_grad=True):
    return [torch.randn(B, H, S, D, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


def check_fwd_bwd(module, q, k, v, rpe=None, kpm=None, am=None, dtype=torch.float32):
    S = q.shape[2]
    out = module(q, k, v, rpe=rpe, key_padding_mask=kpm, attn_mask=am)
    layout = module.get_layout(S)
    leaves = [t for t in (q, k, v, rpe) if t is not None and t.requires_grad]
    refs_in = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (q, k, v, rpe)]
    ref = dense_reference(
        *refs_in[:3], layout, module.block, refs_in[3], kpm, am, module.key_padding_mask_mode, module.attn_mask_mode
    )
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref, dtype, "fwd", name="out")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [r for r, t in zip(refs_in, (q, k, v, rpe), strict=True) if t is not None and t.requires_grad]
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    for name, g, rg in zip("qkvr"[: len(grads)], grads, ref_grads, strict=True):
        assert_close(g, rg, dtype, "bwd", name=f"d{name}")
    return out


PATTERNS = {
    "fixed": lambda H, b: FixedSparsityConfig(num_heads=H, block=b, num_local_blocks=2),
    "fixed-uni": lambda H, b: FixedSparsityConfig(num_heads=H, block=b, num_local_blocks=2, attention="unidirectional"),
    "bigbird": lambda H, b: BigBirdSparsityConfig(
        num_heads=H, block=b, num_random_blocks=1, seed=0, different_layout_per_head=True
    ),
    "bigbird-uni": lambda H, b: BigBirdSparsityConfig(
        num_heads=H, block=b, num_random_blocks=2, seed=1, attention="unidirectional"
    ),
    "bslongformer": lambda H, b: BSLongformerSparsityConfig(num_heads=H, block=b, global_block_indices=[1]),
    "variable-uni": lambda H, b: VariableSparsityConfig(
        num_heads=H, block=b, num_random_blocks=1, seed=2, local_window_blocks=[1, 2], attention="unidirectional"
    ),
    "local-uni": lambda H, b: LocalSlidingWindowSparsityConfig(num_heads=H, block=b),
    "dense": lambda H, b: DenseSparsityConfig(num_heads=H, block=b),
}

# (pattern, block, S, head dim): blocks 16/32/64, head dims 32/64/80, non-power-of-two block counts
CASES = [
    ("fixed", 16, 96, 32),
    ("fixed-uni", 16, 80, 64),
    ("bigbird", 16, 128, 80),
    ("bigbird-uni", 32, 160, 32),
    ("bslongformer", 32, 128, 64),
    ("variable-uni", 16, 112, 80),
    ("local-uni", 64, 192, 32),
    ("dense", 64, 128, 80),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("pattern,block,S,D", CASES, ids=[f"{p}-b{b}-S{s}-D{d}" for p, b, s, d in CASES])
def test_matches_dense_masked_attention(pattern, block, S, D, dtype):
    H = 3
    module = SparseSelfAttention(PATTERNS[pattern](H, block), max_seq_length=2 * S)
    q, k, v = qkv(2, H, S, D, dtype)
    check_fwd_bwd(module, q, k, v, dtype=dtype)


def test_bf16_forward_backward():
    module = SparseSelfAttention(PATTERNS["bigbird"](2, 16), max_seq_length=128)
    q, k, v = qkv(1, 2, 64, 32, torch.bfloat16)
    check_fwd_bwd(module, q, k, v, dtype=torch.bfloat16)


@pytest.mark.parametrize("mode", ["add", "mul"])
@pytest.mark.parametrize("shape", ["B,S", "B,1,1,S"])
def test_key_padding_mask(mode, shape):
    B, H, S, D = 2, 2, 64, 32
    module = SparseSelfAttention(PATTERNS["fixed"](H, 16), key_padding_mask_mode=mode, max_seq_length=128)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, 50:] = False
    keep[1, 5:20] = False
    if mode == "add":
        kpm = torch.zeros(B, S).masked_fill(~keep, float("-inf"))
        kpm[:, :10] += torch.randn(B, 10)  # arbitrary finite additive values too
    else:
        kpm = keep.float()
    if shape == "B,1,1,S":
        kpm = kpm[:, None, None, :]
    q, k, v = qkv(B, H, S, D, torch.float32)
    out = check_fwd_bwd(module, q, k, v, kpm=kpm)
    out_without = module(q, k, v)
    assert not torch.allclose(out, out_without)  # the mask was applied


@pytest.mark.parametrize("mode", ["add", "mul"])
def test_attn_mask(mode):
    H, S = 2, 64
    module = SparseSelfAttention(PATTERNS["bslongformer"](H, 16), attn_mask_mode=mode, max_seq_length=S)
    causal = torch.ones(S, S).tril()
    am = causal if mode == "mul" else torch.zeros(S, S).masked_fill(causal == 0, float("-inf")) + 0.1 * causal
    q, k, v = qkv(2, H, S, 32, torch.float32)
    check_fwd_bwd(module, q, k, v, am=am)
    check_fwd_bwd(module, q, k, v, am=am[None, None])  # singleton dims are squeezed


@pytest.mark.parametrize("rpe_batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_rpe_and_its_gradient(rpe_batch, dtype):
    H, S = 2, 64
    module = SparseSelfAttention(PATTERNS["bigbird"](H, 16), max_seq_length=S)
    q, k, v = qkv(2, H, S, 32, dtype)
    rpe = torch.randn(rpe_batch, H, S, S, dtype=dtype, requires_grad=True)
    kpm = torch.zeros(2, S, dtype=dtype)
    kpm[1, -8:] = float("-inf")
    check_fwd_bwd(module, q, k, v, rpe=rpe, kpm=kpm, dtype=dtype)


def test_fully_masked_rows_give_zeros_not_nan():
    # local window of 1 block, unidirectional: rows of block 1 see only block 1, whose keys are all padded
    H, S = 2, 64
    module = SparseSelfAttention(
        LocalSlidingWindowSparsityConfig(num_heads=H, num_sliding_window_blocks=1), max_seq_length=S
    )
    kpm = torch.zeros(1, S)
    kpm[0, 16:32] = float("-inf")
    q, k, v = qkv(1, H, S, 32, torch.float32)
    out = check_fwd_bwd(module, q, k, v, kpm=kpm)
    assert torch.equal(out[:, :, 16:32], torch.zeros_like(out[:, :, 16:32]))
    module(q, k, v, key_padding_mask=kpm).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, 16:32], torch.zeros_like(q.grad[:, :, 16:32]))


def test_key_given_transposed_is_accepted():
    module = SparseSelfAttention(PATTERNS["fixed"](2, 16), max_seq_length=64)
    q, k, v = qkv(1, 2, 64, 32, torch.float32, requires_grad=False)
    torch.testing.assert_close(module(q, k.transpose(-1, -2).contiguous(), v), module(q, k, v))


def test_layout_is_the_top_left_slice_of_the_master_layout():
    # Fixed, 4-block windows: at 6 blocks make_layout puts the short last window's global block at column 5;
    # the master layout (8 blocks) has it at column 7, outside the slice. We use the slice (as DeepSpeed).
    cfg = FixedSparsityConfig(num_heads=2, num_local_blocks=4)
    module = SparseSelfAttention(cfg, max_seq_length=128)
    layout = module.get_layout(96)
    assert torch.equal(layout, cfg.make_layout(128)[:, :6, :6])
    assert not torch.equal(layout, cfg.make_layout(96))
    q, k, v = qkv(1, 2, 96, 32, torch.float32)
    out = module(q, k, v)
    assert_close(out, dense_reference(q, k, v, cfg.make_layout(128)[:, :6, :6], 16), torch.float32)
    # random patterns: one draw, at max_seq_length, shared by every length
    big = SparseSelfAttention(BigBirdSparsityConfig(num_heads=2, num_random_blocks=2), max_seq_length=256)
    assert torch.equal(big.get_layout(128), big.master_layout[:, :8, :8])


def test_layouts_are_cached_per_module_and_length():
    a = SparseSelfAttention(FixedSparsityConfig(num_heads=2), max_seq_length=128)
    b = SparseSelfAttention(LocalSlidingWindowSparsityConfig(num_heads=2), max_seq_length=128)
    la, lb = a.get_layout(64), b.get_layout(64)
    assert a.get_layout(64) is la  # cached: no recomputation
    assert a.get_layout(32) is not la and a.get_layout(32).shape == (2, 2, 2)
    # DeepSpeed's class-wide cache (keyed by length only) would give b the layout of a
    assert not torch.equal(la, lb)
    q, k, v = qkv(1, 2, 64, 32, torch.float32, requires_grad=False)
    assert_close(a(q, k, v), dense_reference(q, k, v, la, 16), torch.float32)
    assert_close(b(q, k, v), dense_reference(q, k, v, lb, 16), torch.float32)


def test_master_layout_in_state_dict_and_reloaded():
    make = lambda seed: SparseSelfAttention(
        BigBirdSparsityConfig(num_heads=2, num_random_blocks=2, seed=seed), max_seq_length=256
    )
    src, dst = make(1), make(2)
    assert "master_layout" in src.state_dict()
    before = dst.get_layout(128).clone()
    assert not torch.equal(before, src.get_layout(128))
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.get_layout(128), src.get_layout(128))  # cache dropped on load


def test_errors_name_the_values():
    module = SparseSelfAttention(FixedSparsityConfig(num_heads=2), max_seq_length=128)
    with pytest.raises(ValueError, match=r"\b144\b.*max_seq_length=128"):
        module(*qkv(1, 2, 144, 16, torch.float32, False))
    with pytest.raises(ValueError, match=r"\b72\b.*\b16\b"):
        module(*qkv(1, 2, 72, 16, torch.float32, False))
    with pytest.raises(ValueError, match=r"3 heads.*num_heads=2"):
        module(*qkv(1, 3, 64, 16, torch.float32, False))
    q, k, v = qkv(1, 2, 64, 16, torch.float32, False)
    with pytest.raises(NotImplementedError, match="self-attention"):
        module(q, k, v[..., :8])
    with pytest.raises(ValueError, match="key_padding_mask"):
        module(q, k, v, key_padding_mask=torch.zeros(1, 2, 64))
    with pytest.raises(ValueError, match="attn_mask"):
        module(q, k, v, attn_mask=torch.ones(64, 32))
    with pytest.raises(ValueError, match="key_padding_mask_mode"):
        SparseSelfAttention(FixedSparsityConfig(num_heads=2), key_padding_mask_mode="or")


def test_default_sparsity_config_gives_a_clear_error():
    with pytest.raises(NotImplementedError, match="abstract SparsityConfig.*FixedSparsityConfig"):
        SparseSelfAttention()
    with pytest.raises(NotImplementedError, match="FixedSparsityConfig"):
        SparseSelfAttention(SparsityConfig(num_heads=2))


def test_to_block_mask():
    pytest.importorskip("torch.nn.attention.flex_attention")
    module = SparseSelfAttention(BigBirdSparsityConfig(num_heads=2, seed=0), max_seq_length=128)
    assert torch.equal(module.to_block_mask(64).to_dense()[0].long(), module.get_layout(64))


# --- BertSparseSelfAttention (HF-free: a config namespace) ----------------------------------------------------------


def bert_config(hidden=64, heads=4, max_pos=128):
    return SimpleNamespace(hidden_size=hidden, num_attention_heads=heads, max_position_embeddings=max_pos)


def test_bert_sparse_self_attention_matches_dense():
    cfg = bert_config()
    module = BertSparseSelfAttention(cfg, BigBirdSparsityConfig(num_heads=4, seed=0))
    x = torch.randn(2, 64, 64)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, 40:] = False
    out, weights = module(x, attention_mask=mask[:, None, None, :])
    assert weights is None and out.shape == (2, 64, 64)
    split = lambda t: t.view(2, 64, 4, 16).transpose(1, 2)
    q, k, v = split(module.query(x)), split(module.key(x)), split(module.value(x))
    kpm = torch.zeros(2, 64).masked_fill(~mask, float("-inf"))
    ref = dense_reference(q, k, v, module.sparse_self_attention.get_layout(64), 16, kpm=kpm)
    assert_close(out, ref.transpose(1, 2).reshape(2, 64, 64), torch.float32)
    # the same key padding given as HF's (B, 1, S, S) float mask, a (B, S) keep-mask, or a DeepSpeed additive mask
    hf = torch.zeros(2, 1, 64, 64).masked_fill(~mask[:, None, None, :], torch.finfo(torch.float32).min)
    for m in (hf, mask.long(), kpm[:, None, None, :], mask[:, None, :, None].expand(2, 1, 64, 64).transpose(-1, -2)):
        assert_close(module(x, attention_mask=m)[0], out, torch.float32, atol=1e-6, rtol=1e-6)


def test_bert_sparse_self_attention_errors():
    with pytest.raises(ValueError, match=r"The hidden size \(66\) is not a multiple of the number of attention heads"):
        BertSparseSelfAttention(bert_config(hidden=66), FixedSparsityConfig(num_heads=4))
    with pytest.raises(ValueError, match=r"num_heads \(4\).*num_attention_heads \(8\)"):
        BertSparseSelfAttention(bert_config(heads=8))
    module = BertSparseSelfAttention(bert_config(), FixedSparsityConfig(num_heads=4))
    x = torch.randn(1, 32, 64)
    with pytest.raises(ValueError, match="key-padding masks only"):
        module(x, attention_mask=torch.zeros(1, 1, 32, 32).masked_fill(torch.ones(32, 32).triu(1) > 0, -1e4))
    with pytest.raises(NotImplementedError, match="self-attention"):
        module(x, encoder_hidden_states=x)


def test_bert_max_seq_length_follows_the_config():
    assert BertSparseSelfAttention(bert_config()).sparse_self_attention.max_seq_length == 2048
    module = BertSparseSelfAttention(bert_config(max_pos=4098), FixedSparsityConfig(num_heads=4, block=32))
    assert module.sparse_self_attention.max_seq_length == 4128


def test_random_layout_is_taken_from_rank_0(monkeypatch):
    # under torch.distributed every rank uses rank 0's master layout (random blocks would differ per rank)
    module = SparseSelfAttention(BigBirdSparsityConfig(num_heads=2, num_random_blocks=2, seed=1), max_seq_length=128)
    rank0 = BigBirdSparsityConfig(num_heads=2, num_random_blocks=2, seed=2).make_layout(128)
    calls = []

    def broadcast(tensor, src):
        calls.append(src)
        tensor.copy_(rank0)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "broadcast", broadcast)
    assert torch.equal(module.get_layout(128), rank0)
    module.get_layout(64)
    assert calls == [0]  # once, on first use


@pytest.mark.interpreter
def test_triton_backend_under_the_interpreter():
    pytest.importorskip("triton")
    from fastlayers.utils import triton_interpret

    if not (torch.cuda.is_available() or triton_interpret()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = SparseSelfAttention(PATTERNS["bigbird-uni"](2, 16), max_seq_length=64, backend="triton").to(device)
    q, k, v = (t.to(device).detach().requires_grad_() for t in qkv(1, 2, 64, 16, torch.float32))
    rpe = torch.randn(1, 2, 64, 64, device=device, requires_grad=True)
    kpm = torch.zeros(64, device=device)
    kpm[-5:] = float("-inf")
    check_fwd_bwd(module, q, k, v, rpe=rpe, kpm=kpm[None, None, None, :])
