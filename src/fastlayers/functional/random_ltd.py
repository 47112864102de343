"""Random-LTD token gather / scatter and token sampling, with DeepSpeed's public names and semantics.

DeepSpeed's `deepspeed/ops/random_ltd/dropping_utils.py` (CUDA ops `token_gather`, `token_scatter_`,
`token_sort_`) as plain functions with backend dispatch, the `GatherTokens` / `ScatterTokens` autograd pair
of a Random-LTD layer, and the two samplers. Differences from DeepSpeed, each a known DeepSpeed limit (see
the shared behaviour notes, §3.4, §3.5 and §6):

- any float dtype (DeepSpeed's kernels: fp32 / fp16 only, bf16 misread as half), any C, any R and S (the CUDA
  sort was limited to R <= 2048), and strided activations (a seq-first tensor viewed batch-first is not copied);
- `token_gather` has a correct backward of its own (index_add into zeros), not only through `GatherTokens`;
- `GatherTokens.backward` does not overwrite the incoming gradient buffer in place (it may be shared or
  expanded), it writes into a copy;
- `bert_sample_tokens` also takes a (B, 1, 1, S) key-padding mask and a mask with batch dim 1, and the samplers
  take a `generator=` and raise ValueError for bad sizes and mask shapes.

Indices are checked against [0, S) on every device before any kernel runs (on CUDA that costs one device sync
per call: a bad index is an error, never a silently zeroed token). The Triton kernels also mask out-of-range
indices themselves, so a launcher called directly never reads or writes out of bounds.
"""

from __future__ import annotations

import numbers
from types import SimpleNamespace

import torch
from torch.autograd.function import once_differentiable

from fastlayers import backends
from fastlayers.backends import Impl
from fastlayers.kernels.torch import tokens as torch_kernels
from fastlayers.reference.tokens import (
    gather_mask_ref,
    sample_token_indices,
    token_gather_grad_ref,
    token_gather_ref,
    token_scatter_ref_,
)
from fastlayers.utils import FLOAT_DTYPES, check_tensor, dtype_name

INDEX_DTYPES = (torch.int32, torch.int64)
MAX_SEQ_LENGTH = 2**24  # torch.multinomial's limit on the number of categories

# the raw (no autograd) gather / scatter / gather-backward of each backend, used inside the Functions
_REFERENCE_KERNELS = SimpleNamespace(
    token_gather=token_gather_ref, token_scatter_=token_scatter_ref_, token_gather_bwd=token_gather_grad_ref
)


def _triton_kernels():
    from fastlayers.kernels.triton import tokens as triton_kernels

    return triton_kernels


def _kernels(name: str):
    if name == "reference":
        return _REFERENCE_KERNELS
    if name == "torch":
        return torch_kernels
    return _triton_kernels()


# -- token_gather: one autograd Function per fast backend (the reference's indexing has autograd already) --


def _gather_forward(ctx, kern, activations, indices, batch_first):
    ctx.save_for_backward(indices)
    ctx.batch_first = batch_first
    ctx.seq_length = activations.shape[1 if batch_first else 0]
    return kern.token_gather(activations, indices, batch_first)


def _gather_backward(ctx, kern, grad_out):
    (indices,) = ctx.saved_tensors
    return kern.token_gather_bwd(grad_out, indices, ctx.seq_length, ctx.batch_first), None, None


class TokenGatherTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, activations, indices, batch_first):
        return _gather_forward(ctx, torch_kernels, activations, indices, batch_first)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return _gather_backward(ctx, torch_kernels, grad_out)


class TokenGatherTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, activations, indices, batch_first):
        return _gather_forward(ctx, _triton_kernels(), activations, indices, batch_first)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return _gather_backward(ctx, _triton_kernels(), grad_out)


def _torch_gather_impl(activations, indices, batch_first=True):
    return TokenGatherTorchFunction.apply(activations, indices, batch_first)


def _triton_gather_impl(activations, indices, batch_first=True):
    return TokenGatherTritonFunction.apply(activations, indices, batch_first)


def _torch_scatter_impl(all_activations, part_activations, indices, batch_first=True):
    return torch_kernels.token_scatter_(all_activations, part_activations, indices, batch_first)


def _triton_scatter_impl(all_activations, part_activations, indices, batch_first=True):
    return _triton_kernels().token_scatter_(all_activations, part_activations, indices, batch_first)


_HERE = "fastlayers.functional.random_ltd"
_CUDA = frozenset({"cuda"})  # plus CPU under TRITON_INTERPRET=1 (added by backends.py)
backends.register(Impl("token_gather", "reference", "fastlayers.reference.tokens:token_gather_ref"))
backends.register(Impl("token_gather", "torch", f"{_HERE}:_torch_gather_impl"))
backends.register(Impl("token_gather", "triton", f"{_HERE}:_triton_gather_impl", devices=_CUDA))
backends.register(Impl("token_scatter", "reference", "fastlayers.reference.tokens:token_scatter_ref_"))
backends.register(Impl("token_scatter", "torch", f"{_HERE}:_torch_scatter_impl"))
backends.register(Impl("token_scatter", "triton", f"{_HERE}:_triton_scatter_impl", devices=_CUDA))


# -- validation (before any kernel) --


def _layout(batch_first: bool) -> str:
    return "(B, S, C)" if batch_first else "(S, B, C)"


def _validate_activations(name: str, x, batch_first) -> None:
    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first must be a bool, got {type(batch_first).__name__} {batch_first!r}")
    check_tensor(name, x, dtypes=FLOAT_DTYPES)
    if x.dim() != 3:
        raise ValueError(
            f"{name} must have 3 dims {_layout(batch_first)} (batch_first={batch_first}), got shape {tuple(x.shape)}"
        )


def _validate_indices(indices, activations: torch.Tensor, batch_first: bool, act_name: str) -> None:
    check_tensor("indices", indices, dtypes=INDEX_DTYPES)
    if indices.dim() != 2:
        raise ValueError(f"indices must have 2 dims (B, R), got shape {tuple(indices.shape)}")
    b, s = (activations.shape[0], activations.shape[1]) if batch_first else (activations.shape[1], activations.shape[0])
    if indices.shape[0] != b:
        raise ValueError(
            f"indices has batch {indices.shape[0]} (shape {tuple(indices.shape)}) but {act_name} "
            f"{tuple(activations.shape)} has batch {b} (batch_first={batch_first})"
        )
    if indices.device != activations.device:
        raise ValueError(f"indices is on {indices.device} but {act_name} is on {activations.device}")
    if indices.numel():
        lo, hi = (int(t) for t in torch.aminmax(indices))  # one pass (and one sync on CUDA)
        if lo < 0 or hi >= s:
            raise ValueError(
                f"indices must be in [0, S={s}) (S from {act_name} {tuple(activations.shape)}), "
                f"got min {lo} and max {hi}"
            )


def _validate_part(part, all_activations: torch.Tensor, indices: torch.Tensor, batch_first: bool) -> None:
    _validate_activations("part_activations", part, batch_first)
    b, r = indices.shape
    c = all_activations.shape[-1]
    want = (b, r, c) if batch_first else (r, b, c)
    if tuple(part.shape) != want:
        raise ValueError(
            f"part_activations must have shape {want} ({'(B, R, C)' if batch_first else '(R, B, C)'} from indices "
            f"{tuple(indices.shape)} and all_activations {tuple(all_activations.shape)}), got {tuple(part.shape)}"
        )
    if part.dtype != all_activations.dtype:
        raise TypeError(
            f"part_activations has dtype {dtype_name(part.dtype)} but all_activations has "
            f"{dtype_name(all_activations.dtype)}; they must match"
        )
    if part.device != all_activations.device:
        raise ValueError(f"part_activations is on {part.device} but all_activations is on {all_activations.device}")


def _validate_gather(activations, indices, batch_first) -> None:
    _validate_activations("activations", activations, batch_first)
    _validate_indices(indices, activations, batch_first, "activations")


def _validate_scatter(all_activations, part_activations, indices, batch_first) -> None:
    _validate_activations("all_activations", all_activations, batch_first)
    _validate_indices(indices, all_activations, batch_first, "all_activations")
    _validate_part(part_activations, all_activations, indices, batch_first)


# -- public gather / scatter --


def token_gather(
    activations: torch.Tensor, indices: torch.Tensor, batch_first: bool = True, *, backend: str | None = None
) -> torch.Tensor:
    """The kept tokens of each sequence: out[b, r] = activations[b, indices[b, r]].

    Args:
        activations: (B, S, C) if batch_first else (S, B, C); fp16 / bf16 / fp32 / fp64; any strides.
        indices: (B, R) int32 or int64, positions in [0, S), on the device of `activations`. Random-LTD's are
            sorted and distinct, but neither is required.
        batch_first: layout of `activations` and of the result (DeepSpeed's "batch_seq_dim" vs "seq_batch_dim").
        backend: "reference" | "torch" | "triton" | None (FASTLAYERS_BACKEND, then triton -> torch -> reference
            on CUDA, torch -> reference on CPU).

    Returns:
        A new tensor (B, R, C) if batch_first else (R, B, C), dtype of activations.

    Differentiable in `activations`: the gradient is zeros with grad_out[b, r] *added* at row indices[b, r]
    (index_add semantics), so a position kept twice in one row gets the sum of both gradients.

    Equivalent PyTorch:
        `fastlayers.reference.tokens.token_gather_ref` (= `act[arange(B)[:, None], indices]` on the (B, S, C) view).

    Backends:
        reference: advanced indexing, every dtype and device.
        torch: one `index_select` (backward `index_add_`) on an (N, C) row view; every dtype and device.
        triton: row copies; the backward sums each destination row's sources in fp32 (no atomics,
            deterministic). CUDA fp16/bf16/fp32; CPU fp16/fp32 under TRITON_INTERPRET=1 (tests).
    """
    _validate_gather(activations, indices, batch_first)
    impl = backends.select("token_gather", backend, activations=activations, indices=indices, batch_first=batch_first)
    return impl.resolve()(activations, indices, batch_first)


def token_scatter_(
    all_activations: torch.Tensor,
    part_activations: torch.Tensor,
    indices: torch.Tensor,
    batch_first: bool = True,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """In place: all_activations[b, indices[b, r]] = part_activations[b, r]; returns `all_activations`.

    No autograd (DeepSpeed's in-place helper): with grad mode on and an input that requires grad it raises
    RuntimeError; use `ScatterTokens.apply` there, or call it under `torch.no_grad()`. If a row repeats a
    position, one of the values written there is kept (which one is unspecified, as for `index_copy_`).

    Args:
        all_activations: (B, S, C) if batch_first else (S, B, C), written in place; fp16 / bf16 / fp32 / fp64.
        part_activations: (B, R, C) if batch_first else (R, B, C), same dtype and device.
        indices: (B, R) int32 or int64, positions in [0, S).
        batch_first: layout of both activation tensors.
        backend: as for `token_gather`.
    """
    _validate_scatter(all_activations, part_activations, indices, batch_first)
    if torch.is_grad_enabled() and (all_activations.requires_grad or part_activations.requires_grad):
        raise RuntimeError(
            "token_scatter_ does not record autograd, but an input requires grad: use "
            "ScatterTokens.apply(all_activations, part_activations, indices, batch_first) or torch.no_grad()"
        )
    impl = backends.select(
        "token_scatter",
        backend,
        all_activations=all_activations,
        part_activations=part_activations,
        indices=indices,
        batch_first=batch_first,
    )
    return impl.resolve()(all_activations, part_activations, indices, batch_first)


# -- DeepSpeed's autograd pair for a Random-LTD layer --


class GatherTokens(torch.autograd.Function):
    """DeepSpeed's `GatherTokens`: `(activations, gathered) = GatherTokens.apply(act, sorted_indices, batch_first)`.

    forward: returns `activations` unchanged (a pass-through for the later `ScatterTokens`) and
    `token_gather(activations, sorted_indices, batch_first)`.
    backward(grad_activations, grad_gathered): grad_activations with the kept positions **overwritten** (not
    summed) by grad_gathered, i.e. `token_scatter_(grad_activations.clone(), grad_gathered, sorted_indices)`.

    The overwrite is what makes gather -> layer -> `ScatterTokens` exact: `ScatterTokens.backward` passes the whole
    upstream gradient to its `all` input, including the kept positions, whose true gradient flows only through
    the layer; overwriting them here discards that spurious pass-through term. On its own (pass-through output
    unused) the overwrite equals the plain gather gradient for distinct indices; with a repeated index one of the
    gradients is kept, not their sum (use `token_gather` for index_add semantics).

    Unlike DeepSpeed, the incoming gradient buffer is not modified (it may be shared or expanded): the result is
    written into a copy. An optional 4th argument `backend` ("reference" | "torch" | "triton" | None) picks the
    kernels as `token_gather` does.
    """

    @staticmethod
    def forward(ctx, activations, sorted_indices, batch_first=True, backend=None):
        _validate_gather(activations, sorted_indices, batch_first)
        impl = backends.select(
            "token_gather", backend, activations=activations, indices=sorted_indices, batch_first=batch_first
        )
        ctx.backend = impl.name
        ctx.batch_first = batch_first
        ctx.save_for_backward(sorted_indices)
        return activations, _kernels(impl.name).token_gather(activations, sorted_indices, batch_first)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_activations, grad_gathered):
        (sorted_indices,) = ctx.saved_tensors
        grad = grad_activations.clone(memory_format=torch.contiguous_format)
        _kernels(ctx.backend).token_scatter_(grad, grad_gathered, sorted_indices, ctx.batch_first)
        return grad, None, None, None


class ScatterTokens(torch.autograd.Function):
    """DeepSpeed's `ScatterTokens`: `out = ScatterTokens.apply(all_activations, layer_activations, sorted_indices,
    batch_first)`.

    forward: `token_scatter_(all_activations.clone(), layer_activations, sorted_indices, batch_first)`.
    backward(out_grad): grad of `all_activations` = out_grad **unchanged** (DeepSpeed's semantics: not zeroed at
    the overwritten positions, so on its own this gradient is wrong there: the exact one is 0), grad of
    `layer_activations` = token_gather(out_grad, sorted_indices).

    Exact only when `all_activations` is the pass-through output of `GatherTokens` with the same indices, whose
    backward overwrites the kept positions (see `GatherTokens`). That pairing is how a Random-LTD layer uses it.
    An optional 5th argument `backend` picks the kernels as `token_scatter_` does.
    """

    @staticmethod
    def forward(ctx, all_activations, layer_activations, sorted_indices, batch_first=True, backend=None):
        _validate_scatter(all_activations, layer_activations, sorted_indices, batch_first)
        impl = backends.select(
            "token_scatter",
            backend,
            all_activations=all_activations,
            part_activations=layer_activations,
            indices=sorted_indices,
            batch_first=batch_first,
        )
        ctx.backend = impl.name
        ctx.batch_first = batch_first
        ctx.save_for_backward(sorted_indices)
        out = all_activations.clone()
        return _kernels(impl.name).token_scatter_(out, layer_activations, sorted_indices, batch_first)

    @staticmethod
    @once_differentiable
    def backward(ctx, out_grad):
        (sorted_indices,) = ctx.saved_tensors
        grad_part = _kernels(ctx.backend).token_gather(out_grad, sorted_indices, ctx.batch_first)
        return out_grad, grad_part, None, None, None


# -- samplers --


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_sizes(reserved_length, seq_length, batch_size, layers, device, generator) -> torch.device:
    reserved_length = _check_int("reserved_length", reserved_length, 1)
    seq_length = _check_int("seq_length", seq_length, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("layers", layers, 1)
    if reserved_length > seq_length:
        raise ValueError(f"reserved_length ({reserved_length}) must be <= seq_length ({seq_length})")
    if seq_length > MAX_SEQ_LENGTH:
        raise ValueError(f"seq_length must be <= 2**24 (torch.multinomial's limit), got {seq_length}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch.device or a device string, got {device!r}") from e
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but device is {device}; they must match")
    return device


def _check_mask(attn_mask, batch_size: int, seq_length: int, fn: str, key_padding_ok: bool) -> None:
    check_tensor("attn_mask", attn_mask)
    queries = f"{seq_length} or 1" if key_padding_ok else f"{seq_length}"
    want = f"(B={batch_size} or 1, H, {queries}, {seq_length})"
    bad = attn_mask.dim() != 4
    if not bad:
        mb, _, sq, sk = attn_mask.shape
        bad = mb not in (1, batch_size) or sk != seq_length or sq not in ((seq_length, 1) if key_padding_ok else (sk,))
    if bad:
        raise ValueError(f"{fn}: attn_mask must have shape {want}, got {tuple(attn_mask.shape)}")


def _sample(reserved_length, seq_length, batch_size, layers, device, attn_mask, generator, *, encoder: bool):
    """The samplers' common part: check the arguments (before any draw), then draw the (L, B, R) int32 indices.

    Decoder (gpt_sample_tokens): attn_mask optional, (B or 1, H, S, S). Encoder (bert_sample_tokens): attn_mask
    required, and a key-padding (B or 1, H, 1, S) mask is accepted too.
    """
    fn = "bert_sample_tokens" if encoder else "gpt_sample_tokens"
    device = _check_sizes(reserved_length, seq_length, batch_size, layers, device, generator)
    if attn_mask is None and encoder:
        raise ValueError(f"{fn} requires attn_mask (the encoder's (B, 1, S, S) or (B, 1, 1, S) mask), got None")
    if attn_mask is not None:
        _check_mask(attn_mask, batch_size, seq_length, fn, key_padding_ok=encoder)
    return sample_token_indices(reserved_length, seq_length, batch_size, layers, device, generator)


def gpt_sample_tokens(
    reserved_length: int,
    seq_length: int,
    batch_size: int,
    layers: int = 1,
    device: torch.device | str = "cpu",
    attn_mask: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random-LTD token sampling for a decoder (GPT): which tokens each LTD layer keeps.

    For each of `layers` × `batch_size` sequences, a uniformly random set of `reserved_length` distinct positions
    out of `seq_length` (`torch.multinomial` without replacement, as DeepSpeed draws it, so a seed gives
    DeepSpeed's sets), sorted ascending.

    The causal mask is sliced to its leading (R, R) square, `attn_mask[:, :, :R, :R]` (a view): for a pure causal
    mask only the order of the kept tokens matters and sorting preserves it. This is DeepSpeed's rule and is
    wrong for a mask that also encodes padding; gather such a mask with `bert_sample_tokens`.

    Args:
        reserved_length: R, tokens kept per sequence, 1 <= R <= seq_length.
        seq_length: S.
        batch_size: B.
        layers: L, the number of LTD layers sampled at once (each gets its own sets).
        device: where the indices are made.
        attn_mask: (B or 1, H, S, S) or None.
        generator: a torch.Generator on `device` (default: torch's global RNG, so torch.manual_seed reproduces).

    Returns:
        (indices (L, B, R) int32, attn_mask[:, :, :R, :R] or None)
    """
    indices = _sample(reserved_length, seq_length, batch_size, layers, device, attn_mask, generator, encoder=False)
    part_mask = None if attn_mask is None else attn_mask[:, :, :reserved_length, :reserved_length]
    return indices, part_mask


def bert_sample_tokens(
    reserved_length: int,
    seq_length: int,
    batch_size: int,
    layers: int = 1,
    device: torch.device | str = "cpu",
    attn_mask: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random-LTD token sampling for an encoder (BERT): kept tokens per LTD layer plus each layer's gathered mask.

    Same sampling as `gpt_sample_tokens`. Each layer's mask keeps the query rows and key columns of its own kept
    tokens: out[l][b, h, i, j] = attn_mask[b, h, idx[l, b, i], idx[l, b, j]] (DeepSpeed:
    `attn_mask[b:b+1, :, idx, :][:, :, :, idx]` per sequence).

    Args:
        reserved_length, seq_length, batch_size, layers, device, generator: as for `gpt_sample_tokens`.
        attn_mask: required; (B or 1, H, S, S), or a key-padding mask (B or 1, H, 1, S) whose query dim stays 1.
            A batch dim of 1 is shared by every sequence (the result still has B rows: each has its own tokens).

    Returns:
        (indices (L, B, R) int32, list of L masks, each (B, H, R, R) or (B, H, 1, R), dtype of attn_mask)
    """
    indices = _sample(reserved_length, seq_length, batch_size, layers, device, attn_mask, generator, encoder=True)
    return indices, [gather_mask_ref(attn_mask, indices[layer]) for layer in range(layers)]
