"""Devices, array modules and kernel modules.

Layers never branch on the device: they ask :func:`kernels` for ``sparsecnn._cpu`` or
``sparsecnn._gpu`` (same names, same signatures) and :func:`xp` for the array module (numpy,
or cupy). Device ``"cuda"`` is a CUDA GPU through CuPy, or, with ``SPARSECNN_CUDA_SIM=1`` in
the environment, the CPU simulation of the same CUDA kernels on host memory
(:mod:`sparsecnn._gpu._arrays`): slow, for tests and kernel debugging. Only this module and
``sparsecnn._gpu`` know which of the two it is.

Every copy between host and device made by the library goes through :func:`to_device`, which
counts them in :data:`transfers` (tests assert how many one training step makes).
"""
from __future__ import annotations

import os
from collections import Counter
from types import ModuleType
from typing import Any

import numpy as np

DEVICES = ("cpu", "cuda")

#: the kernel boundary: every backend (``sparsecnn._cpu``, ``sparsecnn._gpu``) has these, with
#: the same parameters; each also lists the optional fused kernels it has in CAPABILITIES
KERNEL_NAMES = (
    "build_hash",
    "build_conv_rulebook",
    "build_submanifold_rulebook",
    "build_window",
    "conv_forward",
    "conv_backward",
    "maxpool_forward",
    "maxpool_backward",
    "avgpool_forward",
    "avgpool_backward",
    "column_sums",
    "segment_sum_max",
    "depthwise_forward",
    "depthwise_backward",
)

#: host <-> device copies made through :func:`to_device`: keys "to_host" and "to_device"
transfers: Counter = Counter()


class GPUUnavailableError(ValueError, RuntimeError):
    """A CUDA device was asked for but cannot be used (a ValueError, as bad input is)."""


def simulation() -> bool:
    """Whether ``SPARSECNN_CUDA_SIM`` asks for the CPU simulation of the CUDA backend."""
    return os.environ.get("SPARSECNN_CUDA_SIM", "").strip() not in ("", "0")


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
    """(available, description): whether the CUDA backend can run here, and on what (or why
    not)."""
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
    from . import _gpu
    return _gpu


def xp(device: str) -> ModuleType:
    """Array module for ``device``: numpy, or cupy (the simulated device's module under
    ``SPARSECNN_CUDA_SIM=1``)."""
    if device == "cpu":
        return np
    require_device(device)
    if simulation():
        from ._gpu._arrays import sim_xp
        return sim_xp
    import cupy  # pragma: no cover - needs a GPU
    return cupy  # pragma: no cover


def device_of(array: Any) -> str:
    """'cuda' for a device array (CuPy's, or the simulation's), else 'cpu'."""
    t = type(array)
    if t is np.ndarray:
        return "cpu"
    mod = t.__module__
    if mod.startswith("cupy") or mod == "sparsecnn._gpu._arrays":
        return "cuda"
    return "cpu"


def to_device(array: Any, device: str) -> Any:
    """``array`` on ``device`` (no copy if it is already there); counted in :data:`transfers`."""
    if device_of(array) == device:
        return array
    if device == "cpu":
        transfers["to_host"] += 1
        return array.get()
    require_device(device)
    transfers["to_device"] += 1
    if simulation():
        from ._gpu._arrays import to_sim
        return to_sim(array)
    return xp(device).asarray(array)  # pragma: no cover - needs a GPU


def to_host(array: Any) -> np.ndarray:
    """``to_device(array, "cpu")``: a NumPy array (a counted copy if ``array`` is on a device)."""
    return to_device(array, "cpu")
