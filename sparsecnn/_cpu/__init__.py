"""CPU kernels: Cython + OpenMP, BLAS through scipy.linalg.cython_blas.

Every name in KERNEL_NAMES exists with the same signature in sparsecnn._gpu (the
device-neutral kernel boundary, ``_ops.py``): kernels take the rulebook (a
``sparsecnn.geometry.Rulebook``) and C-contiguous data (int32 indices, int64 offsets,
float32/float64 features), choose their own strategy, allocate and return their outputs, and
do not validate user input (sparsecnn.functional does). Optional fused kernels are listed in
CAPABILITIES. The Cython modules (``_conv``, ``_pool``, ``_rulebook``) are the strategies.
"""
import os as _os

# Idle OpenMP threads spin for a short while only (libgomp reads this when it loads, so it is
# set before the kernels are imported, and only if the user has not chosen a value). Training
# renders batches in a background thread: with long spins the kernels' idle threads compete
# with it, and with other processes; measured +15-20% training throughput on 2 cores.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .. import backend  # noqa: E402
from ._openmp import USE_OPENMP, max_threads  # noqa: E402
from ._ops import (  # noqa: E402
    CAPABILITIES,
    INPUT_SIDE_FILL,
    SMALL_CIN,
    avgpool_backward,
    avgpool_forward,
    build_conv_rulebook,
    build_submanifold_rulebook,
    conv_backward,
    conv_forward,
    conv_maxpool_forward,
    depthwise_backward,
    depthwise_forward,
    input_window_of,
    maxpool_backward,
    maxpool_forward,
    segment_sum_max,
    window_of,
)
from ._reduce import column_sums  # noqa: E402
from ._rulebook import build_hash, build_window  # noqa: E402
from ._threads import blas_info, single_threaded_blas  # noqa: E402

KERNEL_NAMES = backend.KERNEL_NAMES

__all__ = [
    "build_hash", "build_conv_rulebook", "build_submanifold_rulebook", "build_window",
    "conv_forward", "conv_backward", "conv_maxpool_forward", "maxpool_forward",
    "maxpool_backward", "avgpool_forward", "avgpool_backward", "column_sums", "segment_sum_max",
    "depthwise_forward", "depthwise_backward", "KERNEL_NAMES",
    "CAPABILITIES", "USE_OPENMP", "max_threads", "blas_info", "single_threaded_blas",
    "window_of", "input_window_of", "SMALL_CIN", "INPUT_SIDE_FILL",
]
assert set(KERNEL_NAMES) | CAPABILITIES <= set(__all__)
