"""CUDA backend: the CUDA kernels of ``kernels/*.cu`` behind the same names and signatures as
``sparsecnn._cpu`` (``KERNEL_NAMES``; optional fused kernels in ``CAPABILITIES``).

The kernels run on a GPU through CuPy (``cupy.RawModule``), or, with ``SPARSECNN_CUDA_SIM=1``
in the environment, on the CPU: the same ``.cu`` sources compiled by the host C++ compiler
against ``cuda_sim.h`` (see ``_launch.py``), on host memory that reports device ``"cuda"``
(``_arrays.SimArray``). The simulation is slow; it is for tests and kernel debugging.

Importing this package never needs CuPy; :func:`status` tells whether the backend can run here.
"""
from __future__ import annotations

from .. import backend
from ._depthwise import depthwise_backward, depthwise_forward
from ._float import (
    avgpool_backward,
    avgpool_forward,
    build_window,
    column_sums,
    conv_backward,
    conv_forward,
    conv_maxpool_forward,
    maxpool_backward,
    maxpool_forward,
)
from ._geometry import build_conv_rulebook, build_hash, build_submanifold_rulebook
from ._heads import segment_sum_max
from ._launch import find_host_compiler, simulation_requested

KERNEL_NAMES = backend.KERNEL_NAMES

#: optional fused kernels this backend has
CAPABILITIES = frozenset({"conv_maxpool_forward"})

__all__ = [
    "build_hash", "build_conv_rulebook", "build_submanifold_rulebook", "build_window",
    "conv_forward", "conv_backward", "conv_maxpool_forward", "maxpool_forward",
    "maxpool_backward", "avgpool_forward", "avgpool_backward", "column_sums", "segment_sum_max",
    "depthwise_forward", "depthwise_backward", "KERNEL_NAMES",
    "CAPABILITIES", "status", "has_cupy", "device_name",
]
assert set(KERNEL_NAMES) | CAPABILITIES <= set(__all__)

_INSTALL = ("install CuPy with `pip install sparsecnn[cuda12]` or `pip install "
            "sparsecnn[cuda13]` (matching your CUDA driver)")


def has_cupy() -> bool:
    """Whether CuPy imports."""
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def status() -> tuple[bool, str]:
    """(available, description): whether device "cuda" can run here, and on what."""
    if simulation_requested():
        cxx = find_host_compiler()
        if cxx is None:
            return False, ("SPARSECNN_CUDA_SIM=1 asks for the CUDA simulation, which needs a "
                           "host C++ compiler with OpenMP (g++ or clang++; set CXX)")
        return True, (f"CUDA simulation on the CPU (SPARSECNN_CUDA_SIM=1, {cxx}): the CUDA "
                      f"kernels on host memory, slow, for tests and debugging")
    if not has_cupy():
        return False, f"CuPy is not installed; {_INSTALL}"
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # pragma: no cover - needs CuPy without a working driver
        return False, f"CuPy cannot reach a CUDA device ({type(e).__name__}: {e})"
    if n < 1:  # pragma: no cover - needs CuPy
        return False, "CuPy found no CUDA device"
    return True, f"CUDA device 0: {device_name()}"  # pragma: no cover - needs a GPU


def device_name() -> str:
    """The name of the device "cuda" runs on."""
    if simulation_requested():
        return "CUDA simulation on the CPU"
    import cupy  # pragma: no cover - needs a GPU
    dev = cupy.cuda.runtime.getDevice()  # pragma: no cover - the current device (MPI ranks)
    props = cupy.cuda.runtime.getDeviceProperties(dev)  # pragma: no cover
    name = props["name"]  # pragma: no cover
    return name.decode() if isinstance(name, bytes) else str(name)  # pragma: no cover
