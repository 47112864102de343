"""The torch backend's CPU band path (band views + full rows + extra blocks, merged through log-sum-exps).

Checks the decomposition itself (every kept block is computed exactly once; band detection never claims a
block the layout drops), the lse merge, and fwd + bwd against the reference for BigBird, unidirectional and
uneven layouts in fp32 / fp16 / float64, in one step and in many small steps; plus the dispatch: masks and rpe
take the grouped path.
"""

import pytest
import torch

from fastlayers.functional.block_sparse import block_sparse_attention
from fastlayers.kernels.torch import block_sparse as kt
from fastlayers.reference.block_sparse import block_sparse_attention_ref
from fastlayers.sparsity_config import BigBirdSparsityConfig, LocalSlidingWindowSparsityConfig
from tests.tolerances import assert_close, assert_fwd_bwd_close

CPU = torch.device("cpu")


def _coverage(bp: kt.BandPlan, H: int, block: int = 16) -> torch.Tensor:
    """How many times the band path computes each block (H, nb, nb), read off the calls it actually makes."""
    nb = bp.num_blocks
    S = nb * block
    count = torch.zeros(H, nb, nb, dtype=torch.long)
    x = torch.zeros(H, S, 1)

    def blocks(r: kt.Rows, t: int) -> list[int]:
        lo = r.start + t * r.step
        assert lo % block == 0 and r.length % block == 0
        return list(range(lo // block, (lo + r.length) // block))

    for p in kt._band_parts(x, x, x, bp, block, H, 0, H):
        for t in range(p.qrows.count):
            qb = blocks(p.qrows, t)
            if isinstance(p.kv, kt.Rows):
                kb = [[j] * H for j in blocks(p.kv, t)]
            elif p.kv[0] == "gcols":
                kb = [[j] * H for j in sorted(set((p.kv[1] // block).tolist()))]
            else:  # extra: flat ids bh·nb + j, (H, nb, E) per query block
                ids = p.kv[1].view(H, nb, -1) % nb
                kb = [ids[:, qb[0], e].tolist() for e in range(ids.shape[-1])]
            for a, i in enumerate(qb):
                for e, js in enumerate(kb):
                    for h, j in enumerate(js):
                        if p.mask is not None and bool(p.mask[h, t, 0, e * block].isinf()):  # extra padding slot
                            continue
                        if p.empty is not None and bool(p.empty[h, t, a * block]):
                            continue
                        count[h, i, j] += 1
    if bp.rest is not None:
        for g in bp.rest.groups:
            valid = torch.ones_like(g.kvblocks, dtype=torch.bool) if g.valid is None else g.valid
            for n in range(g.kvblocks.shape[0]):
                for r in g.qblocks[n].tolist():
                    count[g.heads[n], r, g.kvblocks[n][valid[n]]] += 1
    return count


def bigbird(H, S, block, bidirectional=True, globals_=1, randoms=1, window=3):
    cfg = BigBirdSparsityConfig(
        num_heads=H,
        block=block,
        num_random_blocks=randoms,
        num_sliding_window_blocks=window,
        num_global_blocks=globals_,
        different_layout_per_head=True,
        attention="bidirectional" if bidirectional else "unidirectional",
        seed=1,
    )
    return cfg.make_layout(S)


def uneven(H, nb):
    """Band of width 1 both ways, a global row kept in one head only, one row with many extra blocks (the extra
    blocks are too uneven for one padded call: grouped rest), an extra block in one head only."""
    layout = torch.zeros(H, nb, nb, dtype=torch.long)
    for i in range(nb):
        layout[:, i, max(0, i - 1) : i + 2] = 1
    layout[0, 2] = 1
    layout[:, 5, 7 : nb - 1] = 1
    layout[-1, nb - 1, 0] = 1
    return layout


def window_uni(H, S, block):
    return LocalSlidingWindowSparsityConfig(
        num_heads=H, block=block, num_sliding_window_blocks=3, attention="unidirectional"
    ).make_layout(S)


def split_globals(H, nb):
    """Band of width 1 and two non-contiguous global columns: the rows near them keep them as extra blocks."""
    layout = torch.zeros(H, nb, nb, dtype=torch.long)
    for i in range(nb):
        layout[:, i, max(0, i - 1) : i + 2] = 1
    layout[:, :, [2, nb - 3]] = 1
    layout[0, 4, nb // 2] = 1
    return layout


LAYOUTS = {
    "split-globals": lambda H, nb, block: split_globals(H, nb),
    "bigbird": lambda H, nb, block: bigbird(H, nb * block, block),
    "bigbird-2globals-2random": lambda H, nb, block: bigbird(H, nb * block, block, globals_=2, randoms=2),
    "bigbird-unidirectional": lambda H, nb, block: bigbird(H, nb * block, block, bidirectional=False),
    "window-unidirectional": lambda H, nb, block: window_uni(H, nb * block, block),
    "uneven": lambda H, nb, block: uneven(H, nb),
    "wide-band": lambda H, nb, block: torch.ones(H, nb, nb, dtype=torch.long),  # band covers all: no interior
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_band_plan_covers_every_kept_block_once(name):
    H, nb = 3, 14
    layout = LAYOUTS[name](H, nb, 16)
    bp = kt.build_band_plan(layout, CPU)
    assert bp is not None
    assert torch.equal(_coverage(bp, H), (layout != 0).long())


def test_band_plan_parts():
    bp = kt.build_band_plan(bigbird(4, 16 * 16, 16), CPU)
    assert (bp.wl, bp.wr, bp.full_rows, bp.rest) == (1, 1, [0], None) and bp.extra_width >= 1
    assert (bp.gcols, bp.gcol_ranges) == ([0], [(2, 16)])  # rows 0 (full) and 1 (band) have column 0 already
    bp = kt.build_band_plan(bigbird(2, 16 * 16, 16, globals_=2), CPU)
    assert (bp.full_rows, bp.gcols, bp.gcol_ranges) == ([0, 1], [0, 1], [(3, 16)])
    bp = kt.build_band_plan(window_uni(2, 16 * 16, 16), CPU)
    assert (bp.wl, bp.wr, bp.full_rows, bp.extra_width, bp.rest) == (1, 0, [], 0, None)  # window 3: 1 back
    bp = kt.build_band_plan(split_globals(2, 12), CPU)
    assert (bp.gcols, bp.gcol_ranges) == ([2, 9], [(0, 1), (4, 8), (11, 12)])
    bp = kt.build_band_plan(uneven(2, 12), CPU)
    assert (bp.wl, bp.wr, bp.extra_width) == (1, 1, 0) and bp.rest is not None


def test_band_detection_does_not_misfire():
    H, nb = 2, 10
    eye = torch.eye(nb, dtype=torch.long).expand(H, nb, nb).clone()
    band = eye.clone()
    for i in range(nb - 1):
        band[:, i, i + 1] = band[:, i + 1, i] = 1
    holed = band.clone()
    holed[1, 4, 4] = 0  # one head misses one diagonal block: no band at all
    assert kt.build_band_plan(holed, CPU) is None
    one_side = band.clone()
    one_side[0, 6, 5] = 0  # one head misses one sub-diagonal block: the band is [i, i+1] only
    bp = kt.build_band_plan(one_side, CPU)
    assert (bp.wl, bp.wr) == (0, 1)
    assert torch.equal(_coverage(bp, H), one_side)
    anti = torch.flip(eye, dims=[-1])  # anti-diagonal: no band
    assert kt.build_band_plan(anti, CPU) is None
    dense_off = torch.ones(H, nb, nb, dtype=torch.long).triu(2) + eye  # diagonal only, most blocks elsewhere
    assert kt.build_band_plan(dense_off, CPU) is None  # band share below BAND_MIN_SHARE: grouped path
    for seed in range(20):  # random layouts with a diagonal: whatever is detected is exact
        g = torch.Generator().manual_seed(seed)
        layout = ((torch.rand(H, nb, nb, generator=g) < 0.6) | torch.eye(nb, dtype=torch.bool)).long()
        bp = kt.build_band_plan(layout, CPU)
        if bp is not None:
            assert torch.equal(_coverage(bp, H), layout)


def _ref_lse(q, k, layout, block, scale):
    B, H, S, D = q.shape
    keep = (layout != 0).repeat_interleave(block, 1).repeat_interleave(block, 2)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    return s.masked_fill(~keep, float("-inf")).logsumexp(-1)


@pytest.mark.parametrize("step_bytes", [1, 1 << 30], ids=["step1", "onestep"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_band_lse_merge(monkeypatch, name, step_bytes):
    """The merged log-sum-exp equals the dense one over the kept blocks (the saved statistic of the backward)."""
    monkeypatch.setattr(kt, "BAND_STEP_BYTES", step_bytes)
    B, H, nb, block, D = 2, 3, 10, 16, 16
    layout = LAYOUTS[name](H, nb, block)
    bp = kt.build_band_plan(layout, CPU)
    q, k, v = (torch.randn(B, H, nb * block, D, dtype=torch.float64) for _ in range(3))
    out, lse = kt.band_attention_cpu_fwd(q, k, v, bp, block, 0.3)
    assert_close(lse, _ref_lse(q, k, layout, block, 0.3).to(lse.dtype), torch.float64)
    assert_close(out, block_sparse_attention_ref(q, k, v, layout, block=block, softmax_scale=0.3), torch.float64)


@pytest.mark.parametrize("step_bytes", [1, 1 << 30], ids=["step1", "onestep"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=["fp32", "fp16", "fp64"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_band_path_matches_reference(monkeypatch, name, dtype, step_bytes):
    monkeypatch.setattr(kt, "BAND_STEP_BYTES", step_bytes)
    B, H, nb, block, D = 2, 3, 10, 16, 32
    layout = LAYOUTS[name](H, nb, block)
    assert kt.get_band_plan(layout, CPU) is not None
    q, k, v = (torch.randn(B, H, nb * block, D, dtype=dtype, requires_grad=True) for _ in range(3))
    out = block_sparse_attention(q, k, v, layout, block=block, backend="torch")
    assert type(out.grad_fn).__name__ == "BlockSparseAttentionTorchFunctionBackward"
    ref = block_sparse_attention_ref(q, k, v, layout, block=block, upcast=True)
    assert_fwd_bwd_close(out, ref, [q, k, v], dtype)


def test_band_path_noncontiguous_inputs_and_scale():
    B, H, nb, block, D = 1, 2, 8, 16, 16
    layout = bigbird(H, nb * block, block)
    base = torch.randn(B, nb * block, H, D, 3)
    q, k, v = (base[..., i].transpose(1, 2).requires_grad_() for i in range(3))  # (B, H, S, D), strided
    out = block_sparse_attention(q, k, v, layout, block=block, backend="torch", softmax_scale=0.7)
    ref = block_sparse_attention_ref(q, k, v, layout, block=block, softmax_scale=0.7)
    assert_close(out, ref, torch.float32)
    got = torch.autograd.grad(out.square().sum(), [q, k, v])
    want = torch.autograd.grad(ref.square().sum(), [q, k, v])
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, torch.float32, "bwd")


@pytest.mark.parametrize("feature", ["kpm", "am", "rpe"])
def test_biases_take_the_grouped_path(monkeypatch, feature):
    """The band path applies only without rpe and masks; with one, the grouped path runs (same maths): a masked
    row (every key removed) still gives zeros and zero gradients."""
    calls = []
    monkeypatch.setattr(kt, "band_attention_cpu_fwd", lambda *a, **kw: calls.append(a))
    B, H, nb, block, D = 2, 2, 8, 16, 16
    S = nb * block
    layout = bigbird(H, S, block)
    q, k, v = (torch.randn(B, H, S, D, requires_grad=True) for _ in range(3))
    kw = {
        "kpm": {"key_padding_mask": (torch.arange(S) < S - 20).long().expand(B, S), "key_padding_mask_mode": "mul"},
        "am": {"attn_mask": torch.ones(S, S).index_fill_(0, torch.tensor([3, 40]), 0), "attn_mask_mode": "mul"},
        "rpe": {"rpe": torch.randn(1, H, S, S)},
    }[feature]
    out = block_sparse_attention(q, k, v, layout, block=block, backend="torch", **kw)
    assert calls == []
    ref = block_sparse_attention_ref(q, k, v, layout, block=block, **kw)
    got = assert_fwd_bwd_close(out, ref, [q, k, v], torch.float32)
    if feature == "am":
        assert out[:, :, [3, 40]].abs().max() == 0 and got[0][:, :, [3, 40]].abs().max() == 0


def test_band_path_saves_only_out_and_lse():
    from fastlayers.memory import saved_activation_bytes

    B, H, nb, block, D = 1, 2, 16, 16, 32
    layout = bigbird(H, nb * block, block)
    q, k, v = (torch.randn(B, H, nb * block, D, requires_grad=True) for _ in range(3))
    saved = saved_activation_bytes(lambda: block_sparse_attention(q, k, v, layout, block=block), exclude=(q, k, v))
    assert saved == q.numel() * 4 + B * H * nb * block * 4  # out + lse, fp32


def _extra_layout(H: int, nb: int, kind: str) -> torch.Tensor:
    layout = torch.zeros(H, nb, nb, dtype=torch.long)
    for i in range(nb):
        layout[:, i, max(0, i - 1) : i + 2] = 1
        if kind == "some-rows-none" and i % 3:
            layout[:, i, (i + 5) % nb] = 1
        if kind == "some-rows-short":
            layout[:, i, (i + 5) % nb] = 1
            if i % 2:
                layout[:, i, (i + 8) % nb] = 1
    return layout


@pytest.mark.parametrize("kind", ["some-rows-none", "some-rows-short"])
def test_extra_padding_slots(kind):
    """some-rows-none: one extra slot per row, some rows with none (their padding slot, the diagonal block, gets
    lse -inf / +inf): no mask is built. some-rows-short: E = 2 and rows with one extra block: the short rows'
    second slot is masked. Either way no block counts twice, forward or backward."""
    H, nb, block, D = 2, 12, 16, 16
    layout = _extra_layout(H, nb, kind)
    bp = kt.build_band_plan(layout, CPU)
    if kind == "some-rows-none":
        assert bp.extra_width == 1 and bp.extra_valid is None and bp.extra_empty is not None
    else:
        assert bp.extra_width == 2 and bp.extra_valid is not None
    q, k, v = (torch.randn(2, H, nb * block, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = block_sparse_attention(q, k, v, layout, block=block, backend="torch")
    ref = block_sparse_attention_ref(q, k, v, layout, block=block)
    assert_fwd_bwd_close(out, ref, [q, k, v], torch.float64)
