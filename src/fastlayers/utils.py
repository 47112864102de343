"""Small helpers shared by every layer: no device queries, no triton import at module level."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections import OrderedDict

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=1)
def is_triton_available() -> bool:
    """True when the `triton` package can be imported (checked lazily, once)."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
        import triton  # noqa: F401
    except Exception:  # broken or blocked installs count as "not available"
        return False
    return True


def triton_interpret() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


DTYPE_NAMES = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def describe(t: torch.Tensor | None) -> str:
    if t is None:
        return "None"
    return f"Tensor{tuple(t.shape)}:{dtype_name(t.dtype)}@{t.device.type}"


def check_tensor(
    name: str,
    t: torch.Tensor,
    *,
    ndim: int | tuple[int, ...] | None = None,
    shape: tuple[int | None, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    device: torch.device | None = None,
) -> None:
    """Raise TypeError/ValueError naming `name` and the bad value, before any kernel runs."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape, strict=True)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[dtype_name(d) for d in dtypes]}, got {dtype_name(t.dtype)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def new_seed(generator: torch.Generator | None = None) -> int:
    """Draw a 63-bit dropout seed from `generator` (or torch's global CPU RNG, so torch.manual_seed reproduces)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())


def keep_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device | str, offset: int = 0) -> torch.Tensor:
    """Deterministic Bernoulli keep-mask (True = keep, prob 1-p) from (seed, offset).

    The torch backends regenerate the same mask in backward from the same (seed, offset) instead of
    storing it. The Triton backends use `tl.rand(seed, offsets)`, a different stream: the masks differ
    across backends, never within one.

    Speed: torch's CPU generator is sequential and `torch.rand` spends ~20 ns per float, which made mask
    generation a large share of a training step. So one 64-bit draw gives three 16-bit uniforms (bits 0-47;
    `random_()` leaves bit 63 at zero, so the top lane is not used), about 3x faster. The drop probability is
    therefore quantized to 1/65536 (p = 0.1 drops with probability 6554/65536 = 0.100006).
    """
    device = torch.device(device)
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) + 0x9E3779B97F4A7C15 * int(offset)) % (2**63))
    n = math.prod(shape)
    words = torch.empty(cdiv(n, 3), dtype=torch.int64, device=device).random_(generator=g)
    lanes = words.view(torch.int16).view(-1, 4)[:, :3]  # three uniform int16 lanes per draw
    threshold = round(p * 65536) - 32768  # keep iff the unsigned 16-bit value >= round(p * 65536)
    keep = (lanes >= threshold).reshape(-1)
    if keep.numel() != n:  # drop the padding lanes so a saved mask holds exactly n bytes
        keep = keep[:n].clone()
    return keep.view(shape)


class LayoutCache:
    """A small LRU of what is built from a block layout (plans, indices), keyed per layout and device.

    A hit is checked against a saved copy of the layout by content, so an in-place edit of a layout is seen.
    """

    def __init__(self, build, size: int = 16):
        self._build = build
        self._size = size
        self._items: OrderedDict = OrderedDict()

    def get(self, layout: torch.Tensor, device: torch.device | str):
        device = torch.device(device)
        key = (layout.data_ptr(), tuple(layout.shape), layout.dtype, layout.device, device)
        hit = self._items.get(key)
        if hit is not None and torch.equal(hit[0], layout):
            self._items.move_to_end(key)
            return hit[1]
        value = self._build(layout, device)
        self._items[key] = (layout.detach().clone(), value)
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return value
