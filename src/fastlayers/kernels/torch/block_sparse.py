"""Block-sparse attention in plain PyTorch: only the kept blocks are computed; memory is linear in their number.

Design (measured on CPU, docs/cpu-baselines.md §2): the query blocks (rows of the layout, over all heads) are
grouped by how many key blocks they keep; rows of one head that keep exactly the same key blocks (the rows of a
Fixed window, say) are merged first into one entry of m query blocks. For each group, the query blocks and their
key/value blocks are gathered with one `index_select` each, and one `F.scaled_dot_product_attention` call runs
with the (entry × batch) pairs folded into SDPA's batch dims: queries (B, n, m·block, D) against keys
(B, n, C·block, D), where C is the group's (padded) block count. Padding slots, masks and rpe enter as a
small per-group mask of shape (·, n, m·block|1, C·block). Rows of very different lengths (BigBird's global
rows attend everything) fall into different groups, so nothing of size S×S is built. Rows that keep no block
give zeros.

Three ways to run it:
- `block_sparse_attention_fwd`: composed of differentiable ops (autograd gives the backward: SDPA's own for
  q, k, v; gather/scatter for rpe and the masks). Any device; used when rpe or a mask needs its gradient.
- `block_sparse_attention_cpu_fwd` / `_cpu_bwd`: CPU helpers around ATen's CPU flash-attention kernels, in
  chunks of at most CHUNK_BYTES of gathered keys, writing outputs and gradients in place; they save only
  out and the log-sum-exps (the gathers are redone in the backward). Biases are constants there.
- `band_attention_cpu_fwd` / `_cpu_bwd` (CPU, no rpe or mask, layouts with a diagonal band holding at least
  BAND_MIN_SHARE of the kept blocks, see `build_band_plan`): the band runs on overlapping strided views of K/V
  (no gather), full rows and global columns on slices, the remaining blocks in one padded call (or the grouped
  path); the parts are merged through their log-sum-exps, and the backward reuses the final out and lse.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastlayers.utils import LayoutCache

# Rows whose block counts differ by at most this factor share one SDPA call (padding waste <= 25 %).
GROUP_RATIO = 1.25
_CACHE_SIZE = 16


@dataclass
class RowGroup:
    """Sets of query blocks that share one SDPA call. One entry ("super-row") holds the m query blocks of a head
    whose kept key blocks are identical (e.g. the rows of one Fixed window), so SDPA sees m·block queries."""

    rows: torch.Tensor  # (n·m,) int64 flat query-block ids h·nb + i, entry-major
    heads: torch.Tensor  # (n,) int64 h
    qblocks: torch.Tensor  # (n, m) int64 i
    kvblocks: torch.Tensor  # (n, C) int64 key-block ids j (padding slots repeat a kept id)
    kv_flat: torch.Tensor  # (n·C,) int64 flat ids h·nb + j
    valid: torch.Tensor | None  # (n, C) bool, None when every slot is a kept block
    width: int  # C
    m: int  # query blocks per entry


@dataclass
class BlockSparsePlan:
    """Everything derived from (layout, device) once: row groups and the order to put rows back."""

    num_heads: int
    num_blocks: int
    groups: list[RowGroup]
    num_empty: int  # rows with no kept block (they give zeros)
    empty_rows: torch.Tensor  # (num_empty,) their flat ids h·nb + i
    inv_perm: torch.Tensor  # (H·nb,) position of row h·nb+i in the concatenation [groups..., empty rows]
    num_kept: int  # kept blocks


def _group_counts(counts: list[int]) -> list[tuple[int, int]]:
    """Split sorted distinct positive counts into [lo, hi] ranges with hi <= GROUP_RATIO·lo."""
    ranges: list[tuple[int, int]] = []
    for c in counts:
        if ranges and c <= GROUP_RATIO * ranges[-1][0]:
            ranges[-1] = (ranges[-1][0], c)
        else:
            ranges.append((c, c))
    return ranges


def build_plan(layout: torch.Tensor, device: torch.device) -> BlockSparsePlan:
    """Merge identical rows of each head into super-rows, then group super-rows by (rows merged, kept count)."""
    keep = layout.detach().to("cpu") != 0  # (H, nb, nb)
    H, nb, _ = keep.shape
    col = torch.arange(nb)
    # super-rows: (head, unique row pattern) -> member query blocks
    sr_head, sr_members, sr_pattern = [], [], []
    for h in range(H):
        uniq, inverse = torch.unique(keep[h], dim=0, return_inverse=True)  # (U, nb), (nb,)
        members = torch.argsort(inverse, stable=True)  # query blocks sorted by pattern id
        sizes = torch.bincount(inverse, minlength=uniq.shape[0]).tolist()
        for u, part in enumerate(torch.split(members, sizes)):
            sr_head.append(h)
            sr_members.append(part)
            sr_pattern.append(uniq[u])
    patterns = torch.stack(sr_pattern)  # (R, nb)
    counts = patterns.sum(-1)  # (R,)
    sizes = torch.tensor([len(mem) for mem in sr_members])
    heads_all = torch.tensor(sr_head)
    # kept column ids first (increasing), then the rest: sort by (not kept, column)
    order = torch.argsort((~patterns).to(torch.int64) * nb + col, dim=-1, stable=True)  # (R, nb)
    groups: list[RowGroup] = []
    placed = []
    for m in sorted(set(sizes.tolist())):
        with_m = sizes == m
        for lo, hi in _group_counts(sorted(set(counts[with_m].tolist()) - {0})):
            sel = torch.nonzero(with_m & (counts >= lo) & (counts <= hi)).flatten()
            kv = order[sel, :hi]  # (n, C)
            valid = col[:hi][None, :] < counts[sel][:, None]  # (n, C)
            kv = torch.where(valid, kv, kv[:, :1])  # padding slots point at a kept block (masked out)
            heads = heads_all[sel]
            qblocks = torch.stack([sr_members[i] for i in sel.tolist()])  # (n, m)
            rows = (heads[:, None] * nb + qblocks).reshape(-1)
            groups.append(
                RowGroup(
                    rows=rows.to(device),
                    heads=heads.to(device),
                    qblocks=qblocks.to(device),
                    kvblocks=kv.to(device),
                    kv_flat=(heads[:, None] * nb + kv).reshape(-1).to(device),
                    valid=None if bool(valid.all()) else valid.to(device),
                    width=hi,
                    m=m,
                )
            )
            placed.append(rows)
    empty_sr = torch.nonzero(counts == 0).flatten().tolist()
    empty = (
        torch.cat([heads_all[i] * nb + sr_members[i] for i in empty_sr])
        if empty_sr
        else torch.zeros(0, dtype=torch.long)
    )
    placed.append(empty)
    perm = torch.cat(placed)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel())
    return BlockSparsePlan(
        num_heads=H,
        num_blocks=nb,
        groups=groups,
        num_empty=int(empty.numel()),
        empty_rows=empty.to(device),
        inv_perm=inv_perm.to(device),
        num_kept=int(keep.sum()),
    )


_PLANS = LayoutCache(lambda layout, device: build_plan(layout, device), size=_CACHE_SIZE)


def get_plan(layout: torch.Tensor, device: torch.device) -> BlockSparsePlan:
    """`build_plan`, cached per layout (checked by content, so an in-place edit of the layout is seen)."""
    return _PLANS.get(layout, device)


def additive_mask(mask: torch.Tensor, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """DeepSpeed's mask modes as an additive mask in `dtype`: "mul": 0 -> -inf, nonzero -> 0; "add": the values."""
    if mode == "add":
        return mask.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask == 0, torch.full((), float("-inf"), dtype=dtype, device=mask.device), zero)


def _group_bias(
    g: RowGroup,
    block: int,
    nb: int,
    dtype: torch.dtype,
    rpe: torch.Tensor | None,
    kpm: torch.Tensor | None,
    am: torch.Tensor | None,
    float_mask: bool = False,
) -> torch.Tensor | None:
    """Additive (or, unless `float_mask`, bool) SDPA mask of one group: (B|1, n, m·block|1, C·block).

    None when nothing is masked."""
    n, C = g.kvblocks.shape
    m = g.m
    bias = None
    if rpe is not None:
        Br, H = rpe.shape[:2]
        r = rpe.view(Br, H, nb, block, nb, block).permute(0, 1, 2, 4, 3, 5)  # (Br, H, nb_i, nb_j, bi, bj)
        r = r[:, g.heads[:, None, None], g.qblocks[:, :, None], g.kvblocks[:, None, :]]  # (Br, n, m, C, bi, bj)
        bias = r.permute(0, 1, 2, 4, 3, 5).reshape(Br, n, m * block, C * block).to(dtype)
    if am is not None:
        a = am.view(nb, block, nb, block).permute(0, 2, 1, 3)  # (nb_i, nb_j, bi, bj)
        a = a[g.qblocks[:, :, None], g.kvblocks[:, None, :]]  # (n, m, C, bi, bj)
        a = a.permute(0, 1, 3, 2, 4).reshape(1, n, m * block, C * block).to(dtype)
        bias = a if bias is None else bias + a
    if kpm is not None:
        Bk = kpm.shape[0]
        kp = kpm.view(Bk, nb, block)[:, g.kvblocks].reshape(Bk, n, 1, C * block).to(dtype)  # (B, n, 1, C·block)
        bias = kp if bias is None else bias + kp
    if g.valid is not None:
        pad = g.valid[:, :, None].expand(n, C, block).reshape(1, n, 1, C * block)
        if bias is None:
            if not float_mask:
                return pad  # bool: True = attend
            bias = torch.zeros(pad.shape, dtype=dtype, device=pad.device)
        bias = bias.masked_fill(~pad, float("-inf"))
    return bias


def block_sparse_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    block: int,
    softmax_scale: float | None = None,
    rpe: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask_mode: str = "add",
    attn_mask_mode: str = "mul",
) -> torch.Tensor:
    """Block-sparse attention over the kept blocks of `layout`; differentiable (autograd) in q, k, v, rpe.

    q, k, v: (B, H, S, D); layout (H, S/block, S/block); rpe (B|1, H, S, S); key_padding_mask (B, S);
    attn_mask (S, S). Returns (B, H, S, D). Inputs are assumed validated (see the functional op).
    """
    B, H, S, D = q.shape
    nb = S // block
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    plan = get_plan(layout, q.device)
    # SDPA takes a float mask in q's dtype (or a bool mask).
    kpm = additive_mask(key_padding_mask, key_padding_mask_mode, q.dtype) if key_padding_mask is not None else None
    am = additive_mask(attn_mask, attn_mask_mode, q.dtype) if attn_mask is not None else None
    qb = q.reshape(B, H * nb, block * D)  # (B, H·nb, block·D): one row per query block
    kb = k.reshape(B, H * nb, block * D)
    vb = v.reshape(B, H * nb, block * D)
    outs = []
    for g in plan.groups:
        n, C = g.kvblocks.shape
        qg = qb.index_select(1, g.rows).view(B, n, g.m * block, D)
        kg = kb.index_select(1, g.kv_flat).view(B, n, C * block, D)
        vg = vb.index_select(1, g.kv_flat).view(B, n, C * block, D)
        bias = _group_bias(g, block, nb, q.dtype, rpe, kpm, am)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=bias, scale=scale)  # (B, n, m·block, D)
        outs.append(og.reshape(B, n * g.m, block * D))
    if plan.num_empty:
        if not outs and torch.is_grad_enabled():
            # Nothing is kept at all: keep the (zero) output attached to q, k, v so their gradients are zeros.
            zero = q.reshape(-1)[:0].sum() + k.reshape(-1)[:0].sum() + v.reshape(-1)[:0].sum()
            outs.append(zero.expand(B, plan.num_empty, block * D))
        else:
            outs.append(q.new_zeros(B, plan.num_empty, block * D))
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    out = out.index_select(1, plan.inv_perm)  # back to row order h·nb + i
    return out.view(B, H, S, D)


# ----------------------------------------------------------------------------------------------------------------
# CPU fast path: forward and backward helpers around ATen's CPU flash-attention kernels (no autograd graph here;
# `BlockSparseAttentionTorchFunction` in the functional layer wires them up). Compared with autograd through the
# composed ops above, it writes every group's output and gradients straight into place (no concatenation, no
# per-group zero-filled gradient buffers) and saves only q, k, v, out and the per-group log-sum-exps: the
# gathers are redone in the backward. Masks and rpe are constants here (no gradient).
# ----------------------------------------------------------------------------------------------------------------


def flash_cpu_available() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        ops, "_scaled_dot_product_flash_attention_for_cpu_backward"
    )


# Each SDPA call of the CPU path handles at most about this many bytes of gathered keys. Chunks stay in the
# allocator's cache (glibc maps blocks above its 32 MB maximum mmap threshold afresh each time): one gather of a
# whole group (100+ MB at S=8192) mostly pays for page faults (measured ~3x slower than a gather into reused
# memory). Much smaller chunks (1 MB) lose again: too many small parallel regions on a busy machine.
CHUNK_BYTES = 16 << 20


def _chunks(g: RowGroup, B: int, block: int, D: int, itemsize: int):
    """Split a group into sub-groups (slices of its entries) whose gathered keys fit in CHUNK_BYTES."""
    n, C = g.kvblocks.shape
    per_entry = B * C * block * D * itemsize
    step = max(1, CHUNK_BYTES // per_entry)
    if step >= n:
        yield g
        return
    for i in range(0, n, step):
        j = min(n, i + step)
        yield RowGroup(
            rows=g.rows[i * g.m : j * g.m],
            heads=g.heads[i:j],
            qblocks=g.qblocks[i:j],
            kvblocks=g.kvblocks[i:j],
            kv_flat=g.kv_flat[i * C : j * C],
            valid=None if g.valid is None else g.valid[i:j],
            width=g.width,
            m=g.m,
        )


def _gather(g: RowGroup, qb, kb, vb, B: int, block: int, D: int):
    n, C = g.kvblocks.shape
    qg = qb.index_select(1, g.rows).view(B, n, g.m * block, D)
    kg = kb.index_select(1, g.kv_flat).view(B, n, C * block, D)
    vg = vb.index_select(1, g.kv_flat).view(B, n, C * block, D)
    return qg, kg, vg


def block_sparse_attention_cpu_fwd(
    q, k, v, plan: BlockSparsePlan, block: int, scale: float, rpe=None, kpm=None, am=None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward on CPU: returns out (B, H, S, D) and one log-sum-exp per chunk of a row group (for the backward).

    kpm / am are additive masks in q's dtype (see `additive_mask`); rpe (B|1, H, S, S) is a constant bias.
    """
    B, H, S, D = q.shape
    nb = S // block
    qb, kb, vb = (t.reshape(B, H * nb, block * D) for t in (q, k, v))  # one row per query/key block
    out = q.new_empty(B, H * nb, block * D)
    if plan.num_empty:
        out.index_fill_(1, plan.empty_rows, 0)
    lses = []
    for g in (c for grp in plan.groups for c in _chunks(grp, B, block, D, q.element_size())):
        qg, kg, vg = _gather(g, qb, kb, vb, B, block, D)
        bias = _group_bias(g, block, nb, q.dtype, rpe, kpm, am, float_mask=True)
        og, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qg, kg, vg, 0.0, False, attn_mask=bias, scale=scale
        )  # (B, n, m·block, D), (B, n, m·block)
        out.index_copy_(1, g.rows, og.reshape(B, -1, block * D))
        lses.append(lse)
    return out.view(B, H, S, D), lses


def block_sparse_attention_cpu_bwd(
    dout, q, k, v, out, lses, plan: BlockSparsePlan, block: int, scale: float, rpe=None, kpm=None, am=None, grads=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward on CPU: dq, dk, dv (B, H, S, D) from the saved out and log-sum-exps (gathers are redone).

    `grads`: optional contiguous (dq, dk, dv) accumulators (B, H, S, D) to add into (and return)."""
    B, H, S, D = q.shape
    nb = S // block
    qb, kb, vb, ob, dob = (t.reshape(B, H * nb, block * D) for t in (q, k, v, out, dout))
    if grads is not None:
        dq, dk, dv = (t.view(B, H * nb, block * D) for t in grads)
    else:
        dq = q.new_zeros(B, H * nb, block * D) if plan.num_empty else q.new_empty(B, H * nb, block * D)
        dk = k.new_zeros(B, H * nb, block * D)
        dv = v.new_zeros(B, H * nb, block * D)
    chunks = (c for grp in plan.groups for c in _chunks(grp, B, block, D, q.element_size()))
    for g, lse in zip(chunks, lses, strict=True):
        qg, kg, vg = _gather(g, qb, kb, vb, B, block, D)
        og = ob.index_select(1, g.rows).view(qg.shape)
        dog = dob.index_select(1, g.rows).view(qg.shape)
        bias = _group_bias(g, block, nb, q.dtype, rpe, kpm, am, float_mask=True)
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dog, qg, kg, vg, og, lse, 0.0, False, attn_mask=bias, scale=scale
        )
        if grads is not None:
            dq.index_add_(1, g.rows, gq.reshape(B, -1, block * D))
        else:
            dq.index_copy_(1, g.rows, gq.reshape(B, -1, block * D))  # every row belongs to one group
        dk.index_add_(1, g.kv_flat, gk.reshape(B, -1, block * D))
        dv.index_add_(1, g.kv_flat, gv.reshape(B, -1, block * D))
    return dq.view(B, H, S, D), dk.view(B, H, S, D), dv.view(B, H, S, D)


# ----------------------------------------------------------------------------------------------------------------
# CPU band path (no rpe / masks): the layout is split into disjoint parts that need little or no gather; each part
# runs ATen's CPU flash kernel and the partial results are merged through their log-sum-exps:
#   lse = log Σ_i exp(lse_i),  out = Σ_i exp(lse_i − lse)·out_i.
# - band: a diagonal band [i−wl, i+wr] kept in every row of every head (clipped at the edges). Interior query
#   blocks attend an overlapping strided view of K/V ((wl+wr+1)·block keys starting at block i−wl): no copy.
#   The wl + wr edge rows run one small call each over all heads (their clipped window is a plain slice).
# - full rows (kept in every head, e.g. BigBird's global rows): the key blocks left and right of the band, as
#   two slices of K/V (no copy, no mask); a full row that is also an edge row runs one call over all keys.
# - global columns (kept in every row of every head, e.g. BigBird's global columns): the query rows where none of
#   them is covered yet, as contiguous row ranges (views of q) against those key blocks (a slice of K/V).
# - extra: every other kept block (random blocks, per-head differences, global columns near the band). When each
#   row keeps about the same number E of them, all query blocks (a view of q) run one call against their E
#   gathered key blocks (padding slots masked where a row keeps some but not all E; a row that keeps none gets
#   lse -inf in the merge and +inf in the backward, so no mask is needed for it); otherwise they run the
#   grouped path above on what is left.
# Every call is described by `Rows` (a strided set of token rows) for its queries and, but for gathers, its keys:
# `_rows_view` turns them into views of q/k/v, out, lse and the gradients alike.
# Steps of a few heads (BAND_STEP_BYTES) keep each step's partial outputs and gradients in cache while merged.
# The backward reuses the same parts: each part's flash backward called with the *final* out and lse gives its
# exact share of dq, dk, dv (p = exp(s − lse) and delta = rowsum(dO·O) are the global ones).
# Memory: every part's temporaries are linear in the kept blocks (no S×S tensor).
# ----------------------------------------------------------------------------------------------------------------

# Use the band path only when the band holds at least this share of the kept blocks.
BAND_MIN_SHARE = 0.25
# Run the extra blocks as one padded call when the kept ones fill at least this share of the E slots of all rows.
EXTRA_MIN_FILL = 0.5


@dataclass
class BandPlan:
    """Disjoint parts of a layout for the CPU band path (see above)."""

    num_blocks: int
    wl: int  # band: blocks i−wl .. i+wr of row i (clipped to [0, nb))
    wr: int
    full_rows: list[int]  # query blocks kept in full in every head
    extra_width: int  # E: extra key blocks per query block (0: none, or they run the grouped `rest` plan)
    extra_cols: torch.Tensor | None  # (H, nb, E) key blocks j of the extra slots (padding slots point at block i)
    extra_valid: torch.Tensor | None  # (H, nb, E) bool; None when every row keeps all E slots or none
    extra_empty: torch.Tensor | None  # (H, nb) bool: rows with no extra block (None when there are none)
    rest: BlockSparsePlan | None  # the extra blocks as a grouped plan, when they are too uneven for one call
    cache: dict = field(default_factory=dict)  # per (block, dtype): masks of the extra call
    gcols: list[int] = field(default_factory=list)  # key blocks kept in every row of every head ...
    gcol_ranges: list[tuple[int, int]] = field(default_factory=list)  # ... taken for these query-block ranges


def _band_width(keep: torch.Tensor, sign: int) -> int:
    """Largest w such that the diagonals sign·1 .. sign·w are kept in every row of every head."""
    nb = keep.shape[-1]
    w = 0
    while w + 1 < nb and bool(torch.diagonal(keep, offset=sign * (w + 1), dim1=1, dim2=2).all()):
        w += 1
    return w


def build_band_plan(layout: torch.Tensor, device: torch.device) -> BandPlan | None:
    """Split `layout` into band / full rows / extra blocks; None when it has no band holding BAND_MIN_SHARE."""
    keep = layout.detach().to("cpu") != 0  # (H, nb, nb)
    H, nb, _ = keep.shape
    if not bool(torch.diagonal(keep, dim1=1, dim2=2).all()):
        return None
    wl, wr = _band_width(keep, -1), _band_width(keep, 1)
    i = torch.arange(nb)
    diff = i[None, :] - i[:, None]  # j − i
    cov = (diff >= -wl) & (diff <= wr)  # (nb, nb) band, kept in every head
    if H * int(cov.sum()) < BAND_MIN_SHARE * int(keep.sum()):
        return None
    full = keep.all(0).all(1) & ~cov.all(1)  # (nb,) rows kept in full in every head, beyond the band
    covered = cov.clone()
    covered[full] = True
    # global columns: kept in every row of every head; the rows where none of them is covered yet (by the band
    # or a full row) take them in plain calls over contiguous row ranges
    gcols = torch.nonzero(keep.all(0).all(0) & ~covered.all(0)).flatten()
    ranges: list[tuple[int, int]] = []
    if gcols.numel():
        free = ~covered[:, gcols].any(1)  # (nb,)
        pad = torch.zeros(1, dtype=torch.int8)
        edges = torch.diff(free.to(torch.int8), prepend=pad, append=pad)
        starts, stops = torch.nonzero(edges == 1).flatten(), torch.nonzero(edges == -1).flatten()
        ranges = list(zip(starts.tolist(), stops.tolist(), strict=True))
        covered[free[:, None] & (i[None, :, None] == gcols[None, None, :]).any(-1)] = True
    extra = keep & ~covered  # (H, nb, nb)
    counts = extra.sum(-1)  # (H, nb)
    E = int(counts.max())
    plan = BandPlan(nb, wl, wr, torch.nonzero(full).flatten().tolist(), 0, None, None, None, None)
    if ranges:
        plan.gcols, plan.gcol_ranges = gcols.tolist(), ranges
    if E == 0:
        return plan
    if int(counts.sum()) < EXTRA_MIN_FILL * H * nb * E:
        plan.rest = build_plan(extra, device)
        return plan
    # kept columns first (increasing), then the rest: sort by (not kept, column); padding slots -> block i
    order = torch.argsort((~extra).to(torch.int64) * nb + i, dim=-1, stable=True)[..., :E]  # (H, nb, E)
    valid = torch.arange(E)[None, None, :] < counts[..., None]
    cols = torch.where(valid, order, i[None, :, None])
    plan.extra_width = E
    plan.extra_cols = cols.to(device)
    # a mask is needed only for rows that keep some but not all of the E slots: a row that keeps none is an empty
    # row (its lse is set to -inf in the forward and +inf in the backward, so it adds nothing either way)
    partial = (counts > 0) & (counts < E)
    plan.extra_valid = valid.to(device) if bool(partial.any()) else None
    plan.extra_empty = (counts == 0).to(device) if bool((counts == 0).any()) else None
    return plan


_BAND_PLANS = LayoutCache(lambda layout, device: build_band_plan(layout, device), size=_CACHE_SIZE)


def get_band_plan(layout: torch.Tensor, device: torch.device) -> BandPlan | None:
    """`build_band_plan`, cached per layout like `get_plan`."""
    return _BAND_PLANS.get(layout, device)


# Heads (B·H slices) per step of the band path: about this many bytes of q, so that a step's outputs, gathers and
# gradients stay in cache while its partial results are merged (whole-tensor passes cost ~4 GB/s here).
BAND_STEP_BYTES = 8 << 20


@dataclass(frozen=True)
class Rows:
    """A strided set of token rows: start + t·step + [0, length) for t < count (windows overlap when
    length > step). A call's queries or keys as a view of a (c, S, ...) tensor: see `_rows_view`."""

    start: int
    step: int
    count: int
    length: int

    @staticmethod
    def span(lo: int, hi: int) -> Rows:
        return Rows(lo, hi - lo, 1, hi - lo)


def _rows_view(t: torch.Tensor, r: Rows) -> torch.Tensor:
    """(c, S, *rest) -> (c, count, length, *rest) view of rows `r` (no copy)."""
    st = t.stride()
    return t.as_strided(
        (t.shape[0], r.count, r.length, *t.shape[2:]),
        (st[0], r.step * st[1], *st[1:]),
        t.storage_offset() + r.start * st[1],
    )


def _add_rows(dst: torch.Tensor, r: Rows, g: torch.Tensor) -> None:
    """dst[rows r] += g (c, count, length, ...), window by window slice when the windows overlap."""
    if r.count == 1 or r.length <= r.step:
        _rows_view(dst, r).add_(g)
        return
    for o in range(0, r.length, r.step):  # piece o of every window: non-overlapping
        n = min(r.step, r.length - o)
        _rows_view(dst, Rows(r.start + o, r.step, r.count, n)).add_(g[:, :, o : o + n])


@dataclass
class _Part:
    """One flash call of the band path: queries `qrows` against keys `kv` (Rows of K/V, or a gather: ("gcols",
    token ids) / ("extra", flat block ids)); `first`: the calls that cover every row once (they write out, the
    others add into it); empty: (c, n, M) bool rows with no key in this call, or None."""

    kv: object
    qrows: Rows
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None = None
    empty: torch.Tensor | None = None
    first: bool = False


def _band_parts(q3, k3, v3, bp: BandPlan, block: int, H: int, c0: int, c1: int):
    """Yield a `_Part` for every call of the band path (but the grouped rest) on the B·H slices c0:c1 of q3, k3,
    v3 (B·H, S, D), contiguous."""
    BH, S, D = q3.shape
    nb, wl, wr = bp.num_blocks, bp.wl, bp.wr
    nw = nb - wl - wr  # interior query blocks: their whole window lies inside [0, nb)
    qc, kc, vc = q3[c0:c1], k3[c0:c1], v3[c0:c1]

    def part(kv: Rows, qr: Rows, **kw) -> _Part:
        return _Part(kv, qr, _rows_view(qc, qr), _rows_view(kc, kv), _rows_view(vc, kv), **kw)

    b = block
    if nw > 0:  # query block w + wl against key blocks w .. w + wl + wr (overlapping windows, no copy)
        yield part(Rows(0, b, nw, (wl + wr + 1) * b), Rows(wl * b, b, nw, b), first=True)
    edges = [*range(min(wl, nb)), *range(max(wl, nb - wr), nb)]
    full = set(bp.full_rows)
    for i in edges:  # edge rows: their clipped windows (a full row: all keys in one call)
        lo, hi = (0, nb) if i in full else (max(0, i - wl), min(nb, i + wr + 1))
        yield part(Rows.span(lo * b, hi * b), Rows.span(i * b, (i + 1) * b), first=True)
    for i in sorted(full.difference(edges)):
        for lo, hi in ((0, max(0, i - wl)), (min(nb, i + wr + 1), nb)):
            if hi > lo:
                yield part(Rows.span(lo * b, hi * b), Rows.span(i * b, (i + 1) * b))
    if bp.gcol_ranges:
        g = bp.gcols
        if g == list(range(g[0], g[-1] + 1)):  # contiguous: a slice of the keys
            for r0, r1 in bp.gcol_ranges:
                yield part(Rows.span(g[0] * b, (g[-1] + 1) * b), Rows.span(r0 * b, r1 * b))
        else:
            tok = (torch.tensor(g, device=q3.device)[:, None] * b + torch.arange(b, device=q3.device)).flatten()
            kg, vg = kc.index_select(1, tok)[:, None], vc.index_select(1, tok)[:, None]
            for r0, r1 in bp.gcol_ranges:
                qr = Rows.span(r0 * b, r1 * b)
                yield _Part(("gcols", tok), qr, _rows_view(qc, qr), kg, vg)
    if bp.extra_width:
        E = bp.extra_width
        c = c1 - c0
        mask_h, empty_h = _extra_masks(bp, b, q3.dtype)
        bh = torch.arange(c0, c1, device=q3.device)
        head = bh % H
        ids = (bh[:, None, None] * nb + bp.extra_cols[head]).reshape(-1)  # (c·nb·E,) flat key-block ids bh·nb + j
        kx, vx = (t.view(BH * nb, b * D).index_select(0, ids).view(c, nb, E * b, D) for t in (k3, v3))
        mask = None if mask_h is None else mask_h[head]
        empty = None if empty_h is None else empty_h[head]
        qr = Rows(0, b, nb, b)
        yield _Part(("extra", ids), qr, _rows_view(qc, qr), kx, vx, mask=mask, empty=empty)


def _extra_masks(bp: BandPlan, block: int, dtype: torch.dtype):
    """Per head, for the extra call (cached on the plan): the additive padding mask (H, nb, 1, E·block) or None,
    and the rows with no extra block (H, nb, block) or None."""
    key = (block, dtype)
    hit = bp.cache.get(key)
    if hit is not None:
        return hit
    H, nb, E = bp.extra_cols.shape
    mask = empty = None
    if bp.extra_valid is not None:
        valid = bp.extra_valid[:, :, None, :, None].expand(H, nb, 1, E, block).reshape(H, nb, 1, E * block)
        zero = torch.zeros((), dtype=dtype, device=valid.device)
        mask = torch.where(valid, zero, torch.full((), float("-inf"), dtype=dtype, device=valid.device))
    if bp.extra_empty is not None:
        empty = bp.extra_empty[:, :, None].expand(H, nb, block)
    bp.cache[key] = (mask, empty)
    return mask, empty


def _band_steps(BH: int, S: int, D: int, itemsize: int):
    step = max(1, BAND_STEP_BYTES // (S * D * itemsize))
    return [(c0, min(BH, c0 + step)) for c0 in range(0, BH, step)]


def band_attention_cpu_fwd(q, k, v, bp: BandPlan, block: int, scale: float):
    """Forward of the band path (q, k, v contiguous (B, H, S, D)): out (B, H, S, D) and the merged lse (B, H, S).

    Every row keeps its diagonal block, so the merged lse is finite. Runs in steps of a few heads; in each step
    the partial results of all calls are merged while they are in cache: the `first` calls (which cover every
    row once) write out, the others add into it."""
    B, H, S, D = q.shape
    BH = B * H
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    q3, k3, v3 = (t.view(BH, S, D) for t in (q, k, v))
    out = torch.empty(BH, S, D, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    lse_all = None
    for c0, c1 in _band_steps(BH, S, D, q.element_size()):
        parts = []
        for p in _band_parts(q3, k3, v3, bp, block, H, c0, c1):
            o, lse = flash(p.q, p.k, p.v, 0.0, False, attn_mask=p.mask, scale=scale)
            if p.empty is not None:  # rows with no key of this call: weight 0 in the merge
                lse = lse.masked_fill(p.empty, float("-inf"))
            parts.append((p, o, lse))
        if lse_all is None:
            lse_all = torch.empty(BH, S, dtype=parts[0][2].dtype, device=q.device)
        lc, oc = lse_all[c0:c1], out[c0:c1]
        lvs = [_rows_view(lc, p.qrows) for p, _, _ in parts]
        for (p, _, lse), lv in zip(parts, lvs, strict=True):
            if p.first:
                lv.copy_(lse)
            else:
                torch.logaddexp(lv, lse, out=lv)
        for (p, o, lse), lv in zip(parts, lvs, strict=True):
            w = torch.exp(lse - lv).unsqueeze(-1)
            ov = _rows_view(oc, p.qrows)
            if p.first:
                torch.mul(o, w, out=ov)
            else:
                ov.addcmul_(o, w)
    if bp.rest is not None:
        o, lses = block_sparse_attention_cpu_fwd(q, k, v, bp.rest, block, scale)
        lse = torch.full((B, H * bp.num_blocks, block), float("-inf"), dtype=lse_all.dtype, device=q.device)
        chunks = (c for grp in bp.rest.groups for c in _chunks(grp, B, block, D, q.element_size()))
        for g, lg in zip(chunks, lses, strict=True):
            lse.index_copy_(1, g.rows, lg.reshape(B, -1, block))
        lse = lse.view(BH, S)
        new = torch.logaddexp(lse_all, lse)
        out.mul_(torch.exp(lse_all - new).unsqueeze(-1)).addcmul_(o.view(BH, S, D), torch.exp(lse - new).unsqueeze(-1))
        lse_all = new
    return out.to(q.dtype).view(B, H, S, D), lse_all.view(B, H, S)


# A single (query range, key range) call is split into about this many pieces in the backward: ATen's CPU flash
# backward runs one task per (batch, head), so one long call per head would use one core.
BWD_SPLIT = 8


def _divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _split_flash_bwd(dop, qp, kp, vp, op, lp, scale: float, block: int):
    """Flash backward of one (c, 1, M, D) x (c, 1, N, D) call, cut into P pieces along its longer side (whole
    blocks) so that the kernel gets c·P tasks; exact, since the saved lse and out are the final ones."""
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    c, _, M, D = qp.shape
    N = kp.shape[2]
    if N >= M:  # split the keys: every piece sees all queries, dq is the sum over pieces
        P = _divisor(N // block, BWD_SPLIT) if N % block == 0 else 1
        if P == 1:
            return flash_bwd(dop, qp, kp, vp, op, lp, 0.0, False, scale=scale)
        ks, vs = kp.reshape(c, P, N // P, D), vp.reshape(c, P, N // P, D)
        qs, dos, os_ = (t.expand(c, P, M, D) for t in (qp, dop, op))
        gq, gk, gv = flash_bwd(dos, qs, ks, vs, os_, lp.expand(c, P, M), 0.0, False, scale=scale)
        return gq.sum(1, keepdim=True), gk.reshape(c, 1, N, D), gv.reshape(c, 1, N, D)
    P = _divisor(M // block, BWD_SPLIT) if M % block == 0 else 1  # split the queries: dk, dv sum over pieces
    if P == 1:
        return flash_bwd(dop, qp, kp, vp, op, lp, 0.0, False, scale=scale)
    qs, dos, os_ = (t.reshape(c, P, M // P, D) for t in (qp, dop, op))
    ks, vs = kp.expand(c, P, N, D), vp.expand(c, P, N, D)
    gq, gk, gv = flash_bwd(dos, qs, ks, vs, os_, lp.reshape(c, P, M // P), 0.0, False, scale=scale)
    return gq.reshape(c, 1, M, D), gk.sum(1, keepdim=True), gv.sum(1, keepdim=True)


def band_attention_cpu_bwd(dout, q, k, v, out, lse, bp: BandPlan, block: int, scale: float):
    """Backward of the band path (all inputs contiguous): each part's flash backward with the final out and lse,
    summed into dq, dk, dv step by step (a step's heads stay in cache)."""
    B, H, S, D = q.shape
    BH = B * H
    nb = bp.num_blocks
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    q3, k3, v3, o3, do3 = (t.view(BH, S, D) for t in (q, k, v, out, dout))
    l3 = lse.view(BH, S)
    dq, dk, dv = (torch.empty(BH, S, D, dtype=q.dtype, device=q.device) for _ in range(3))
    for c0, c1 in _band_steps(BH, S, D, q.element_size()):
        c = c1 - c0
        dqc, dkc, dvc = dq[c0:c1], dk[c0:c1], dv[c0:c1]
        for t in (dqc, dkc, dvc):
            t.zero_()
        for p in _band_parts(q3, k3, v3, bp, block, H, c0, c1):
            op, dop = _rows_view(o3[c0:c1], p.qrows), _rows_view(do3[c0:c1], p.qrows)
            lp = _rows_view(l3[c0:c1], p.qrows)
            if p.empty is not None:  # no key of this call for these rows: lse +inf gives p = 0
                lp = lp.masked_fill(p.empty, float("inf"))
            if p.q.shape[1] == 1 and p.mask is None:
                gq, gk, gv = _split_flash_bwd(dop, p.q, p.k, p.v, op, lp, scale, block)
            else:
                gq, gk, gv = flash_bwd(dop, p.q, p.k, p.v, op, lp, 0.0, False, attn_mask=p.mask, scale=scale)
            _add_rows(dqc, p.qrows, gq)
            if isinstance(p.kv, Rows):
                _add_rows(dkc, p.kv, gk)
                _add_rows(dvc, p.kv, gv)
            elif p.kv[0] == "gcols":  # gathered global-column keys
                dkc.index_add_(1, p.kv[1], gk.reshape(c, -1, D))
                dvc.index_add_(1, p.kv[1], gv.reshape(c, -1, D))
            else:  # extra: gathered key blocks
                ids = p.kv[1]
                # (index_add_ along dim 0 of a 2-D view takes a slow scatter path on CPU: ~20x slower)
                dk.view(1, BH * nb, block * D).index_add_(1, ids, gk.reshape(1, -1, block * D))
                dv.view(1, BH * nb, block * D).index_add_(1, ids, gv.reshape(1, -1, block * D))
    dq, dk, dv = (t.view(B, H, S, D) for t in (dq, dk, dv))
    if bp.rest is not None:
        lses = [
            lse.reshape(B, H * nb, block).index_select(1, g.rows).reshape(B, g.qblocks.shape[0], -1)
            for grp in bp.rest.groups
            for g in _chunks(grp, B, block, D, q.element_size())
        ]
        block_sparse_attention_cpu_bwd(dout, q, k, v, out, lses, bp.rest, block, scale, grads=(dq, dk, dv))
    return dq, dk, dv
