"""Block-sparse layouts: DeepSpeed 0.19.6 as the oracle for the deterministic patterns, DeepSpeed's rules for the
random blocks, golden small cases, validation errors, block-index and FlexAttention BlockMask converters."""

import itertools
import warnings

import pytest
import torch

from fastlayers import sparsity_config as fl
from fastlayers.sparsity_config import (
    BigBirdSparsityConfig,
    BSLongformerSparsityConfig,
    DenseSparsityConfig,
    FixedSparsityConfig,
    LocalSlidingWindowSparsityConfig,
    SparsityConfig,
    VariableSparsityConfig,
    block_indices_to_layout,
    layout_to_block_indices,
    layout_to_dense_mask,
    to_block_mask,
)


@pytest.fixture(scope="module")
def ds():
    return pytest.importorskip("deepspeed.ops.sparse_attention.sparsity_config")


def _assert_same_as_deepspeed(ds, name, kwargs, seq_lens):
    for S in seq_lens:
        want = getattr(ds, name)(**kwargs).make_layout(S)
        got = getattr(fl, name)(**kwargs).make_layout(S)
        assert got.dtype == torch.int64 and got.shape == want.shape, (name, kwargs, S)
        assert torch.equal(got, want), f"{name}({kwargs}).make_layout({S}) differs from DeepSpeed:\n{got}\n{want}"


def _fixed_grid(full: bool):
    heads = [1, 3] if full else [3]
    local = [1, 2, 3, 4, 6] if full else [2, 4, 6]
    for H, block, dlh, nl, ng, att, hor, ndgp in itertools.product(
        heads,
        [16, 32] if full else [16],
        [False, True],
        local,
        [1, 2, 3],
        ["bidirectional", "unidirectional"],
        [False, True],
        [1, 2, 3],
    ):
        if nl % ng or (att == "unidirectional" and hor) or (ndgp > 1 and not dlh) or ndgp > nl // ng:
            continue
        yield dict(
            num_heads=H,
            block=block,
            different_layout_per_head=dlh,
            num_local_blocks=nl,
            num_global_blocks=ng,
            attention=att,
            horizontal_global_attention=hor,
            num_different_global_patterns=ndgp,
        )


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["grid", "full-grid"])
def test_fixed_matches_deepspeed(ds, full):
    # seq lengths give 1..13 blocks: short last windows of every size, windows longer than the sequence
    for kw in _fixed_grid(full):
        blocks = (1, 3, 4, 5, 7, 8, 13) if full else (3, 5, 8, 13)
        _assert_same_as_deepspeed(ds, "FixedSparsityConfig", kw, [kw["block"] * n for n in blocks])


def test_variable_deterministic_matches_deepspeed(ds):
    for dlh, lw, gi, ends, att, hor in itertools.product(
        [False, True],
        [[4], [1, 2], [2, 3, 1], [5]],
        [[0], [1, 5], [0, 3, 9]],
        [False, True],
        ["bidirectional", "unidirectional"],
        [False, True],
    ):
        if att == "unidirectional" and hor:
            continue
        kw = dict(
            num_heads=2,
            block=16,
            different_layout_per_head=dlh,
            local_window_blocks=lw,
            global_block_indices=gi,
            global_block_end_indices=[g + 2 for g in gi] if ends else None,
            attention=att,
            horizontal_global_attention=hor,
        )
        _assert_same_as_deepspeed(ds, "VariableSparsityConfig", kw, [16 * n for n in (1, 4, 7, 13)])


@pytest.mark.parametrize("attention", ["bidirectional", "unidirectional"])
def test_window_patterns_match_deepspeed(ds, attention):
    seq = [16 * n for n in (7, 8, 13)]
    for dlh, w in itertools.product([False, True], [0, 1, 2, 3, 5, 7]):
        kw = dict(
            num_heads=2,
            different_layout_per_head=dlh,
            num_random_blocks=0,
            num_sliding_window_blocks=w,
            num_global_blocks=2,
            attention=attention,
        )
        _assert_same_as_deepspeed(ds, "BigBirdSparsityConfig", kw, seq)
        for gi, ge in [([0], None), ([1, 5], None), ([0, 4], [2, 6]), ([3, 20], [5, 30])]:
            kw = dict(
                num_heads=2,
                different_layout_per_head=dlh,
                num_sliding_window_blocks=w,
                global_block_indices=gi,
                global_block_end_indices=ge,
                attention=attention,
            )
            _assert_same_as_deepspeed(ds, "BSLongformerSparsityConfig", kw, seq)
        _assert_same_as_deepspeed(
            ds,
            "LocalSlidingWindowSparsityConfig",
            dict(num_heads=2, num_sliding_window_blocks=w, attention=attention),
            seq,
        )
        _assert_same_as_deepspeed(ds, "DenseSparsityConfig", dict(num_heads=2, different_layout_per_head=dlh), seq)


def test_defaults_match_deepspeed(ds):
    for name in [
        "DenseSparsityConfig",
        "FixedSparsityConfig",
        "VariableSparsityConfig",
        "BSLongformerSparsityConfig",
        "LocalSlidingWindowSparsityConfig",
    ]:
        _assert_same_as_deepspeed(ds, name, dict(num_heads=4), [256])
    ours, theirs = BigBirdSparsityConfig(num_heads=4), ds.BigBirdSparsityConfig(num_heads=4)
    for attr in [
        "block",
        "different_layout_per_head",
        "num_random_blocks",
        "num_sliding_window_blocks",
        "num_global_blocks",
        "attention",
    ]:
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert LocalSlidingWindowSparsityConfig(num_heads=4).attention == "unidirectional"


# --- golden small cases (block 16, 4 heads; head 0 shown) ---------------------------------------------------------

GOLDEN = [
    (
        FixedSparsityConfig(num_heads=4, num_local_blocks=2),
        5,
        [
            [1, 1, 0, 1, 1],
            [1, 1, 0, 1, 1],
            [0, 1, 1, 1, 1],
            [0, 1, 1, 1, 1],
            [0, 1, 0, 1, 1],
        ],
    ),
    (
        FixedSparsityConfig(num_heads=4, num_local_blocks=2, attention="unidirectional"),
        5,
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 1, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 1, 0, 1, 1],
        ],
    ),
    (
        BSLongformerSparsityConfig(num_heads=4, global_block_indices=[2]),
        5,
        [
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1],
            [0, 0, 1, 1, 1],
        ],
    ),
    (
        LocalSlidingWindowSparsityConfig(num_heads=4, num_sliding_window_blocks=5),
        5,
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
    ),
    (
        VariableSparsityConfig(num_heads=4, local_window_blocks=[1, 2], global_block_indices=[3]),
        5,
        [
            [1, 0, 0, 1, 0],
            [0, 1, 1, 1, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 0, 1, 1],
            [0, 0, 0, 1, 1],
        ],
    ),
    (
        BigBirdSparsityConfig(num_heads=4, num_random_blocks=0, attention="unidirectional"),
        4,
        [
            [1, 0, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [1, 0, 1, 1],
        ],
    ),
]


@pytest.mark.parametrize("cfg,nb,want", GOLDEN, ids=[type(c).__name__ + str(i) for i, (c, _, _) in enumerate(GOLDEN)])
def test_golden(cfg, nb, want):
    layout = cfg.make_layout(16 * nb)
    assert layout.shape == (4, nb, nb) and layout.dtype == torch.int64
    for h in range(4):  # one shared layout
        assert layout[h].tolist() == want


def test_fixed_different_global_patterns_per_head():
    layout = FixedSparsityConfig(
        num_heads=3, num_local_blocks=4, different_layout_per_head=True, num_different_global_patterns=3
    ).make_layout(16 * 8)
    # head h: global column 3 - h of each window of 4 is attended by every row
    for h in range(3):
        full_cols = [c for c in range(8) if bool(layout[h, :, c].all())]
        assert full_cols == [3 - h, 7 - h]


# --- random blocks: DeepSpeed's rules, torch.Generator reproducibility --------------------------------------------


def _random_part(cfg, seq_len, seed):
    """Replay make_layout's random draws: the random component alone, before the union."""
    g = torch.Generator().manual_seed(seed)
    rand = cfg.setup_layout(seq_len)
    for h in range(cfg.num_layout_heads):
        cfg.set_random_layout(h, rand, g)
    return cfg.check_and_propagate_first_head_layout(rand)


RANDOM_CASES = [
    (VariableSparsityConfig, dict(num_random_blocks=2, local_window_blocks=[2, 3], global_block_indices=[0, 5])),
    (VariableSparsityConfig, dict(num_random_blocks=3, different_layout_per_head=True)),
    (BigBirdSparsityConfig, dict(num_random_blocks=2)),
    (BigBirdSparsityConfig, dict(num_random_blocks=3, different_layout_per_head=True, num_sliding_window_blocks=5)),
]


@pytest.mark.parametrize("cls,kw", RANDOM_CASES, ids=lambda x: getattr(x, "__name__", None) or str(x))
def test_random_blocks_follow_deepspeed_rules(ds, cls, kw):
    S, nb, seed = 16 * 12, 12, 1234
    cfg = cls(num_heads=4, seed=seed, **kw)
    layout = cfg.make_layout(S)
    rand = _random_part(cfg, S, seed)
    # exactly num_random_blocks distinct random columns in every row of every computed head
    assert torch.equal(rand.sum(-1), torch.full((4, nb), kw["num_random_blocks"]))
    # the deterministic part is DeepSpeed's layout without random blocks
    det = getattr(ds, cls.__name__)(num_heads=4, **{**kw, "num_random_blocks": 0}).make_layout(S)
    assert torch.equal(layout, torch.maximum(rand, det))
    # heads differ only with different_layout_per_head
    same = all(torch.equal(layout[0], layout[h]) for h in range(4))
    assert same != kw.get("different_layout_per_head", False)


@pytest.mark.parametrize("cls", [VariableSparsityConfig, BigBirdSparsityConfig])
def test_random_blocks_reproducible(cls):
    make = lambda seed: cls(num_heads=2, num_random_blocks=2, seed=seed).make_layout(256)
    assert torch.equal(make(7), make(7))
    assert not torch.equal(make(7), make(8))
    cfg = cls(num_heads=2, num_random_blocks=2)  # seed=None: torch's global RNG
    torch.manual_seed(3)
    a = cfg.make_layout(256)
    b = cfg.make_layout(256)
    torch.manual_seed(3)
    assert torch.equal(cfg.make_layout(256), a)
    assert not torch.equal(a, b)


def test_variable_unidirectional_random_blocks_are_causal():
    # DeepSpeed samples the random blocks from the whole row, putting future blocks into a unidirectional layout
    cfg = VariableSparsityConfig(
        num_heads=2, num_random_blocks=3, attention="unidirectional", seed=0, different_layout_per_head=True
    )
    layout = cfg.make_layout(16 * 10)
    assert torch.equal(layout, torch.tril(layout))
    rand = _random_part(cfg, 16 * 10, 0)
    counts = rand.sum(-1)
    assert torch.equal(counts, torch.clamp(torch.arange(1, 11), max=3).expand(2, 10))


def test_bigbird_unidirectional_more_random_blocks_than_early_rows():
    # DeepSpeed: ValueError "Sample larger than population" for rows with fewer than num_random_blocks causal blocks
    cfg = BigBirdSparsityConfig(
        num_heads=2,
        num_random_blocks=4,
        num_global_blocks=0,
        num_sliding_window_blocks=0,
        attention="unidirectional",
        seed=5,
    )
    layout = cfg.make_layout(16 * 8)
    assert torch.equal(layout, torch.tril(layout))
    rand = _random_part(cfg, 16 * 8, 5)
    assert torch.equal(rand[0].sum(-1), torch.tensor([1, 2, 3, 4, 4, 4, 4, 4]))  # early rows: every causal block
    assert torch.equal(layout, torch.maximum(rand, torch.eye(8, dtype=torch.int64)))  # window 0 = the diagonal


def test_random_column_distribution_is_uniform():
    cfg = BigBirdSparsityConfig(
        num_heads=1, num_random_blocks=1, num_sliding_window_blocks=0, num_global_blocks=0, seed=0
    )
    counts = _random_part(cfg, 16 * 400, 0)[0].sum(0).double()  # 400 rows, one random column each
    assert counts.sum() == 400
    assert counts.max() <= 7  # a biased sampler (e.g. always column 0 or the diagonal) would pile up
    assert torch.equal(
        cfg.make_layout(16 * 400), torch.maximum(_random_part(cfg, 16 * 400, 0), torch.eye(400, dtype=torch.int64))
    )


# --- validation -----------------------------------------------------------------------------------------------------

INVALID = [
    ("FixedSparsityConfig", dict(num_local_blocks=4, num_global_blocks=3), ValueError, r"\(4\).*\(3\)"),
    ("FixedSparsityConfig", dict(attention="sideways"), NotImplementedError, "sideways"),
    (
        "FixedSparsityConfig",
        dict(attention="unidirectional", horizontal_global_attention=True),
        ValueError,
        "horizontal_global_attention.*bidirectional",
    ),
    ("FixedSparsityConfig", dict(num_different_global_patterns=2), ValueError, "different_layout_per_head"),
    (
        "FixedSparsityConfig",
        dict(different_layout_per_head=True, num_different_global_patterns=5),
        ValueError,
        r"\(5\).*4 / 1 = 4",
    ),
    ("VariableSparsityConfig", dict(global_block_end_indices=[1, 2]), ValueError, "1 entries.*2"),
    ("VariableSparsityConfig", dict(global_block_indices=[3], global_block_end_indices=[2]), ValueError, "3.*2"),
    ("VariableSparsityConfig", dict(attention="sideways"), NotImplementedError, "sideways"),
    (
        "VariableSparsityConfig",
        dict(attention="unidirectional", horizontal_global_attention=True),
        ValueError,
        "horizontal_global_attention.*bidirectional",
    ),
    ("BigBirdSparsityConfig", dict(attention="sideways"), NotImplementedError, "sideways"),
    ("BSLongformerSparsityConfig", dict(global_block_end_indices=[1, 2]), ValueError, "1 entries.*2"),
    ("BSLongformerSparsityConfig", dict(global_block_indices=[3], global_block_end_indices=[2]), ValueError, "3.*2"),
]

INVALID_AT_LAYOUT = [
    ("VariableSparsityConfig", dict(num_random_blocks=5)),
    ("BigBirdSparsityConfig", dict(num_random_blocks=5)),
    ("BigBirdSparsityConfig", dict(num_sliding_window_blocks=5)),
    ("BigBirdSparsityConfig", dict(num_global_blocks=5)),
    ("BSLongformerSparsityConfig", dict(num_sliding_window_blocks=5)),
    ("LocalSlidingWindowSparsityConfig", dict(num_sliding_window_blocks=5)),
]


@pytest.mark.parametrize("name,kw,exc,match", INVALID, ids=[f"{n}-{k}" for n, k, _, _ in INVALID])
def test_invalid_parameters_raise_like_deepspeed(ds, name, kw, exc, match):
    with pytest.raises(exc):
        getattr(ds, name)(num_heads=4, **kw)
    with pytest.raises(exc, match=match):  # same exception type, message names the offending values
        getattr(fl, name)(num_heads=4, **kw)


@pytest.mark.parametrize("name,kw", INVALID_AT_LAYOUT, ids=[f"{n}-{k}" for n, k in INVALID_AT_LAYOUT])
def test_too_many_blocks_for_the_sequence(ds, name, kw):
    with pytest.raises(ValueError):
        getattr(ds, name)(num_heads=4, **kw).make_layout(64)
    with pytest.raises(ValueError, match=r"\(5\).*\(4\)"):
        getattr(fl, name)(num_heads=4, **kw).make_layout(64)
    getattr(fl, name)(num_heads=4, **kw).make_layout(80)  # 5 blocks: fits


@pytest.mark.parametrize("attention", ["sideways", "causal"])
def test_window_configs_validate_attention(attention):
    # DeepSpeed silently treats an unknown string as bidirectional here
    with pytest.raises(NotImplementedError, match=attention):
        BSLongformerSparsityConfig(num_heads=2, attention=attention)
    with pytest.raises(NotImplementedError, match=attention):
        LocalSlidingWindowSparsityConfig(num_heads=2, attention=attention)


def test_seq_len_not_divisible_names_both():
    for cfg in [DenseSparsityConfig(num_heads=2), FixedSparsityConfig(num_heads=2, block=32)]:
        with pytest.raises(ValueError, match=rf"\b100\b.*\b{cfg.block}\b"):
            cfg.make_layout(100)


def test_abstract_config_make_layout_names_subclasses():
    with pytest.raises(NotImplementedError, match="FixedSparsityConfig.*BigBirdSparsityConfig"):
        SparsityConfig(num_heads=4).make_layout(64)


def test_custom_subclass_with_base_helpers():
    class Diagonal(SparsityConfig):
        def make_layout(self, seq_len):
            layout = self.setup_layout(seq_len)
            for h in range(self.num_layout_heads):
                layout[h] = torch.eye(layout.shape[1], dtype=layout.dtype)
            return self.check_and_propagate_first_head_layout(layout)

    layout = Diagonal(num_heads=3, block=8).make_layout(32)
    assert torch.equal(layout, torch.eye(4, dtype=torch.int64).expand(3, 4, 4))


def test_repr():
    a = VariableSparsityConfig(num_heads=2, local_window_blocks=(1, 2), seed=3)
    assert a.local_window_blocks == [1, 2]  # stored as a list, as DeepSpeed
    assert repr(a).startswith("VariableSparsityConfig(num_heads=2, block=16,")
    assert "local_window_blocks=[1, 2]" in repr(a) and "seed=3" in repr(a)


# --- converters -----------------------------------------------------------------------------------------------------


def _layouts():
    return [
        BigBirdSparsityConfig(num_heads=3, num_random_blocks=2, seed=0, different_layout_per_head=True).make_layout(
            128
        ),
        FixedSparsityConfig(num_heads=2, num_local_blocks=3, attention="unidirectional").make_layout(16 * 7),
        LocalSlidingWindowSparsityConfig(num_heads=1).make_layout(16 * 5),
    ]


def test_layout_to_dense_mask():
    layout = _layouts()[1]
    mask = layout_to_dense_mask(layout, 16)
    H, nb, _ = layout.shape
    assert mask.shape == (H, nb * 16, nb * 16) and mask.dtype == torch.bool
    for h, i, j in itertools.product(range(H), range(nb * 16), range(0, nb * 16, 7)):
        assert bool(mask[h, i, j]) == bool(layout[h, i // 16, j // 16])


def test_block_indices_round_trip():
    for layout in _layouts():
        num, idx = layout_to_block_indices(layout)
        assert num.dtype == torch.int32 and idx.dtype == torch.int32 and idx.shape == layout.shape
        assert torch.equal(num.long(), layout.sum(-1))
        for h, i in itertools.product(range(layout.shape[0]), range(layout.shape[1])):
            kept = idx[h, i, : num[h, i]].tolist()
            assert kept == sorted(kept) == layout[h, i].nonzero().flatten().tolist()
            assert sorted(idx[h, i].tolist()) == list(range(layout.shape[2]))  # a permutation of the columns
        assert torch.equal(block_indices_to_layout(num, idx), layout)


@pytest.mark.parametrize("with_mask_mod", [False, True])
def test_to_block_mask_round_trips(with_mask_mod):
    pytest.importorskip("torch.nn.attention.flex_attention")
    causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
    for layout in _layouts():
        bm = to_block_mask(layout, 16, mask_mod=causal if with_mask_mod else None)
        H, nb, _ = layout.shape
        assert bm.shape == (1, H, nb * 16, nb * 16) and bm.BLOCK_SIZE == (16, 16)
        assert torch.equal(bm.to_dense()[0].long(), layout)
        # the full-block form lists every layout block as full; the mask_mod form as partial
        assert (bm.full_kv_num_blocks is None) == with_mask_mod
    batched = torch.stack(_layouts()[:1] * 2)  # (B, H, nq, nkv)
    assert torch.equal(to_block_mask(batched, 16).to_dense().long(), batched)
    cfg = FixedSparsityConfig(num_heads=2)
    assert torch.equal(cfg.to_block_mask(128).to_dense()[0].long(), cfg.make_layout(128))


def test_to_block_mask_matches_create_block_mask_and_attention():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from fastlayers.kernels.torch.flex import layout_mask_mod

    layout = _layouts()[0]  # (3, 8, 8)
    ref_bm = flex.create_block_mask(layout_mask_mod(layout, 16), 1, 3, 128, 128, device="cpu", BLOCK_SIZE=16)
    assert torch.equal(to_block_mask(layout, 16).to_dense(), ref_bm.to_dense())
    # eager flex_attention on CPU (tiny): the BlockMask gives the dense masked attention
    q, k, v = (torch.randn(2, 3, 128, 16) for _ in range(3))
    dense = layout_to_dense_mask(layout, 16)
    causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex.flex_attention(q, k, v, block_mask=to_block_mask(layout, 16))
        out_causal = flex.flex_attention(q, k, v, block_mask=to_block_mask(layout, 16, mask_mod=causal))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    ref_causal = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=dense & torch.ones(128, 128, dtype=torch.bool).tril()
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_causal, ref_causal, atol=1e-5, rtol=1e-5)
