"""Block-sparse attention patterns (DeepSpeed `sparse_attention.sparsity_config`, rebuilt).

A *layout* is an int64 tensor `(num_heads, num_blocks, num_blocks)` of 0/1 with `num_blocks = seq_len // block`;
`layout[h, i, j] = 1` lets query block-row `i` of head `h` attend key block-column `j`. Every config keeps
DeepSpeed's constructor parameters and defaults; `make_layout(seq_len)` gives exactly DeepSpeed 0.19.6's layout for
the deterministic patterns (tested against it). Differences from DeepSpeed, on purpose:

- Random blocks (Variable, BigBird) come from a `torch.Generator`, seeded from the `seed` argument or, when it is
  None, from torch's global RNG at `make_layout` time (so `torch.manual_seed` reproduces). DeepSpeed uses Python's
  `random`. The rules are DeepSpeed's (exactly `num_random_blocks` distinct columns per block-row, before the union
  with the other components); the sampled columns differ.
- Unidirectional `VariableSparsityConfig` samples random blocks from the causal part only (columns <= row);
  DeepSpeed samples from the whole row, which leaks future blocks into a "unidirectional" layout.
- Unidirectional `BigBirdSparsityConfig` with `num_random_blocks > row + 1` samples every existing causal column
  of that row instead of failing (DeepSpeed raises Python's "Sample larger than population").
- `SparsityConfig.make_layout` raises NotImplementedError naming the concrete subclasses (DeepSpeed has no such
  method: AttributeError later). `BSLongformerSparsityConfig` and `LocalSlidingWindowSparsityConfig` validate
  `attention` too (DeepSpeed silently treats unknown strings as bidirectional).

Also here: `layout_to_block_indices` (the `(kv_num_blocks, kv_indices)` form of FlexAttention and of block-sparse
kernels) and `to_block_mask`, which exports a layout as a FlexAttention `BlockMask`
(implemented in `fastlayers.kernels.torch.flex`). This module imports torch and the standard library only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastlayers.reference.block_sparse import layout_to_dense_mask  # noqa: F401  (re-exported)

_ATTENTIONS = ("unidirectional", "bidirectional")
_SUBCLASSES = (
    "DenseSparsityConfig, FixedSparsityConfig, VariableSparsityConfig, BigBirdSparsityConfig, "
    "BSLongformerSparsityConfig, LocalSlidingWindowSparsityConfig"
)


def _check_attention(attention: str) -> None:
    if attention not in _ATTENTIONS:
        raise NotImplementedError(
            f'only "uni/bi-directional" attentions are supported: attention must be "unidirectional" or '
            f'"bidirectional", got {attention!r}'
        )


def _check_global_ranges(starts: Sequence[int], ends: Sequence[int] | None) -> None:
    if ends is None:
        return
    if len(starts) != len(ends):
        raise ValueError(
            f"global_block_indices has {len(starts)} entries but global_block_end_indices has {len(ends)}: "
            "give one end index per start index"
        )
    for s, e in zip(starts, ends, strict=True):
        if s >= e:
            raise ValueError(f"global block start index {s} must be smaller than its end index {e}")


def _check_fits(what: str, n: int, num_blocks: int) -> None:
    if num_blocks < n:
        raise ValueError(f"{what} ({n}) must not exceed the number of blocks in a row ({num_blocks})")


def _generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded from `seed`, or from torch's global RNG when `seed` is None."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


class SparsityConfig:
    """Base class of the block-sparse patterns: shared parameters and layout helpers.

    Args:
        num_heads: number of attention heads (layouts always have this many heads).
        block: block size in tokens; `seq_len` must be a multiple of it.
        different_layout_per_head: compute a layout per head; otherwise head 0's layout is copied to every head.

    Subclasses implement `make_layout(seq_len)`; a custom pattern follows the same recipe as the built-ins:
    `layout = self.setup_layout(seq_len)`, fill heads `0..num_layout_heads-1`, then
    `return self.check_and_propagate_first_head_layout(layout)`.
    """

    def __init__(self, num_heads: int, block: int = 16, different_layout_per_head: bool = False):
        if int(num_heads) < 1:
            raise ValueError(f"num_heads must be a positive integer, got {num_heads}")
        if int(block) < 1:
            raise ValueError(f"block must be a positive integer, got {block}")
        self.num_heads = int(num_heads)
        self.block = int(block)
        self.different_layout_per_head = bool(different_layout_per_head)
        self.num_layout_heads = self.num_heads if self.different_layout_per_head else 1

    def setup_layout(self, seq_len: int) -> torch.Tensor:
        """All-zero int64 layout `(num_heads, seq_len // block, seq_len // block)`; checks divisibility."""
        if seq_len % self.block != 0:
            raise ValueError(f"sequence length {seq_len} must be divisible by the block size {self.block}")
        num_blocks = seq_len // self.block
        return torch.zeros((self.num_heads, num_blocks, num_blocks), dtype=torch.int64)

    def check_and_propagate_first_head_layout(self, layout: torch.Tensor) -> torch.Tensor:
        """Copy head 0 to every head when one layout is shared by all heads."""
        if not self.different_layout_per_head:
            layout[1 : self.num_heads, :, :] = layout[0, :, :]
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} is the abstract base of the sparsity patterns and has no layout; use one of "
            f"{_SUBCLASSES} (or a subclass that implements make_layout)"
        )

    def to_block_mask(self, seq_len: int, **kwargs):
        """`make_layout(seq_len)` as a FlexAttention `BlockMask` (see `to_block_mask` for the keywords)."""
        return to_block_mask(self.make_layout(seq_len), self.block, **kwargs)

    def _params(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "num_layout_heads"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in self._params().items()) + ")"


class DenseSparsityConfig(SparsityConfig):
    """Every block is attended (dense attention expressed as a layout; for testing)."""

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        layout[:, :, :] = 1
        return layout


class FixedSparsityConfig(SparsityConfig):
    """The "fixed" pattern of Sparse Transformers (arXiv:1904.10509), customised as in DeepSpeed.

    Local: consecutive windows of `num_local_blocks` blocks (the last may be short) attend within themselves
    (lower-triangular when unidirectional). Global: the last `num_global_blocks` blocks of every window are attended
    by all rows (by later rows when unidirectional) and, with `horizontal_global_attention`, attend all columns.
    With `different_layout_per_head`, head `h` uses global pattern `h % num_different_global_patterns`: the
    `num_global_blocks` blocks just before the last ones of each window, and so on.
    """

    def __init__(
        self,
        num_heads: int,
        block: int = 16,
        different_layout_per_head: bool = False,
        num_local_blocks: int = 4,
        num_global_blocks: int = 1,
        attention: str = "bidirectional",
        horizontal_global_attention: bool = False,
        num_different_global_patterns: int = 1,
    ):
        super().__init__(num_heads, block, different_layout_per_head)
        if num_local_blocks < 1 or num_global_blocks < 1:
            raise ValueError(
                f"num_local_blocks ({num_local_blocks}) and num_global_blocks ({num_global_blocks}) must be >= 1"
            )
        if num_local_blocks % num_global_blocks != 0:
            raise ValueError(
                f"num_local_blocks ({num_local_blocks}) must be divisible by num_global_blocks ({num_global_blocks})"
            )
        _check_attention(attention)
        if attention != "bidirectional" and horizontal_global_attention:
            raise ValueError("horizontal_global_attention is only supported with attention='bidirectional'")
        if num_different_global_patterns > 1 and not different_layout_per_head:
            raise ValueError(
                f"num_different_global_patterns={num_different_global_patterns} needs different_layout_per_head="
                "True (with one layout for all heads there is only one global pattern)"
            )
        if num_different_global_patterns > num_local_blocks // num_global_blocks:
            raise ValueError(
                f"num_different_global_patterns ({num_different_global_patterns}) cannot exceed num_local_blocks / "
                f"num_global_blocks = {num_local_blocks} / {num_global_blocks} = "
                f"{num_local_blocks // num_global_blocks}"
            )
        self.num_local_blocks = num_local_blocks
        self.num_global_blocks = num_global_blocks
        self.attention = attention
        self.horizontal_global_attention = horizontal_global_attention
        self.num_different_global_patterns = num_different_global_patterns

    def set_local_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        window = torch.arange(layout.shape[1]) // self.num_local_blocks  # window id of every block
        _set_windows(layout[h], window, self.attention == "unidirectional")
        return layout

    def _set_global(self, h: int, layout: torch.Tensor, first: int) -> None:
        last = first + self.num_global_blocks
        first_row = 0 if self.attention == "bidirectional" else first
        layout[h, first_row:, first:last] = 1
        if self.horizontal_global_attention:
            layout[h, first:last, :] = 1

    def set_global_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        nl, ng = self.num_local_blocks, self.num_global_blocks
        first_global = nl - (1 + h % self.num_different_global_patterns) * ng
        full_windows_end = nb - nb % nl
        for first in range(first_global, full_windows_end, nl):
            self._set_global(h, layout, first)
        if full_windows_end < nb:  # a short last window: its global blocks, clipped to the end
            self._set_global(h, layout, min(full_windows_end + first_global, nb - ng))
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            self.set_local_layout(h, layout)
            self.set_global_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)


class VariableSparsityConfig(SparsityConfig):
    """Random + variable-size local windows + global blocks (DeepSpeed's "variable" pattern).

    Random: `num_random_blocks` distinct columns per block-row (from the causal part when unidirectional).
    Local: consecutive windows of sizes `local_window_blocks` in order, the last size repeating to the end;
    full inside a window (lower-triangular when unidirectional). Global: the block indices in
    `global_block_indices` (or the ranges `[start, end)` when `global_block_end_indices` is given) are attended
    by all rows (later rows when unidirectional) and, with `horizontal_global_attention`, attend all columns.
    `seed` (not in DeepSpeed) seeds the random blocks; None draws from torch's global RNG.
    """

    def __init__(
        self,
        num_heads: int,
        block: int = 16,
        different_layout_per_head: bool = False,
        num_random_blocks: int = 0,
        local_window_blocks: Sequence[int] = (4,),
        global_block_indices: Sequence[int] = (0,),
        global_block_end_indices: Sequence[int] | None = None,
        attention: str = "bidirectional",
        horizontal_global_attention: bool = False,
        *,
        seed: int | None = None,
    ):
        super().__init__(num_heads, block, different_layout_per_head)
        if num_random_blocks < 0:
            raise ValueError(f"num_random_blocks must be >= 0, got {num_random_blocks}")
        if len(local_window_blocks) == 0 or any(w < 1 for w in local_window_blocks):
            raise ValueError(f"local_window_blocks must be a non-empty list of sizes >= 1, got {local_window_blocks}")
        _check_global_ranges(global_block_indices, global_block_end_indices)
        _check_attention(attention)
        if attention != "bidirectional" and horizontal_global_attention:
            raise ValueError("horizontal_global_attention is only supported with attention='bidirectional'")
        self.num_random_blocks = num_random_blocks
        self.local_window_blocks = list(local_window_blocks)
        self.global_block_indices = list(global_block_indices)
        self.global_block_end_indices = None if global_block_end_indices is None else list(global_block_end_indices)
        self.attention = attention
        self.horizontal_global_attention = horizontal_global_attention
        self.seed = seed

    def set_random_layout(self, h: int, layout: torch.Tensor, generator: torch.Generator | None = None):
        return _random_layout(self, h, layout, generator)

    def set_local_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        # windows of the listed sizes, then the last size repeated to the end of the sequence
        nb = layout.shape[1]
        sizes = torch.tensor(self.local_window_blocks)
        listed = int(sizes.sum())
        if nb > listed:
            sizes = torch.cat([sizes, sizes[-1:].expand(-(-(nb - listed) // self.local_window_blocks[-1]))])
        window = torch.repeat_interleave(torch.arange(len(sizes)), sizes)[:nb]  # window id of every block
        _set_windows(layout[h], window, self.attention == "unidirectional")
        return layout

    def set_global_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        if self.global_block_end_indices is None:
            ranges = [(i, i + 1) for i in self.global_block_indices]
        else:
            ranges = list(zip(self.global_block_indices, self.global_block_end_indices, strict=True))
        for start, end in ranges:
            if start >= nb:
                continue
            end = min(end, nb)
            first_row = 0 if self.attention == "bidirectional" else start
            layout[h, first_row:, start:end] = 1
            if self.horizontal_global_attention:
                layout[h, start:end, :] = 1
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        g = _generator(self.seed) if self.num_random_blocks > 0 else None
        for h in range(self.num_layout_heads):
            self.set_random_layout(h, layout, g)
            self.set_local_layout(h, layout)
            self.set_global_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)


class BigBirdSparsityConfig(SparsityConfig):
    """BigBird (arXiv:2007.14062) with ITC global blocks: random + symmetric sliding window + global.

    Random: `num_random_blocks` distinct columns per block-row (unidirectional: from columns <= row; an early row with
    fewer causal columns takes all of them). Sliding window: `num_sliding_window_blocks` centred on the diagonal.
    Global: the first `num_global_blocks` rows and columns are full. Unidirectional applies a lower-triangular mask
    to the result. `seed` (not in DeepSpeed) seeds the random blocks; None draws from torch's global RNG.
    """

    def __init__(
        self,
        num_heads: int,
        block: int = 16,
        different_layout_per_head: bool = False,
        num_random_blocks: int = 1,
        num_sliding_window_blocks: int = 3,
        num_global_blocks: int = 1,
        attention: str = "bidirectional",
        *,
        seed: int | None = None,
    ):
        super().__init__(num_heads, block, different_layout_per_head)
        if num_random_blocks < 0 or num_sliding_window_blocks < 0 or num_global_blocks < 0:
            raise ValueError(
                f"num_random_blocks ({num_random_blocks}), num_sliding_window_blocks ({num_sliding_window_blocks}) "
                f"and num_global_blocks ({num_global_blocks}) must be >= 0"
            )
        _check_attention(attention)
        self.num_random_blocks = num_random_blocks
        self.num_sliding_window_blocks = num_sliding_window_blocks
        self.num_global_blocks = num_global_blocks
        self.attention = attention
        self.seed = seed

    def set_random_layout(self, h: int, layout: torch.Tensor, generator: torch.Generator | None = None):
        return _random_layout(self, h, layout, generator)

    def set_sliding_window_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        _check_fits("num_sliding_window_blocks", self.num_sliding_window_blocks, nb)
        _band(layout[h], self.num_sliding_window_blocks // 2, causal=False)
        return layout

    def set_global_layout_itc(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        _check_fits("num_global_blocks", self.num_global_blocks, nb)
        layout[h, : self.num_global_blocks, :] = 1
        layout[h, :, : self.num_global_blocks] = 1
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        g = _generator(self.seed) if self.num_random_blocks > 0 else None
        for h in range(self.num_layout_heads):
            self.set_random_layout(h, layout, g)
            self.set_sliding_window_layout(h, layout)
            self.set_global_layout_itc(h, layout)
        layout = self.check_and_propagate_first_head_layout(layout)
        if self.attention == "unidirectional":
            layout = torch.tril(layout)
        return layout


class BSLongformerSparsityConfig(SparsityConfig):
    """Block-sparse Longformer (arXiv:2004.05150): symmetric sliding window + global blocks.

    Each global index (or `[start, end)` range with `global_block_end_indices`) gets its full row and full column.
    Unidirectional applies a lower-triangular mask to the result.
    """

    def __init__(
        self,
        num_heads: int,
        block: int = 16,
        different_layout_per_head: bool = False,
        num_sliding_window_blocks: int = 3,
        global_block_indices: Sequence[int] = (0,),
        global_block_end_indices: Sequence[int] | None = None,
        attention: str = "bidirectional",
    ):
        super().__init__(num_heads, block, different_layout_per_head)
        if num_sliding_window_blocks < 0:
            raise ValueError(f"num_sliding_window_blocks must be >= 0, got {num_sliding_window_blocks}")
        _check_global_ranges(global_block_indices, global_block_end_indices)
        _check_attention(attention)
        self.num_sliding_window_blocks = num_sliding_window_blocks
        self.global_block_indices = list(global_block_indices)
        self.global_block_end_indices = None if global_block_end_indices is None else list(global_block_end_indices)
        self.attention = attention

    def set_sliding_window_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        _check_fits("num_sliding_window_blocks", self.num_sliding_window_blocks, nb)
        _band(layout[h], self.num_sliding_window_blocks // 2, causal=False)
        return layout

    def set_global_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        if self.global_block_end_indices is None:
            ranges = [(i, i + 1) for i in self.global_block_indices]
        else:
            ranges = list(zip(self.global_block_indices, self.global_block_end_indices, strict=True))
        for start, end in ranges:
            if start < nb:
                end = min(end, nb)
                layout[h, start:end, :] = 1
                layout[h, :, start:end] = 1
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            self.set_sliding_window_layout(h, layout)
            self.set_global_layout(h, layout)
        layout = self.check_and_propagate_first_head_layout(layout)
        if self.attention == "unidirectional":
            layout = torch.tril(layout)
        return layout


class LocalSlidingWindowSparsityConfig(SparsityConfig):
    """Local sliding window: block-row `r` attends `[r - w, r]` (unidirectional, the default) or `[r - w, r + w]`
    (bidirectional), `w = num_sliding_window_blocks // 2`. One layout shared by all heads."""

    def __init__(
        self,
        num_heads: int,
        block: int = 16,
        num_sliding_window_blocks: int = 3,
        attention: str = "unidirectional",
    ):
        super().__init__(num_heads, block, different_layout_per_head=False)
        if num_sliding_window_blocks < 0:
            raise ValueError(f"num_sliding_window_blocks must be >= 0, got {num_sliding_window_blocks}")
        _check_attention(attention)
        self.num_sliding_window_blocks = num_sliding_window_blocks
        self.attention = attention

    def _params(self) -> dict:
        return {k: v for k, v in super()._params().items() if k != "different_layout_per_head"}

    def set_sliding_window_layout(self, h: int, layout: torch.Tensor) -> torch.Tensor:
        nb = layout.shape[1]
        _check_fits("num_sliding_window_blocks", self.num_sliding_window_blocks, nb)
        _band(layout[h], self.num_sliding_window_blocks // 2, causal=self.attention == "unidirectional")
        return layout

    def make_layout(self, seq_len: int) -> torch.Tensor:
        layout = self.setup_layout(seq_len)
        for h in range(self.num_layout_heads):
            self.set_sliding_window_layout(h, layout)
        return self.check_and_propagate_first_head_layout(layout)


def _set_windows(layout_h: torch.Tensor, window: torch.Tensor, causal: bool) -> None:
    """Set every (row, col) of a 2-D layout whose blocks share a window id (and col <= row when causal), in place."""
    keep = window.unsqueeze(1) == window.unsqueeze(0)
    if causal:
        keep = torch.tril(keep)
    layout_h[keep] = 1


def _set_random(layout_h: torch.Tensor, k: int, g: torch.Generator, causal: bool) -> None:
    """Set `k` distinct uniformly random columns in every row of a 2-D layout, in place (causal: among columns
    <= row; a row with fewer than k such columns gets all of them)."""
    nb = layout_h.shape[0]
    # the k smallest of i.i.d. uniform keys are a uniformly random k-subset of the columns
    keys = torch.rand((nb, nb), generator=g)
    allowed = torch.ones((nb, nb), dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed)
        keys = keys.masked_fill(~allowed, 2.0)  # after every allowed column
    cols = keys.topk(k, dim=1, largest=False).indices  # (nb, k)
    pick = torch.zeros((nb, nb), dtype=torch.bool).scatter_(1, cols, True) & allowed
    layout_h[pick] = 1


def _random_layout(cfg, h: int, layout: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """`num_random_blocks` random columns per row of head h (Variable and BigBird share this rule)."""
    _check_fits("num_random_blocks", cfg.num_random_blocks, layout.shape[1])
    if cfg.num_random_blocks == 0:
        return layout
    g = generator if generator is not None else _generator(cfg.seed)
    # unidirectional: only the causal part (DeepSpeed samples the whole row); short early rows take all
    _set_random(layout[h], cfg.num_random_blocks, g, causal=cfg.attention == "unidirectional")
    return layout


def _band(layout_h: torch.Tensor, w: int, causal: bool) -> None:
    """Set columns `[r - w, r + w]` (`[r - w, r]` when causal) of every row r of a 2-D layout, in place."""
    nb = layout_h.shape[0]
    r = torch.arange(nb).unsqueeze(1)
    c = torch.arange(nb).unsqueeze(0)
    band = (c >= r - w) & (c <= (r if causal else r + w))
    layout_h[band] = 1


def layout_to_block_indices(layout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-compressed form of a layout: which key blocks each query block-row attends.

    Args:
        layout: `(..., n_q_blocks, n_kv_blocks)` 0/1 (any integer or bool dtype), e.g. `(H, nq, nkv)`.

    Returns:
        `kv_num_blocks (..., nq)` int32, the number of attended key blocks per row, and
        `kv_indices (..., nq, nkv)` int32, their column indices in increasing order first, then the
        unattended columns (also increasing) as padding. This is FlexAttention's `BlockMask` convention;
        `kv_indices[..., i, :kv_num_blocks[..., i]]` are the attended columns of row `i`.
    """
    nz = layout != 0
    kv_num_blocks = nz.sum(-1, dtype=torch.int32)
    # stable sort of "not attended" puts attended columns first, each group in increasing column order
    kv_indices = torch.argsort((~nz).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return kv_num_blocks, kv_indices


def block_indices_to_layout(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> torch.Tensor:
    """Inverse of `layout_to_block_indices`: the int64 0/1 layout `(..., nq, nkv)`."""
    nkv = kv_indices.shape[-1]
    keep = torch.arange(nkv, device=kv_indices.device) < kv_num_blocks.unsqueeze(-1)
    layout = torch.zeros(kv_indices.shape, dtype=torch.int64, device=kv_indices.device)
    return layout.scatter_(-1, kv_indices.long(), keep.long())


def to_block_mask(layout: torch.Tensor, block: int, **kwargs):
    """Export a layout as a PyTorch FlexAttention `BlockMask`; see `fastlayers.kernels.torch.flex.to_block_mask`."""
    from fastlayers.kernels.torch.flex import to_block_mask as _to_block_mask

    return _to_block_mask(layout, block, **kwargs)
