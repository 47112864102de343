"""Block-sparse attention in plain PyTorch: only the kept blocks are computed; memory is linear in their number.

Design (measured on CPU, docs/cpu-baselines.md §2): the query blocks (rows of the layout, over all heads) are
grouped by how many key blocks they keep. For each group, the query blocks and their key/value blocks are
gathered with one `index_select` each, and one `F.scaled_dot_product_attention` call runs with the
(row × batch) pairs folded into SDPA's batch dims: queries (B, n_rows, block, D) against keys
(B, n_rows, C·block, D), where C is the group's (padded) block count. Padding slots, masks and rpe enter as a
small per-group mask of shape (·, n_rows, block|1, C·block). Rows of very different lengths (BigBird's global
rows attend everything) fall into different groups, so nothing of size S×S is built. Rows that keep no block
give zeros. Everything is composed of differentiable ops, so autograd gives the backward (SDPA's own backward
for q, k, v; gather/scatter for rpe and the masks).
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
    """Query-block rows that share one SDPA call."""

    rows: torch.Tensor  # (n,) int64 flat row ids h·nb + i
    heads: torch.Tensor  # (n,) int64 h
    qblocks: torch.Tensor  # (n,) int64 i
    kvblocks: torch.Tensor  # (n, C) int64 key-block ids j (padding slots repeat a kept id)
    kv_flat: torch.Tensor  # (n·C,) int64 flat ids h·nb + j
    valid: torch.Tensor | None  # (n, C) bool, None when every slot is a kept block
    width: int  # C


@dataclass
class BlockSparsePlan:
    """Everything derived from (layout, device) once: row groups and the order to put rows back."""

    num_heads: int
    num_blocks: int
    groups: list[RowGroup]
    num_empty: int  # rows with no kept block (they give zeros)
    inv_perm: torch.Tensor  # (H·nb,) position of row h·nb+i in the concatenation [groups..., empty rows]
    num_kept: int  # kept blocks
    max_width: int


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
    """Group the rows of a (H, nb, nb) layout by their number of kept blocks (see the module docstring)."""
    keep = layout.detach().to("cpu") != 0  # (H, nb, nb)
    H, nb, _ = keep.shape
    flat = keep.reshape(H * nb, nb)
    counts = flat.sum(-1)  # (H·nb,)
    # Kept column ids first (in increasing order), then padding: sort by (not kept, column).
    col = torch.arange(nb)
    order = torch.argsort((~flat).to(torch.int64) * nb + col, dim=-1, stable=True)  # (H·nb, nb)
    groups: list[RowGroup] = []
    placed = []
    for lo, hi in _group_counts(sorted(set(counts.tolist()) - {0})):
        rows = torch.nonzero((counts >= lo) & (counts <= hi)).flatten()
        width = hi
        kv = order[rows, :width]  # (n, C)
        valid = col[:width][None, :] < counts[rows][:, None]  # (n, C)
        kv = torch.where(valid, kv, kv[:, :1])  # padding slots point at a kept block (masked out)
        heads = rows // nb
        groups.append(
            RowGroup(
                rows=rows.to(device),
                heads=heads.to(device),
                qblocks=(rows % nb).to(device),
                kvblocks=kv.to(device),
                kv_flat=(heads[:, None] * nb + kv).reshape(-1).to(device),
                valid=None if bool(valid.all()) else valid.to(device),
                width=width,
            )
        )
        placed.append(rows)
    empty = torch.nonzero(counts == 0).flatten()
    placed.append(empty)
    perm = torch.cat(placed)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel())
    return BlockSparsePlan(
        num_heads=H,
        num_blocks=nb,
        groups=groups,
        num_empty=int(empty.numel()),
        inv_perm=inv_perm.to(device),
        num_kept=int(counts.sum()),
        max_width=int(counts.max()) if counts.numel() else 0,
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


def _additive(mask: torch.Tensor, mode: str, dtype: torch.dtype) -> torch.Tensor:
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
) -> torch.Tensor | None:
    """Additive (or bool) SDPA mask of one group: (B|1, n, block|1, C·block); None when nothing is masked."""
    n, C = g.kvblocks.shape
    bias = None
    if rpe is not None:
        Br, H = rpe.shape[:2]
        r = rpe.view(Br, H, nb, block, nb, block).permute(0, 1, 2, 4, 3, 5)  # (Br, H, nb_i, nb_j, bi, bj)
        r = r[:, g.heads[:, None], g.qblocks[:, None], g.kvblocks]  # (Br, n, C, bi, bj)
        bias = r.permute(0, 1, 3, 2, 4).reshape(Br, n, block, C * block).to(dtype)
    if am is not None:
        a = am.view(nb, block, nb, block).permute(0, 2, 1, 3)  # (nb_i, nb_j, bi, bj)
        a = a[g.qblocks[:, None], g.kvblocks]  # (n, C, bi, bj)
        a = a.permute(0, 2, 1, 3).reshape(1, n, block, C * block).to(dtype)
        bias = a if bias is None else bias + a
    if kpm is not None:
        Bk = kpm.shape[0]
        kp = kpm.view(Bk, nb, block)[:, g.kvblocks].reshape(Bk, n, 1, C * block).to(dtype)  # (B, n, 1, C·block)
        bias = kp if bias is None else bias + kp
    if g.valid is not None:
        pad = g.valid[:, :, None].expand(n, C, block).reshape(1, n, 1, C * block)
        if bias is None:
            return pad  # bool: True = attend
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
    kpm = _additive(key_padding_mask, key_padding_mask_mode, q.dtype) if key_padding_mask is not None else None
    am = _additive(attn_mask, attn_mask_mode, q.dtype) if attn_mask is not None else None
    qb = q.reshape(B, H * nb, block * D)  # (B, H·nb, block·D): one row per query block
    kb = k.reshape(B, H * nb, block * D)
    vb = v.reshape(B, H * nb, block * D)
    outs = []
    for g in plan.groups:
        n, C = g.kvblocks.shape
        qg = qb.index_select(1, g.rows).view(B, n, block, D)
        kg = kb.index_select(1, g.kv_flat).view(B, n, C * block, D)
        vg = vb.index_select(1, g.kv_flat).view(B, n, C * block, D)
        bias = _group_bias(g, block, nb, q.dtype, rpe, kpm, am)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=bias, scale=scale)  # (B, n, block, D)
        outs.append(og.reshape(B, n, block * D))
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
