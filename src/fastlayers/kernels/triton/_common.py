"""Helpers shared by the Triton kernel modules (dtype maps, launch hints, AOT signature strings)."""

import torch

from fastlayers.utils import next_pow2, triton_interpret

TORCH_TO_SIG = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int8: "*i8",
    torch.uint8: "*u8",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.bool: "*i1",
}

# dtypes compiled ahead of time for each kernel family (bf16 is GPU-only; fp16 covers the half path)
AOT_DTYPES = ("*fp32", "*fp16", "*bf16")


def interpreting() -> bool:
    return triton_interpret()


def num_programs_hint(device: torch.device) -> int:
    """Number of persistent programs to launch: SM count on CUDA, a small constant under the interpreter."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def block_for(n: int, cap: int = 65536) -> int:
    """Power-of-two block that covers a row of n elements (at least 16)."""
    return min(max(16, next_pow2(n)), cap)
