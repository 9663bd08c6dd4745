"""Max and average pooling kernels with the ground state as a candidate (CPU).

Both take the rulebook of the pooling window (the convolution rulebook for (f, s)). A window
that holds fewer than K active sites also covers inactive sites, whose value is ``ground``.
Offsets run in order and, within one, an output row occurs once: no races, fixed sums.
"""
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.stdlib cimport free

from ._alloc cimport scn_alloc_pending, scn_calloc, scn_fail_alloc, scn_malloc
from ._omp cimport barrier
from ._rows cimport (
    leaky_row,
    max_row,
    pool_row,
    scn_leaky_grad_row_double,
    scn_leaky_grad_row_float,
    scn_max_row_backward_double,
    scn_max_row_backward_float,
    scn_route_row_double,
    scn_route_row_float,
)

import numpy as np

cdef enum:
    POOL_CHUNK = 256    # outputs per task where a reduction needs per-chunk partials


cdef void _count_active(const int32_t[::1] out_idx, int32_t* count,
                        Py_ssize_t n_out) noexcept nogil:
    cdef Py_ssize_t q
    for q in range(n_out):
        count[q] = 0
    for q in range(out_idx.shape[0]):
        count[out_idx[q]] += 1


cdef inline void _max_row_backward(const floating* gy, const int32_t* arg, floating* gx,
                                   int32_t i, Py_ssize_t C) noexcept nogil:
    if floating is float:
        scn_max_row_backward_float(gy, arg, gx, i, C)
    else:
        scn_max_row_backward_double(gy, arg, gx, i, C)


def maxpool_forward(const floating[:, ::1] features, const floating[::1] ground,
                    const int32_t[::1] in_idx, const int32_t[::1] out_idx,
                    const int64_t[::1] offsets, Py_ssize_t n_out, *, window=None,
                    negative_slope=None):
    """out[o, c] = max(features[i, c] over active i in o's window; ground[c] if any inactive).

    features : (n_in, C); ground : (C,)                            # IN
    in_idx, out_idx : (P,) int32; offsets : (K + 1,) int64          # IN
    window : (n_out, K) int32, optional: build_window of this rulebook. With it the kernel
             goes output by output over the window; without it (a window table far larger
             than the pairs) offset by offset over the pairs: the same result.
    negative_slope : float in [0, 1), optional: apply the (leaky) ReLU max(v, slope * v) to
             each output as it is written (the pool followed by its activation, fused)
    Returns out (n_out, C) and argmax (n_out, C) int32: the input row that won, -1 for the
    ground. Ties go to the earliest candidate: the ground, then offsets in row-major order.
    Works output by output over the window: each output row is written once.
    """
    cdef int K = offsets.shape[0] - 1
    cdef Py_ssize_t C = features.shape[1], o
    dtype = np.float32 if floating is float else np.float64
    out_a = np.empty((n_out, C), dtype=dtype)
    # offset argmax by half a page from out: rows o of both arrays would otherwise share
    # their address modulo 4096 and every store to one would stall loads from the other
    arg_a = np.empty(n_out * C + 512, dtype=np.int32)[512:].reshape(n_out, C)
    cdef floating[:, ::1] out = out_a
    cdef int32_t[:, ::1] arg = arg_a
    if n_out == 0:
        return out_a, arg_a
    cdef bint act = negative_slope is not None
    cdef floating a = negative_slope if act else 0
    cdef const int32_t[:, ::1] win
    if window is not None:
        win = window
        with nogil:
            for o in prange(n_out, schedule='static'):
                pool_row(&win[o, 0], K, &features[0, 0], C, NULL, &ground[0], &out[o, 0],
                         &arg[o, 0], act, a)
        return out_a, arg_a
    # from the pairs: the same candidates in the same order as pool_row (the ground if the
    # window has a gap, then offsets ascending; within an offset an output occurs once)
    count_a = np.empty(n_out, dtype=np.int32)
    cdef int32_t[::1] count = count_a
    _count_active(out_idx, &count[0], n_out)
    cdef Py_ssize_t c, q, q0, q1
    cdef int k
    cdef int32_t i
    with nogil, parallel():
        for o in prange(n_out, schedule='static'):
            for c in range(C):
                out[o, c] = ground[c] if count[o] < K else -INFINITY
                arg[o, c] = -1
        barrier()
        for k in range(K):
            q0 = offsets[k]
            q1 = offsets[k + 1]
            if q0 == q1:        # the same for every thread: no barrier is skipped by one only
                continue
            for q in prange(q0, q1, schedule='static'):
                i = in_idx[q]
                max_row(&features[i, 0], &out[out_idx[q], 0], &arg[out_idx[q], 0], i, C)
            barrier()
        if act:
            for o in prange(n_out, schedule='static'):
                leaky_row(&out[o, 0], a, C)
    return out_a, arg_a


cdef inline void _leaky_grad_row(const floating* gy, const floating* y, floating a,
                                 floating* gd, Py_ssize_t C) noexcept nogil:
    """gd = gy * (1 where y > 0, a elsewhere)"""
    if floating is float:
        scn_leaky_grad_row_float(gy, y, a, gd, C)
    else:
        scn_leaky_grad_row_double(gy, y, a, gd, C)


cdef inline void _route_row(const floating* gy, const int32_t* arg, floating* gx, int32_t i,
                            Py_ssize_t C) noexcept nogil:
    """gx = gy where arg == i, else 0"""
    if floating is float:
        scn_route_row_float(gy, arg, gx, i, C)
    else:
        scn_route_row_double(gy, arg, gx, i, C)


cdef void _leaky_grad_rows(const floating[:, ::1] gy, const floating[:, ::1] y, floating a,
                           floating[:, ::1] gd) noexcept nogil:
    cdef Py_ssize_t o
    for o in prange(gy.shape[0], schedule='static'):
        _leaky_grad_row(&gy[o, 0], &y[o, 0], a, &gd[o, 0], gy.shape[1])


cdef int _inputs_repeat(const int32_t[::1] in_idx, Py_ssize_t n_in) noexcept nogil:
    """Whether some input row sits in two windows (overlapping windows, s < f); -1 if out
    of memory."""
    cdef uint8_t* seen = <uint8_t*>scn_calloc(n_in, 1)
    cdef Py_ssize_t q
    cdef int rep = 0
    if seen == NULL:
        return -1
    for q in range(in_idx.shape[0]):
        if seen[in_idx[q]]:
            rep = 1
            break
        seen[in_idx[q]] = 1
    free(seen)
    return rep


def maxpool_backward(const floating[:, ::1] grad_out, const int32_t[:, ::1] argmax,
                     const int32_t[::1] in_idx, const int32_t[::1] out_idx,
                     const int64_t[::1] offsets, Py_ssize_t n_in, *, window=None,
                     negative_slope=None, output=None):
    """grad_features[i, c] = sum of grad_out[o, c] over windows o that i won in channel c.

    grad_out : (n_out, C); argmax : (n_out, C) int32 from maxpool_forward     # IN
    window : (n_out, K) int32, optional: build_window of the rulebook, passed only when the
             windows partition the input rows (f == s: every input in exactly one window).
             Then each input row is written once, from its window, with no zeroing pass.
    negative_slope, output : the forward's negative_slope and its output (n_out, C): the
             fused activation's backward (grad_out times 1 where output > 0, the slope
             elsewhere) comes first
    Returns grad_features (n_in, C) and grad_ground (C,) (the windows the ground won).
    Otherwise, non-overlapping windows: one pass over the outputs, scattering to the winners
    (each input has one window, so no two threads write one row); overlapping: per offset.
    """
    cdef int K = offsets.shape[0] - 1, k
    cdef Py_ssize_t C = grad_out.shape[1], n_out = grad_out.shape[0], o, c, q, q0, q1, ch
    cdef Py_ssize_t nch = (n_out + POOL_CHUNK - 1) // POOL_CHUNK
    cdef int32_t i, a
    dtype = np.float32 if floating is float else np.float64
    gx_a = np.empty((n_in, C), dtype=dtype)
    part_a = np.zeros((max(nch, 1), C), dtype=dtype)
    cdef floating[:, ::1] gx = gx_a
    cdef floating[:, ::1] part = part_a
    cdef const int32_t[:, ::1] win
    cdef const floating[:, ::1] y
    cdef floating[:, ::1] gdv
    cdef floating* gd
    cdef const floating* gr
    cdef bint gap, act = negative_slope is not None
    cdef floating slope = negative_slope if act else 0
    cdef int repeat, failed = 0
    cdef int* failp = &failed
    if act:
        y = output
        if window is None or in_idx.shape[0] != n_in:    # activation first, then route
            gy_a = np.empty((n_out, C), dtype=dtype)
            gdv = gy_a
            with nogil:
                _leaky_grad_rows(grad_out, y, slope, gdv)
            return maxpool_backward(gy_a, argmax, in_idx, out_idx, offsets, n_in)
    if window is not None and in_idx.shape[0] == n_in and n_out:
        win = window
        with nogil, parallel():
            gd = <floating*>scn_malloc(C * sizeof(floating))
            if gd == NULL:
                failp[0] = 1
            for ch in prange(nch, schedule='static'):
                if gd == NULL:
                    continue
                for o in range(ch * POOL_CHUNK, min(ch * POOL_CHUNK + POOL_CHUNK, n_out)):
                    gr = &grad_out[o, 0]
                    if act:
                        _leaky_grad_row(gr, &y[o, 0], slope, gd, C)
                        gr = gd
                    gap = False
                    for k in range(K):
                        i = win[o, k]
                        if i >= 0:
                            _route_row(gr, &argmax[o, 0], &gx[i, 0], i, C)
                        else:
                            gap = True
                    if gap:       # only a window with a gap has the ground as a candidate
                        for c in range(C):
                            if argmax[o, c] < 0:
                                part[ch, c] += gr[c]
            free(gd)
        if failed:
            raise MemoryError(f"maxpool_backward: out of memory ({C} channels per thread)")
        return gx_a, part_a.sum(axis=0)   # chunk partials in a fixed order
    with nogil:
        for q in prange(n_in, schedule='static'):   # zero (and first-touch) in parallel
            for c in range(C):
                gx[q, c] = 0
    if n_out == 0:
        return gx_a, part_a.sum(axis=0)
    with nogil:
        repeat = _inputs_repeat(in_idx, n_in)
    if repeat < 0:
        raise MemoryError(f"maxpool_backward: out of memory ({n_in} bytes)")
    with nogil:
        if not repeat:
            for ch in prange(nch, schedule='static'):
                for o in range(ch * POOL_CHUNK, min(ch * POOL_CHUNK + POOL_CHUNK, n_out)):
                    for c in range(C):
                        a = argmax[o, c]
                        if a >= 0:
                            gx[a, c] += grad_out[o, c]
                        else:
                            part[ch, c] += grad_out[o, c]
        else:
            for ch in prange(nch, schedule='static'):
                for o in range(ch * POOL_CHUNK, min(ch * POOL_CHUNK + POOL_CHUNK, n_out)):
                    for c in range(C):
                        if argmax[o, c] < 0:
                            part[ch, c] += grad_out[o, c]
            with parallel():
                for k in range(K):
                    q0 = offsets[k]
                    q1 = offsets[k + 1]
                    if q0 == q1:    # the same for every thread
                        continue
                    for q in prange(q0, q1, schedule='static'):
                        i = in_idx[q]
                        o = out_idx[q]
                        _max_row_backward(&grad_out[o, 0], &argmax[o, 0], &gx[i, 0], i, C)
                    barrier()
    return gx_a, part_a.sum(axis=0)   # chunk partials in a fixed order


def avgpool_forward(const floating[:, ::1] features, const floating[::1] ground,
                    const int32_t[::1] in_idx, const int32_t[::1] out_idx,
                    const int64_t[::1] offsets, Py_ssize_t n_out):
    """out[o] = ground + sum over active i in o's window of (features[i] - ground) / K.

    (the mean over all K window sites, inactive ones counting as ground)
    features : (n_in, C); ground : (C,); rulebook                   # IN
    Returns out (n_out, C).
    """
    cdef int K = offsets.shape[0] - 1, k
    cdef Py_ssize_t C = features.shape[1], o, c, q
    cdef int32_t i
    cdef Py_ssize_t q0, q1
    cdef floating inv = 1.0 / K
    dtype = np.float32 if floating is float else np.float64
    out_a = np.empty((n_out, C), dtype=dtype)
    out_a[...] = np.asarray(ground)
    cdef floating[:, ::1] out = out_a
    if n_out:
        with nogil, parallel():
            for k in range(K):
                q0 = offsets[k]
                q1 = offsets[k + 1]
                if q0 == q1:        # the same for every thread
                    continue
                for q in prange(q0, q1, schedule='static'):
                    i = in_idx[q]
                    o = out_idx[q]
                    for c in range(C):
                        out[o, c] += (features[i, c] - ground[c]) * inv
                barrier()
    return out_a


def avgpool_backward(const floating[:, ::1] grad_out, const int32_t[::1] in_idx,
                     const int32_t[::1] out_idx, const int64_t[::1] offsets, Py_ssize_t n_in):
    """grad_features[i] = sum over windows o holding i of grad_out[o] / K;
    grad_ground = sum over o of grad_out[o] (K - active_o) / K.

    grad_out : (n_out, C); rulebook                                  # IN
    Returns grad_features (n_in, C), grad_ground (C,).
    """
    cdef int K = offsets.shape[0] - 1, k
    cdef Py_ssize_t C = grad_out.shape[1], n_out = grad_out.shape[0], o, c, q
    cdef int32_t i
    cdef Py_ssize_t q0, q1
    cdef floating inv = 1.0 / K
    dtype = np.float32 if floating is float else np.float64
    gx_a = np.zeros((n_in, C), dtype=dtype)
    cdef floating[:, ::1] gx = gx_a
    if n_out:
        with nogil, parallel():
            for k in range(K):
                q0 = offsets[k]
                q1 = offsets[k + 1]
                if q0 == q1:        # the same for every thread
                    continue
                for q in prange(q0, q1, schedule='static'):
                    i = in_idx[q]
                    o = out_idx[q]
                    for c in range(C):
                        gx[i, c] += grad_out[o, c] * inv
                barrier()
    count_a = np.empty(max(n_out, 1), dtype=np.int32)
    cdef int32_t[::1] count = count_a
    _count_active(out_idx, &count[0], n_out)
    missing = (K - count_a[:n_out]).astype(dtype) / K
    gg = (missing @ np.asarray(grad_out)).astype(dtype, copy=False)
    return gx_a, gg


def _fail_alloc(long nth):
    """Test hook: the nth scratch allocation from now in this module fails (0: none).
    Returns how many were still to go before this call (0: the last one set has failed)."""
    cdef long pending = scn_alloc_pending()
    scn_fail_alloc(nth)
    return pending
