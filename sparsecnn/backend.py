"""Devices, array modules and kernel modules.

Layers never branch on the device: they ask :func:`kernels` for ``sparsecnn._cpu`` or
``sparsecnn._gpu`` (same names, same signatures) and :func:`xp` for numpy or cupy.
"""
from __future__ import annotations

from types import ModuleType

import numpy as np

DEVICES = ("cpu", "cuda")


class GPUUnavailableError(ValueError, RuntimeError):
    """A CUDA device was asked for but cannot be used (a ValueError, as bad input is)."""


def parse_device(device: str | None) -> str:
    """Normalise a device name: ``"cpu"`` or ``"cuda"`` (``"cuda:0"`` and ``"gpu"`` accepted)."""
    if device is None:
        return "cpu"
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda', got {device!r}")
    d = device.strip().lower()
    if d in ("cuda", "gpu", "cuda:0"):
        return "cuda"
    if d == "cpu":
        return "cpu"
    raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")


def gpu_status() -> tuple[bool, str]:
    """(available, reason): whether the CUDA backend can run here, and why not."""
    try:
        from . import _gpu
    except ImportError as e:  # pragma: no cover - package incomplete
        return False, f"the GPU backend is not part of this build ({e})"
    return _gpu.status()


def require_device(device: str | None) -> str:
    """parse_device, then make sure the backend for it can run; raise a clear error if not."""
    d = parse_device(device)
    if d == "cuda":
        ok, why = gpu_status()
        if not ok:
            raise GPUUnavailableError(f"GPU backend not available: {why}")
    return d


_cpu_ready = False


def _prepare_cpu() -> None:
    """Once, on first use of the CPU kernels: keep freed memory for the next step."""
    global _cpu_ready
    from ._cpu._memory import tune_malloc
    tune_malloc()
    _cpu_ready = True


def kernels(device: str) -> ModuleType:
    """Kernel module for ``device``: ``sparsecnn._cpu`` or ``sparsecnn._gpu``."""
    if device == "cpu":
        from . import _cpu
        if not _cpu_ready:
            _prepare_cpu()
        return _cpu
    require_device(device)
    from . import _gpu  # pragma: no cover - needs a GPU
    return _gpu  # pragma: no cover


def xp(device: str) -> ModuleType:
    """Array module for ``device``: numpy or cupy."""
    if device == "cpu":
        return np
    require_device(device)
    import cupy  # pragma: no cover - needs a GPU
    return cupy  # pragma: no cover


def device_of(array) -> str:
    """'cuda' for a cupy array, else 'cpu'."""
    return "cuda" if type(array).__module__.startswith("cupy") else "cpu"


def to_device(array, device: str):
    """Copy ``array`` to ``device`` (no copy if it is already there)."""
    if device_of(array) == device:
        return array
    if device == "cpu":
        return array.get()  # pragma: no cover - needs a GPU
    return xp(device).asarray(array)  # pragma: no cover - needs a GPU
