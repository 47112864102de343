"""Counting what autograd keeps for backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def saved_activation_bytes(
    fn: Callable[[], Any], exclude: tuple[torch.Tensor | torch.nn.Module, ...] = (), include_parameters: bool = False
) -> int:
    """Run `fn()` and return the bytes of the distinct storages autograd saves for backward.

    Uses `torch.autograd.graph.saved_tensors_hooks`. Parameters (`nn.Parameter`) and the tensors in
    `exclude` (typically the input) are left out, so the number is the activation memory the call adds.
    Storages are counted once even when several saved tensors view them. A module in `exclude` leaves
    out all its parameters and buffers, also when they are saved as views (`weight.t()`).
    """
    seen: dict[Any, int] = {}
    skip = set()
    for item in exclude:
        tensors = list(item.parameters()) + list(item.buffers()) if isinstance(item, torch.nn.Module) else [item]
        skip.update(t.untyped_storage().data_ptr() for t in tensors)

    def pack(t: torch.Tensor):
        if (isinstance(t, torch.nn.Parameter) and not include_parameters) or t.device.type == "meta":
            return t
        st = t.untyped_storage()
        key = (st.data_ptr(), t.device)
        if st.data_ptr() not in skip and key not in seen:
            seen[key] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())
