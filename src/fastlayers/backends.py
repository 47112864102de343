"""Backend registry and per-call dispatch.

Every op registers up to three implementations (`reference`, `torch`, `triton`) with their
capabilities. `select()` picks one per call:

1. the `backend=` keyword of the call;
2. the `FASTLAYERS_BACKEND` environment variable: either one name for every op
   (`FASTLAYERS_BACKEND=reference`) or per-op pairs (`FASTLAYERS_BACKEND=attention=triton,layer_norm=torch`);
3. the priority list of the input's device: CUDA `triton -> torch -> reference`, CPU `torch -> reference`.
   (On CPU Triton runs only under `TRITON_INTERPRET=1` and only when asked for: the interpreter is for tests.)

A backend asked for explicitly (1 or 2) that cannot run raises `NotImplementedError` listing why;
automatic selection never degrades correctness, only speed. `explain()` prints the decision.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fastlayers.utils import dtype_name, is_triton_available, triton_interpret

BACKENDS = ("reference", "torch", "triton")
ENV_VAR = "FASTLAYERS_BACKEND"
PRIORITY = {"cuda": ("triton", "torch", "reference"), "cpu": ("torch", "reference")}
ALL_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
# The Triton interpreter stores bf16 as raw uint16 and has no bf16 arithmetic (triton#4972).
INTERPRETER_DTYPES = frozenset({torch.float16, torch.float32})
TRITON_CUDA_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


@dataclass(frozen=True)
class Impl:
    """One implementation of one op, with what it can do."""

    op: str
    name: str  # "reference" | "torch" | "triton"
    fn: str  # "package.module:attr", resolved lazily so registering imports nothing heavy
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    dtypes: frozenset[torch.dtype] = ALL_FLOATS
    supports_backward: bool = True
    check: Callable[..., list[str]] | None = field(default=None, compare=False)

    def resolve(self) -> Callable:
        module, attr = self.fn.split(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, dict[str, Impl]] = {}


def register(impl: Impl) -> Impl:
    if impl.name not in BACKENDS:
        raise ValueError(f"backend name must be one of {BACKENDS}, got {impl.name!r}")
    _REGISTRY.setdefault(impl.op, {})[impl.name] = impl
    return impl


def registered_ops() -> list[str]:
    return sorted(_REGISTRY)


def impls(op: str) -> dict[str, Impl]:
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; registered ops: {registered_ops()}")
    return _REGISTRY[op]


def _split_inputs(inputs: dict) -> tuple[list[torch.Tensor], dict]:
    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    features = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}
    return tensors, features


def _describe_inputs(inputs: dict) -> str:
    parts = []
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            parts.append(f"{k}={tuple(v.shape)}:{dtype_name(v.dtype)}@{v.device.type}")
        elif v is not None and v is not False:
            parts.append(f"{k}={v!r}")
    return ", ".join(parts)


def triton_devices() -> frozenset[str]:
    return frozenset({"cuda", "cpu"}) if triton_interpret() else frozenset({"cuda"})


def not_supported_reasons(impl: Impl, **inputs) -> list[str]:
    """Why `impl` cannot run these inputs (an empty list means it can)."""
    tensors, features = _split_inputs(inputs)
    reasons: list[str] = []
    if not tensors:
        return ["no tensor inputs given"]
    device = tensors[0].device.type
    dtype = tensors[0].dtype
    requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    devices, dtypes = impl.devices, impl.dtypes
    if impl.name == "triton":
        if not is_triton_available():
            reasons.append("triton is not installed (pip install 'fastlayers[triton]')")
        devices = devices & triton_devices()
        if device == "cpu":
            dtypes = dtypes & INTERPRETER_DTYPES
            if not triton_interpret():
                reasons.append("Triton runs on CPU only under the interpreter (TRITON_INTERPRET=1)")
        else:
            dtypes = dtypes & TRITON_CUDA_DTYPES
    if device not in devices and not (impl.name == "triton" and device == "cpu"):
        reasons.append(f"device {device} not supported (supports {sorted(devices)})")
    if dtype not in dtypes:
        reasons.append(f"dtype {dtype_name(dtype)} not supported (supports {sorted(dtype_name(d) for d in dtypes)})")
    if requires_grad and not impl.supports_backward:
        reasons.append("inputs require grad but this backend is inference-only")
    if impl.check is not None:
        reasons.extend(impl.check(**inputs))
    return reasons


def _requested(op: str, backend: str | None) -> tuple[str | None, str]:
    if backend is not None:
        return backend, "backend= argument"
    env = os.environ.get(ENV_VAR, "").strip()
    if not env:
        return None, ""
    if "=" not in env:
        return env, f"{ENV_VAR}={env}"
    for pair in env.split(","):
        name, _, value = pair.partition("=")
        if name.strip() == op:
            return value.strip(), f"{ENV_VAR} ({pair.strip()})"
    return None, ""


def select(op: str, backend: str | None = None, **inputs) -> Impl:
    """Pick the implementation of `op` for these inputs (tensors and feature flags as keywords)."""
    table = impls(op)
    wanted, source = _requested(op, backend)
    if wanted is not None:
        if wanted not in BACKENDS:
            raise ValueError(f"unknown backend {wanted!r} (from {source}); choose from {BACKENDS}")
        if wanted not in table:
            raise NotImplementedError(f"op {op!r} has no {wanted!r} backend (from {source}); has {sorted(table)}")
        reasons = not_supported_reasons(table[wanted], **inputs)
        if reasons:
            raise NotImplementedError(
                f"backend {wanted!r} for op {op!r} (from {source}) cannot run ({_describe_inputs(inputs)}):\n  - "
                + "\n  - ".join(reasons)
            )
        return table[wanted]
    tensors, _ = _split_inputs(inputs)
    device = tensors[0].device.type if tensors else "cpu"
    rejected = []
    for name in PRIORITY.get(device, ("reference",)):
        if name not in table:
            continue
        reasons = not_supported_reasons(table[name], **inputs)
        if not reasons:
            return table[name]
        rejected.append(f"{name}: " + "; ".join(reasons))
    raise NotImplementedError(
        f"no backend of op {op!r} can run ({_describe_inputs(inputs)}):\n  - " + "\n  - ".join(rejected)
    )


def explain(op: str, backend: str | None = None, **inputs) -> str:
    """A readable table of the dispatch decision for `op` on these inputs."""
    table = impls(op)
    lines = [f"op {op!r} on ({_describe_inputs(inputs)})"]
    try:
        chosen = select(op, backend, **inputs).name
        lines.append(f"selected: {chosen}")
    except (NotImplementedError, ValueError) as e:
        chosen = None
        lines.append(f"selected: none ({str(e).splitlines()[0]})")
    wanted, source = _requested(op, backend)
    if wanted is not None:
        lines.append(f"requested: {wanted} (from {source})")
    tensors, _ = _split_inputs(inputs)
    device = tensors[0].device.type if tensors else "cpu"
    order = PRIORITY.get(device, ())
    lines.append(f"priority on {device}: {' -> '.join(order)}")
    for name in BACKENDS:
        if name not in table:
            lines.append(f"  {name:<9} not registered")
            continue
        reasons = not_supported_reasons(table[name], **inputs)
        label = "interpreter" if name == "triton" and device == "cpu" else ""
        status = "SELECTED" if name == chosen else ("ok" if not reasons else "rejected")
        extra = "; ".join(reasons) if reasons else ""
        if name not in order and not reasons and name != chosen:
            extra = "runs only when asked for (backend= or FASTLAYERS_BACKEND)"
        lines.append(f"  {name:<9} {status:<9} {label:<11} {extra}".rstrip())
    return "\n".join(lines)


def available_backends(device: str = "cpu") -> list[str]:
    """Backends that can run at all on `device` (ignoring per-op limits)."""
    out = ["reference", "torch"]
    if is_triton_available() and device in triton_devices():
        out.append("triton")
    return out
