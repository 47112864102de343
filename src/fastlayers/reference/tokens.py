"""Reference (readable, any dtype) token gather / scatter and token sampling of Random-LTD.

Random-LTD (random layerwise token dropping; Yao et al., https://arxiv.org/abs/2211.11586) runs a middle layer
on a random subset of R of the S tokens of each sequence and writes the layer's output back over those tokens;
the dropped tokens skip the layer unchanged. DeepSpeed's `ops/random_ltd/dropping_utils.py` names the pieces:
`token_gather`, `token_scatter_`, `gpt_sample_tokens`, `bert_sample_tokens`.

Layouts: activations are (B, S, C) when `batch_first`, else (S, B, C) (Megatron's seq-first order); indices are
always (B, R), one row of kept positions per sequence.
"""

from __future__ import annotations

import torch


def batch_seq_view(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """x as a (B, S, C) view: itself when batch_first, else the (S, B, C) tensor transposed (no copy)."""
    return x if batch_first else x.transpose(0, 1)


def token_gather_ref(activations: torch.Tensor, indices: torch.Tensor, batch_first: bool = True) -> torch.Tensor:
    """The kept tokens of each sequence: out[b, r] = act[b, indices[b, r]].

    Args:
        activations: (B, S, C) if batch_first else (S, B, C), any dtype, any strides.
        indices: (B, R) int32/int64 positions in [0, S).
        batch_first: layout of `activations` and of the result.

    Returns:
        A new tensor (B, R, C) if batch_first else (R, B, C).

    Autograd: advanced indexing, whose backward is index_put with accumulate=True, i.e. the gradient of a
    position kept twice in one row is the sum of both (index_add semantics).
    """
    a = batch_seq_view(activations, batch_first)  # (B, S, C)
    rows = torch.arange(a.shape[0], device=a.device)[:, None]  # (B, 1), broadcast against (B, R)
    out = a[rows, indices.long()]  # (B, R, C)
    return batch_seq_view(out, batch_first)


def token_scatter_ref_(
    all_activations: torch.Tensor, part_activations: torch.Tensor, indices: torch.Tensor, batch_first: bool = True
) -> torch.Tensor:
    """In place: all[b, indices[b, r]] = part[b, r]; returns `all_activations`.

    Args:
        all_activations: (B, S, C) if batch_first else (S, B, C); written in place.
        part_activations: (B, R, C) if batch_first else (R, B, C), same dtype.
        indices: (B, R) int32/int64 positions in [0, S). If a row repeats a position, one of its values is kept.
    """
    a = batch_seq_view(all_activations, batch_first)  # (B, S, C) view of the same storage
    p = batch_seq_view(part_activations, batch_first)  # (B, R, C)
    rows = torch.arange(a.shape[0], device=a.device)[:, None]
    a[rows, indices.long()] = p
    return all_activations


def token_gather_grad_ref(
    grad_out: torch.Tensor, indices: torch.Tensor, seq_length: int, batch_first: bool = True
) -> torch.Tensor:
    """Gradient of token_gather: zeros (B, S, C) (or (S, B, C)) with grad_out[b, r] added at row indices[b, r].

    dact[b, s] = Σ_{r: indices[b, r] = s} grad_out[b, r]   (a sum when a row repeats a position: index_add)
    """
    g = batch_seq_view(grad_out, batch_first)  # (B, R, C)
    b, r, c = g.shape
    dact = g.new_zeros(b, seq_length, c)
    for i in range(b):
        dact[i].index_add_(0, indices[i].long(), g[i])
    return batch_seq_view(dact, batch_first)


def sample_token_indices(
    reserved_length: int,
    seq_length: int,
    batch_size: int,
    layers: int = 1,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniformly random sets of `reserved_length` distinct positions out of `seq_length`, sorted ascending.

    The draw is DeepSpeed's: `torch.multinomial(ones(layers·batch, S), R)` without replacement, so the same
    seed gives the same sets as `deepspeed.ops.random_ltd.dropping_utils`; then each row is sorted (DeepSpeed's
    `token_sort_` CUDA kernel, here `torch.sort`, with no limit on R or S).

    Returns:
        (layers, batch_size, reserved_length) int32, each row strictly increasing in [0, seq_length).
    """
    weights = torch.ones(layers * batch_size, seq_length, device=device)
    idx = torch.multinomial(weights, reserved_length, replacement=False, generator=generator)  # (L·B, R) int64
    idx = idx.sort(dim=-1).values
    return idx.reshape(layers, batch_size, reserved_length).to(torch.int32)


def gather_mask_ref(attn_mask: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The kept rows and columns of an attention mask, per sequence (what `bert_sample_tokens` returns per layer).

    out[b, h, i, j] = mask[b, h, idx[b, i], idx[b, j]]  (DeepSpeed: `mask[b:b+1, :, idx, :][:, :, :, idx]`)

    Args:
        attn_mask: (B or 1, H, S or 1, S), any dtype. A size-1 batch dim is shared by every sequence; a size-1
            query dim (a key-padding mask) stays 1, only its key columns are gathered.
        indices: (B, R) positions in [0, S).

    Returns:
        (B, H, R or 1, R).
    """
    b = indices.shape[0]
    idx = indices.to(device=attn_mask.device, dtype=torch.long)
    m = attn_mask.expand(b, *attn_mask.shape[1:])  # (B, H, Sq, S), no copy
    rows = torch.arange(b, device=attn_mask.device)[:, None, None, None]  # (B, 1, 1, 1)
    heads = torch.arange(m.shape[1], device=attn_mask.device)[None, :, None, None]  # (1, H, 1, 1)
    q = idx[:, None, :, None] if m.shape[2] != 1 else torch.zeros_like(idx[:, None, :1, None])  # (B, 1, R|1, 1)
    k = idx[:, None, None, :]  # (B, 1, 1, R)
    return m[rows, heads, q, k]  # (B, H, R|1, R)
