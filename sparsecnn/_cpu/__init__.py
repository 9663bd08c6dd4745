"""CPU kernels: Cython + OpenMP, BLAS through scipy.linalg.cython_blas.

Every name in KERNEL_NAMES exists with the same signature in sparsecnn._gpu. Kernels take
C-contiguous arrays (int32 indices, int64 offsets, float32/float64 features), allocate and
return their outputs, and do not validate user input (sparsecnn.functional does).
"""
import os as _os

# Idle OpenMP threads spin for a short while only (libgomp reads this when it loads, so it is
# set before the kernels are imported, and only if the user has not chosen a value). Training
# renders batches in a background thread: with long spins the kernels' idle threads compete
# with it, and with other processes; measured +15-20% training throughput on 2 cores.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from ._conv import conv_backward as _conv_backward  # noqa: E402
from ._conv import conv_forward as _conv_forward  # noqa: E402
from ._conv import conv_maxpool_forward as _conv_maxpool_forward  # noqa: E402
from ._openmp import USE_OPENMP, max_threads  # noqa: E402
from ._pool import (  # noqa: E402
    avgpool_backward,
    avgpool_forward,
    maxpool_backward,
    maxpool_forward,
)
from ._reduce import column_sums  # noqa: E402
from ._rulebook import (  # noqa: E402
    build_conv_rulebook,
    build_hash,
    build_submanifold_rulebook,
    build_window,
)
from ._threads import blas_info, single_threaded_blas, with_single_threaded_blas  # noqa: E402

conv_forward = with_single_threaded_blas(_conv_forward)
conv_backward = with_single_threaded_blas(_conv_backward)
conv_maxpool_forward = with_single_threaded_blas(_conv_maxpool_forward)

KERNEL_NAMES = (
    "build_hash",
    "build_conv_rulebook",
    "build_submanifold_rulebook",
    "build_window",
    "conv_forward",
    "conv_backward",
    "conv_maxpool_forward",
    "maxpool_forward",
    "maxpool_backward",
    "avgpool_forward",
    "avgpool_backward",
    "column_sums",
)

__all__ = [
    "build_hash", "build_conv_rulebook", "build_submanifold_rulebook", "build_window",
    "conv_forward", "conv_backward", "conv_maxpool_forward", "maxpool_forward",
    "maxpool_backward", "avgpool_forward", "avgpool_backward", "column_sums", "KERNEL_NAMES",
    "USE_OPENMP", "max_threads", "blas_info", "single_threaded_blas",
]
assert set(KERNEL_NAMES) <= set(__all__)
