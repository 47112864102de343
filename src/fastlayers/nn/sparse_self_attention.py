"""Block-sparse self-attention modules with DeepSpeed's names and arguments (`SparseSelfAttention`,
`BertSparseSelfAttention`), running on `fastlayers.functional.block_sparse.block_sparse_attention`.

Differences from DeepSpeed 0.19.6 (`deepspeed.ops.sparse_attention`), on purpose:
- fp32, fp16, bf16 (and fp64) all work, with backward, including a gradient for `rpe`. No fp16-only assert.
- Layouts are cached per module and sequence length (DeepSpeed's class-wide op cache is keyed by the sequence
  length only and is shared by every module, whatever its sparsity config).
- Query rows that may attend no key give zeros (DeepSpeed: NaN).
- Clear errors: an abstract `SparsityConfig`, a sequence length above `max_seq_length` or not a multiple of the
  block, a head-count mismatch, and badly shaped masks are reported naming the values.
Kept from DeepSpeed: the master layout is built once at `max_seq_length`, stored as the `master_layout` buffer
(in the state_dict, so DeepSpeed checkpoints load), broadcast from rank 0 on the first forward when
torch.distributed is initialised, and the layout for a length S is its top-left `S/block x S/block` slice.
"""

from __future__ import annotations

import torch
from torch import nn

from fastlayers.functional.block_sparse import block_sparse_attention
from fastlayers.sparsity_config import FixedSparsityConfig, SparsityConfig, to_block_mask


class SparseSelfAttention(nn.Module):
    """Block-sparse self-attention over `(B, H, S, D)` query/key/value (DeepSpeed `SparseSelfAttention`).

    `out = softmax(q·kᵀ·D**-0.5 + rpe + key_padding_mask + attn_mask) @ v`, with the scores of key blocks outside
    the layout excluded. No dropout, no projections (see `BertSparseSelfAttention`).

    Layout for a sequence length S: the top-left slice of `master_layout = sparsity_config.make_layout(
    max_seq_length)`, as in DeepSpeed. For most patterns it equals `sparsity_config.make_layout(S)`; it differs where
    a pattern depends on where the sequence ends (Fixed with a short last local window places that window's global
    block(s) at the end of the sequence; random blocks are drawn once, for `max_seq_length`). Slicing keeps one
    pattern, and one set of random blocks, for every length, and DeepSpeed checkpoints load.

    Args:
        sparsity_config: a concrete pattern (`FixedSparsityConfig`, `BigBirdSparsityConfig`, ...). The default, the
            abstract `SparsityConfig(num_heads=4)` kept for DeepSpeed's signature, raises NotImplementedError.
        key_padding_mask_mode: "add" (values added to the scores) or "mul" (0 → masked, nonzero → kept).
        attn_mask_mode: "add" or "mul", as above.
        max_seq_length: the longest sequence; the master layout is built for it.
        backend: `block_sparse_attention` backend ("reference" | "torch" | "triton" | None = automatic).
    """

    def __init__(
        self,
        sparsity_config: SparsityConfig = SparsityConfig(num_heads=4),
        key_padding_mask_mode: str = "add",
        attn_mask_mode: str = "mul",
        max_seq_length: int = 2048,
        *,
        backend: str | None = None,
    ):
        super().__init__()
        for name, mode in (("key_padding_mask_mode", key_padding_mask_mode), ("attn_mask_mode", attn_mask_mode)):
            if mode not in ("add", "mul"):
                raise ValueError(f"{name} must be 'add' or 'mul', got {mode!r}")
        if type(sparsity_config).make_layout is SparsityConfig.make_layout:
            raise NotImplementedError(
                "SparseSelfAttention needs a concrete sparsity pattern, got the abstract "
                f"{type(sparsity_config).__name__} (DeepSpeed's default argument): pass e.g. "
                "FixedSparsityConfig(num_heads=H), BigBirdSparsityConfig, "
                "BSLongformerSparsityConfig, VariableSparsityConfig, LocalSlidingWindowSparsityConfig or "
                "DenseSparsityConfig"
            )
        self.sparsity_config = sparsity_config
        self.key_padding_mask_mode = key_padding_mask_mode
        self.attn_mask_mode = attn_mask_mode
        self.max_seq_length = int(max_seq_length)
        self.backend = backend
        self.register_buffer("master_layout", sparsity_config.make_layout(self.max_seq_length))
        self._need_layout_synchronization = True
        self._layouts: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._register_load_state_dict_pre_hook(self._clear_layouts)

    @property
    def block(self) -> int:
        return self.sparsity_config.block

    @property
    def num_heads(self) -> int:
        return self.sparsity_config.num_heads

    def extra_repr(self) -> str:
        return (
            f"{type(self.sparsity_config).__name__}, num_heads={self.num_heads}, block={self.block}, "
            f"max_seq_length={self.max_seq_length}, key_padding_mask_mode={self.key_padding_mask_mode!r}, "
            f"attn_mask_mode={self.attn_mask_mode!r}"
        )

    def _clear_layouts(self, *args, **kwargs) -> None:
        self._layouts.clear()

    def _apply(self, fn, recurse=True):
        self._layouts.clear()  # .to() / .cuda() replace master_layout
        return super()._apply(fn, recurse)

    def _sync_layout(self) -> None:
        # Random layouts must be identical on every rank: take rank 0's (as DeepSpeed does).
        if (
            self._need_layout_synchronization
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            torch.distributed.broadcast(self.master_layout, src=0)
            self._layouts.clear()
        self._need_layout_synchronization = False

    def get_layout(self, seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The `(num_heads, seq_len/block, seq_len/block)` layout used for `seq_len` (cached per length, device)."""
        self._sync_layout()
        if seq_len > self.max_seq_length:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_seq_length={self.max_seq_length} of this SparseSelfAttention "
                "(build it with a larger max_seq_length)"
            )
        if seq_len % self.block != 0:
            raise ValueError(
                f"sequence length {seq_len} must be a multiple of the block size {self.block} "
                "(pad it, e.g. with SparseAttentionUtils.pad_to_block_size)"
            )
        device = torch.device(device) if device is not None else self.master_layout.device
        key = (seq_len, device)
        layout = self._layouts.get(key)
        if layout is None:
            nb = seq_len // self.block
            layout = self.master_layout[:, :nb, :nb].to(device).contiguous()
            self._layouts[key] = layout
        return layout

    def to_block_mask(self, seq_len: int, **kwargs):
        """The layout for `seq_len` as a FlexAttention `BlockMask` (keywords of `sparsity_config.to_block_mask`)."""
        return to_block_mask(self.get_layout(seq_len), self.block, **kwargs)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        rpe: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            query, key, value: (B, H, S, D); a key given as (B, H, D, S) is transposed back (as DeepSpeed does).
            rpe: (B or 1, H, S, S) additive relative-position bias in query's dtype (gets a gradient).
            key_padding_mask: (B, S) or (B, 1, 1, S), per `key_padding_mask_mode`; cast to query's dtype.
            attn_mask: (S, S) (extra singleton dims are squeezed), per `attn_mask_mode`; cast to query's dtype.

        Returns:
            (B, H, S, D) in query's dtype.
        """
        if query.dim() != 4:
            raise ValueError(f"query must be (B, H, S, D), got shape {tuple(query.shape)}")
        B, H, S, D = query.shape
        if key.dim() == 4 and key.shape[2] != S:
            key = key.transpose(-2, -1)  # given as (B, H, D, S)
        if not (query.shape == key.shape == value.shape):
            raise NotImplementedError(
                "only self-attention is supported: query, key and value must have the same shape, got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if H != self.num_heads:
            raise ValueError(
                f"query has {H} heads but the sparsity config has num_heads={self.num_heads}; they must match"
            )
        layout = self.get_layout(S, query.device)
        if key_padding_mask is not None:
            key_padding_mask = _squeeze_key_padding_mask(key_padding_mask, B, S).to(query.dtype)
        if attn_mask is not None:
            attn_mask = _squeeze_attn_mask(attn_mask, S).to(query.dtype)
        return block_sparse_attention(
            query,
            key,
            value,
            layout,
            block=self.block,
            softmax_scale=D**-0.5,
            rpe=rpe,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            key_padding_mask_mode=self.key_padding_mask_mode,
            attn_mask_mode=self.attn_mask_mode,
            backend=self.backend,
        )


def _squeeze_key_padding_mask(mask: torch.Tensor, B: int, S: int) -> torch.Tensor:
    squeezed = mask.reshape(mask.shape[0], -1) if mask.dim() > 1 else mask
    if mask.dim() < 2 or any(d != 1 for d in mask.shape[1:-1]) or tuple(squeezed.shape) not in ((B, S), (1, S)):
        raise ValueError(f"key_padding_mask must be (B, S) or (B, 1, 1, S) with B={B}, S={S}, got {tuple(mask.shape)}")
    return squeezed.expand(B, S).contiguous()


def _squeeze_attn_mask(mask: torch.Tensor, S: int) -> torch.Tensor:
    if mask.dim() < 2 or any(d != 1 for d in mask.shape[:-2]) or tuple(mask.shape[-2:]) != (S, S):
        raise ValueError(
            f"attn_mask must be (S, S) with S={S} (singleton leading dims allowed), got {tuple(mask.shape)}"
        )
    return mask.reshape(S, S)


class BertSparseSelfAttention(nn.Module):
    """Drop-in for the self-attention of a BERT/RoBERTa layer (`layer.attention.self`) with block-sparse attention.

    Same parameter names as HF's `BertSelfAttention` (`query`, `key`, `value` Linear), so state_dicts load both
    ways. `forward(hidden_states, attention_mask=None, **kwargs)` returns `(context, None)` as transformers 5.x's
    `BertSelfAttention` does (DeepSpeed's returned the bare tensor). No attention dropout (as DeepSpeed).

    `attention_mask` may be what HF passes (None; `(B, 1, S, S)` or `(B, 1, 1, S)`, bool = keep or additive float),
    DeepSpeed's extended mask `(B, 1, 1, S)`, or a `(B, S)` mask (bool/int: 1 = keep; float: additive). Only key
    padding can be expressed (the sparse op takes a per-key mask): a 4-D mask whose query rows differ (e.g. causal)
    is refused; use a unidirectional sparsity config for causal attention.

    Args:
        config: a BERT-like config with `hidden_size`, `num_attention_heads` (and `max_position_embeddings`).
        sparsity_config: the pattern; its `num_heads` must equal `config.num_attention_heads`.
        max_seq_length: longest sequence; default the larger of 2048 and `config.max_position_embeddings` rounded
            up to the block (DeepSpeed always used 2048).
        backend: `block_sparse_attention` backend, or None for automatic.
    """

    def __init__(
        self,
        config,
        sparsity_config: SparsityConfig = FixedSparsityConfig(num_heads=4),
        *,
        max_seq_length: int | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(
                f"The hidden size ({config.hidden_size}) is not a multiple of the number of attention heads "
                f"({config.num_attention_heads})"
            )
        if sparsity_config.num_heads != config.num_attention_heads:
            raise ValueError(
                f"sparsity_config.num_heads ({sparsity_config.num_heads}) must equal the model's "
                f"num_attention_heads ({config.num_attention_heads})"
            )
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        if max_seq_length is None:
            block = sparsity_config.block
            max_pos = int(getattr(config, "max_position_embeddings", 0) or 0)
            max_seq_length = max(2048, -(-max_pos // block) * block)
        self.sparse_self_attention = SparseSelfAttention(
            sparsity_config, max_seq_length=max_seq_length, backend=backend
        )

    def transpose_for_scores(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        return x.view(B, S, self.num_attention_heads, self.attention_head_size).transpose(1, 2)  # (B, H, S, d)

    def to_block_mask(self, seq_len: int, **kwargs):
        """The layout for `seq_len` as a FlexAttention `BlockMask`."""
        return self.sparse_self_attention.to_block_mask(seq_len, **kwargs)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        encoder_hidden_states: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if encoder_hidden_states is not None:
            raise NotImplementedError(
                "BertSparseSelfAttention supports self-attention only (got encoder_hidden_states)"
            )
        if past_key_values is not None:
            raise NotImplementedError("BertSparseSelfAttention does not support a KV cache (past_key_values)")
        B, S, _ = hidden_states.shape
        q = self.transpose_for_scores(self.query(hidden_states))  # (B, H, S, d)
        k = self.transpose_for_scores(self.key(hidden_states))
        v = self.transpose_for_scores(self.value(hidden_states))
        kpm = _bert_key_padding_mask(attention_mask, B, S, hidden_states.dtype)
        ctx = self.sparse_self_attention(q, k, v, key_padding_mask=kpm)  # (B, H, S, d), kpm in "add" mode
        ctx = ctx.transpose(1, 2).reshape(B, S, self.all_head_size)  # (B, S, H*d)
        return ctx, None


def _bert_key_padding_mask(mask, B: int, S: int, dtype: torch.dtype) -> torch.Tensor | None:
    """An HF / DeepSpeed BERT attention mask as an additive (B, S) key-padding mask (None when there is none)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a tensor or None, got {type(mask).__name__} (e.g. a FlexAttention BlockMask: "
            "use attn_implementation='eager' or 'sdpa' with BertSparseSelfAttention)"
        )
    if mask.dim() == 4:
        if mask.shape[0] not in (1, B) or mask.shape[-1] != S or mask.shape[2] not in (1, S):
            raise ValueError(f"attention_mask must be (B, 1, S or 1, S) with B={B}, S={S}, got {tuple(mask.shape)}")
        first = mask[:, :1, :1, :]
        if mask.shape[1] * mask.shape[2] > 1 and not bool((mask == first).all()):
            raise ValueError(
                "BertSparseSelfAttention supports key-padding masks only, but this attention_mask differs between "
                "query rows or heads (e.g. a causal mask); use a unidirectional sparsity config for causal attention"
            )
        mask = first.reshape(first.shape[0], S)
    elif mask.dim() != 2 or mask.shape[-1] != S or mask.shape[0] not in (1, B):
        raise ValueError(f"attention_mask must be (B, S) or (B, 1, 1, S) with B={B}, S={S}, got {tuple(mask.shape)}")
    if not mask.is_floating_point():  # keep-mask: True / 1 = attend
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask == 0, float("-inf"))
    return mask.to(dtype).expand(B, S)
