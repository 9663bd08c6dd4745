"""Deterministic parallel reductions (CPU).

Column sums of (n, C) feature arrays: bias, ground and BatchNorm gradients need one per layer
per step. numpy's ``sum(axis=0)`` walks a C-contiguous array one short row at a time on one
thread; here fixed blocks of rows are summed in parallel and their partials then added in
block order, so the result does not depend on the number of threads.
"""
from cython cimport floating
from cython.parallel cimport parallel, prange

import numpy as np

from ._omp cimport barrier
from ._rows cimport scn_add_double, scn_add_float

cdef enum:
    SUM_ROWS = 256      # rows per block (the block's partial row stays in L1)
    SUM_COLS = 512      # columns per task when the partials are added up


cdef inline void _add(const floating* x, floating* y, Py_ssize_t n) noexcept nogil:
    """y += x"""
    if floating is float:
        scn_add_float(x, y, n)
    else:
        scn_add_double(x, y, n)


cdef void _block_sum(const floating[:, ::1] a, Py_ssize_t r0, Py_ssize_t r1,
                     floating* dst) noexcept nogil:
    """dst = sum of rows r0 <= r < r1 (r1 > r0), in row order."""
    cdef Py_ssize_t C = a.shape[1], c, r
    for c in range(C):
        dst[c] = a[r0, c]
    for r in range(r0 + 1, r1):
        _add(&a[r, 0], dst, C)


def column_sums(const floating[:, ::1] a):
    """Sum over the rows of a (n, C) float32/float64 C-contiguous array -> (C,).

    Rows are summed in blocks of 256 (in parallel), then the block partials in block order:
    bitwise the same for any number of threads, and (being blocked) more accurate than one
    running sum.
    """
    cdef Py_ssize_t n = a.shape[0], C = a.shape[1]
    cdef Py_ssize_t nblk = (n + SUM_ROWS - 1) // SUM_ROWS, b, t, c, c0, c1
    dtype = np.float32 if floating is float else np.float64
    out_a = np.zeros(C, dtype=dtype)
    if n == 0 or C == 0:
        return out_a
    part_a = np.empty((nblk, C), dtype=dtype)
    cdef floating[::1] out = out_a
    cdef floating[:, ::1] part = part_a
    cdef Py_ssize_t ncol = (C + SUM_COLS - 1) // SUM_COLS
    with nogil, parallel():
        for b in prange(nblk, schedule='static'):
            _block_sum(a, b * SUM_ROWS, min(n, (b + 1) * SUM_ROWS), &part[b, 0])
        barrier()
        for t in prange(ncol, schedule='static'):
            c0 = t * SUM_COLS
            c1 = min(C, c0 + SUM_COLS)
            for c in range(c0, c1):
                out[c] = part[0, c]
            for b in range(1, nblk):
                _add(&part[b, c0], &out[c0], c1 - c0)
    return out_a
