"""Block-sparse layouts as PyTorch FlexAttention `BlockMask`s.

`BlockMask.from_kv_blocks` builds the mask straight from block indices (milliseconds at S=8192), whereas
`create_block_mask` evaluates a mask_mod on every element (seconds at the same size on CPU); see
docs/cpu-baselines.md §2. FlexAttention itself is imported inside the functions: importing this module is free.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastlayers.sparsity_config import layout_to_block_indices


def to_block_mask(
    layout: torch.Tensor,
    block: int,
    *,
    mask_mod: Callable | None = None,
    seq_lengths: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
):
    """Export a block layout as a FlexAttention `BlockMask` with `BLOCK_SIZE = block`.

    The BlockMask's mask_mod is the layout itself (`layout[b, h, q_idx // block, kv_idx // block]`), AND-ed with
    `mask_mod(b, h, q_idx, kv_idx) -> bool` when one is given: FlexAttention's eager (CPU) path evaluates only the
    mask_mod, and its compiled kernels use the block lists to skip work. Without `mask_mod` every layout block is
    a *full* block (the kernels skip the per-element mask there); with one, every layout block is *partial*.

    Args:
        layout: `(H, nq, nkv)` or `(B, H, nq, nkv)`, 0/1 (any integer or bool dtype); a 3-D layout gets B = 1
            (broadcast over the batch by FlexAttention).
        block: block size in tokens (the BlockMask's Q and KV block size).
        mask_mod: optional element mask applied inside the layout's blocks.
        seq_lengths: `(S_q, S_kv)` when shorter than `nq * block, nkv * block`; default the full extent.
        device: where the BlockMask lives (default: the layout's device).

    Returns:
        `torch.nn.attention.flex_attention.BlockMask`; `.to_dense()` gives back `layout` (as int32, 4-D).
    """
    from torch.nn.attention.flex_attention import BlockMask

    if layout.dim() not in (3, 4):
        raise ValueError(f"layout must be (H, nq, nkv) or (B, H, nq, nkv), got shape {tuple(layout.shape)}")
    if block < 1:
        raise ValueError(f"block must be a positive integer, got {block}")
    if device is not None:
        layout = layout.to(device)
    if layout.dim() == 3:
        layout = layout.unsqueeze(0)  # (1, H, nq, nkv)
    kv_num_blocks, kv_indices = layout_to_block_indices(layout)
    in_layout = _layout_mask_mod(layout, block)
    if mask_mod is None:
        empty_num = torch.zeros_like(kv_num_blocks)
        return BlockMask.from_kv_blocks(
            empty_num,
            kv_indices,
            kv_num_blocks,
            kv_indices,
            BLOCK_SIZE=block,
            mask_mod=in_layout,
            seq_lengths=seq_lengths,
        )

    def in_layout_and_mask(b, h, q_idx, kv_idx):
        return in_layout(b, h, q_idx, kv_idx) & mask_mod(b, h, q_idx, kv_idx)

    in_layout_and_mask.__name__ = f"{in_layout.__name__}_and_{getattr(mask_mod, '__name__', 'mask_mod')}"
    return BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, BLOCK_SIZE=block, mask_mod=in_layout_and_mask, seq_lengths=seq_lengths
    )


def _layout_mask_mod(layout: torch.Tensor, block: int) -> Callable:
    nz = layout != 0  # (B or 1, H, nq, nkv)
    broadcast_b = nz.shape[0] == 1

    def block_layout(b, h, q_idx, kv_idx):
        return nz[0 if broadcast_b else b, h, q_idx // block, kv_idx // block]

    block_layout.__name__ = f"block_layout_{block}"
    return block_layout


def layout_mask_mod(layout: torch.Tensor, block: int) -> Callable:
    """The layout `(H, nq, nkv)` as a FlexAttention `mask_mod(b, h, q_idx, kv_idx)` (e.g. for `create_block_mask`,
    which evaluates it on every element: slower to build than `to_block_mask`)."""
    if layout.dim() != 3:
        raise ValueError(f"layout must be (H, nq, nkv), got shape {tuple(layout.shape)}")
    return _layout_mask_mod(layout.unsqueeze(0), block)
