"""Fast plain-PyTorch token gather / scatter of Random-LTD (no autograd; the Functions live in functional/).

Both layouts, (B, S, C) and (S, B, C), are read as one 2-D table of token rows: row (b, s) lives at
`b·sb + s·ss` elements from the start. With `u = min(sb, ss)`, when both strides are multiples of `u` and one
row's C elements fit in `u`, the whole tensor is an (N, C) strided view with row stride `u`, and a single
`index_select` / `index_copy_` / `index_add_` on that view moves all B·R rows in one ATen kernel (contiguous,
seq-first, a transposed view or a padded-C slice all qualify; no copy of the activations). Other layouts fall
back to advanced indexing on the (B, S, C) view, which handles any strides.
"""

from __future__ import annotations

import torch


def _bsc(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return x if batch_first else x.transpose(0, 1)


def _row_table(x: torch.Tensor, batch_first: bool) -> tuple[torch.Tensor, int, int] | None:
    """(rows view (N, C), step_b, step_s) with row (b, s) at rows[b·step_b + s·step_s], or None if impossible."""
    a = _bsc(x, batch_first)  # (B, S, C) view
    nb, ns, c = a.shape
    sb = a.stride(0) if nb > 1 else 0  # the stride of a size-1 dim is never used
    ss = a.stride(1) if ns > 1 else 0
    nonzero = [s for s in (sb, ss) if s != 0]
    if (nb > 1 and sb == 0) or (ns > 1 and ss == 0):
        return None  # expanded (stride-0) dim: rows alias each other
    u = min(nonzero) if nonzero else max(c, 1)
    if any(s % u for s in nonzero):
        return None
    if c > 1 and not 0 < a.stride(2) * (c - 1) < u:
        return None  # rows of the table would overlap (or C is expanded): in-place writes would be refused
    step_b, step_s = sb // u, ss // u
    n = (nb - 1) * step_b + (ns - 1) * step_s + 1
    rows = a.as_strided((n, c), (u, a.stride(2)), a.storage_offset())
    return rows, step_b, step_s


def _flat(indices: torch.Tensor, step_b: int, step_s: int, batch_first: bool) -> torch.Tensor:
    """Row numbers (int64) of the kept tokens, in the order of the gathered tensor's rows."""
    b = torch.arange(indices.shape[0], device=indices.device)[:, None]  # (B, 1)
    flat = b * step_b + indices.long() * step_s  # (B, R)
    return flat.reshape(-1) if batch_first else flat.t().reshape(-1)  # (B·R,) or (R·B,)


def _out_shape(x: torch.Tensor, indices: torch.Tensor, batch_first: bool) -> tuple[int, int, int]:
    b, r = indices.shape
    return (b, r, x.shape[-1]) if batch_first else (r, b, x.shape[-1])


def token_gather(activations: torch.Tensor, indices: torch.Tensor, batch_first: bool = True) -> torch.Tensor:
    """out[b, r] = act[b, idx[b, r]]: (B, S, C) -> (B, R, C) (or (S, B, C) -> (R, B, C)), a new contiguous tensor."""
    idx = indices.to(activations.device)
    table = _row_table(activations, batch_first)
    if table is None:
        rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
        return _bsc(_bsc(activations, batch_first)[rows, idx.long()], batch_first).contiguous()
    rows, step_b, step_s = table
    out = torch.index_select(rows, 0, _flat(idx, step_b, step_s, batch_first))  # (B·R, C)
    return out.view(_out_shape(activations, idx, batch_first))


def token_scatter_(
    all_activations: torch.Tensor, part_activations: torch.Tensor, indices: torch.Tensor, batch_first: bool = True
) -> torch.Tensor:
    """In place all[b, idx[b, r]] = part[b, r]; returns `all_activations`. A repeated position keeps one value."""
    idx = indices.to(all_activations.device)
    table = _row_table(all_activations, batch_first)
    if table is None:  # an expanded `all` cannot be written row-wise anyway; let indexing raise or cope
        rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
        _bsc(all_activations, batch_first)[rows, idx.long()] = _bsc(part_activations, batch_first)
        return all_activations
    rows, step_b, step_s = table
    src = part_activations.reshape(-1, part_activations.shape[-1])  # rows in (b, r) or (r, b) order, like _flat
    rows.index_copy_(0, _flat(idx, step_b, step_s, batch_first), src)
    return all_activations


def token_gather_bwd(
    grad_out: torch.Tensor, indices: torch.Tensor, seq_length: int, batch_first: bool = True
) -> torch.Tensor:
    """d act = zeros (B, S, C) (or (S, B, C)) with grad_out[b, r] added at row idx[b, r] (index_add: a row that
    keeps one position twice gets the sum)."""
    b, r = indices.shape
    c = grad_out.shape[-1]
    shape = (b, seq_length, c) if batch_first else (seq_length, b, c)
    dact = grad_out.new_zeros(shape)
    step_b, step_s = (seq_length, 1) if batch_first else (1, b)  # contiguous dact: row (b, s) at b·S + s or s·B + b
    src = grad_out.reshape(-1, c)
    dact.view(-1, c).index_add_(0, _flat(indices.to(grad_out.device), step_b, step_s, batch_first), src)
    return dact
