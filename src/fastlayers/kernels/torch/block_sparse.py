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

Two ways to run it:
- `block_sparse_attention_fwd`: composed of differentiable ops (autograd gives the backward: SDPA's own for
  q, k, v; gather/scatter for rpe and the masks). Any device; used when rpe or a mask needs its gradient.
- `block_sparse_attention_cpu_fwd` / `_cpu_bwd`: CPU helpers around ATen's CPU flash-attention kernels, in
  chunks of at most CHUNK_BYTES of gathered keys, writing outputs and gradients in place; they save only
  out and the log-sum-exps (the gathers are redone in the backward). Biases are constants there.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


_PLANS: OrderedDict = OrderedDict()


def get_plan(layout: torch.Tensor, device: torch.device) -> BlockSparsePlan:
    """`build_plan`, cached per layout (checked by content, so an in-place edit of the layout is seen)."""
    key = (layout.data_ptr(), tuple(layout.shape), layout.dtype, layout.device, torch.device(device))
    hit = _PLANS.get(key)
    if hit is not None and torch.equal(hit[0], layout):
        _PLANS.move_to_end(key)
        return hit[1]
    plan = build_plan(layout, torch.device(device))
    _PLANS[key] = (layout.detach().clone(), plan)
    if len(_PLANS) > _CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


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
    dout, q, k, v, out, lses, plan: BlockSparsePlan, block: int, scale: float, rpe=None, kpm=None, am=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward on CPU: dq, dk, dv (B, H, S, D) from the saved out and log-sum-exps (gathers are redone)."""
    B, H, S, D = q.shape
    nb = S // block
    qb, kb, vb, ob, dob = (t.reshape(B, H * nb, block * D) for t in (q, k, v, out, dout))
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
        dq.index_copy_(1, g.rows, gq.reshape(B, -1, block * D))  # every row belongs to one group
        dk.index_add_(1, g.kv_flat, gk.reshape(B, -1, block * D))
        dv.index_add_(1, g.kv_flat, gv.reshape(B, -1, block * D))
    return dq.view(B, H, S, D), dk.view(B, H, S, D), dv.view(B, H, S, D)
