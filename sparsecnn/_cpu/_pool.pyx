"""Max and average pooling kernels with the ground state as a candidate (CPU).

Both take the rulebook of the pooling window (the convolution rulebook for (f, s)). A window
that holds fewer than K active sites also covers inactive sites, whose value is ``ground``.
Offsets run in order and, within one, an output row occurs once: no races, fixed sums.
"""
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t, int64_t

import numpy as np


cdef void _count_active(const int32_t[::1] out_idx, int32_t* count,
                        Py_ssize_t n_out) noexcept nogil:
    cdef Py_ssize_t q
    for q in range(n_out):
        count[q] = 0
    for q in range(out_idx.shape[0]):
        count[out_idx[q]] += 1


def maxpool_forward(const floating[:, ::1] features, const floating[::1] ground,
                    const int32_t[::1] in_idx, const int32_t[::1] out_idx,
                    const int64_t[::1] offsets, Py_ssize_t n_out):
    """out[o, c] = max(features[i, c] over active i in o's window; ground[c] if any inactive).

    features : (n_in, C); ground : (C,)                            # IN
    in_idx, out_idx : (P,) int32; offsets : (K + 1,) int64          # IN
    Returns out (n_out, C) and argmax (n_out, C) int32: the input row that won, -1 for the
    ground. Ties go to the earliest candidate: the ground, then offsets in row-major order.
    """
    cdef int K = offsets.shape[0] - 1, k
    cdef Py_ssize_t C = features.shape[1], o, c, q, q0, q1
    cdef int32_t i
    cdef floating v
    cdef floating neg_inf = -np.inf
    dtype = np.float32 if floating is float else np.float64
    out_a = np.empty((n_out, C), dtype=dtype)
    arg_a = np.empty((n_out, C), dtype=np.int32)
    count_a = np.empty(max(n_out, 1), dtype=np.int32)
    cdef floating[:, ::1] out = out_a
    cdef int32_t[:, ::1] arg = arg_a
    cdef int32_t[::1] count = count_a
    if n_out == 0:
        return out_a, arg_a
    with nogil:
        _count_active(out_idx, &count[0], n_out)
        for o in prange(n_out, schedule='static'):
            for c in range(C):
                out[o, c] = neg_inf if count[o] == K else ground[c]
                arg[o, c] = -1
        with parallel():
            for k in range(K):
                q0 = offsets[k]
                q1 = offsets[k + 1]
                for q in prange(q0, q1, schedule='static'):
                    i = in_idx[q]
                    o = out_idx[q]
                    for c in range(C):
                        v = features[i, c]
                        if v > out[o, c]:
                            out[o, c] = v
                            arg[o, c] = i
    return out_a, arg_a


def maxpool_backward(const floating[:, ::1] grad_out, const int32_t[:, ::1] argmax,
                     const int32_t[::1] in_idx, const int32_t[::1] out_idx,
                     const int64_t[::1] offsets, Py_ssize_t n_in):
    """grad_features[i, c] = sum of grad_out[o, c] over windows o that i won in channel c.

    grad_out : (n_out, C); argmax : (n_out, C) int32 from maxpool_forward     # IN
    Returns grad_features (n_in, C) and grad_ground (C,) (the windows the ground won).
    """
    cdef int K = offsets.shape[0] - 1, k
    cdef Py_ssize_t C = grad_out.shape[1], n_out = grad_out.shape[0], o, c, q
    cdef int32_t i
    cdef Py_ssize_t q0, q1
    dtype = np.float32 if floating is float else np.float64
    gx_a = np.zeros((n_in, C), dtype=dtype)
    cdef floating[:, ::1] gx = gx_a
    if n_out:
        with nogil, parallel():
            for k in range(K):
                q0 = offsets[k]
                q1 = offsets[k + 1]
                for q in prange(q0, q1, schedule='static'):
                    i = in_idx[q]
                    o = out_idx[q]
                    for c in range(C):
                        if argmax[o, c] == i:
                            gx[i, c] += grad_out[o, c]
    g_out = np.asarray(grad_out)
    gg = np.where(np.asarray(argmax) == -1, g_out, 0).sum(axis=0).astype(dtype, copy=False)
    return gx_a, gg


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
                for q in prange(q0, q1, schedule='static'):
                    i = in_idx[q]
                    o = out_idx[q]
                    for c in range(C):
                        out[o, c] += (features[i, c] - ground[c]) * inv
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
                for q in prange(q0, q1, schedule='static'):
                    i = in_idx[q]
                    o = out_idx[q]
                    for c in range(C):
                        gx[i, c] += grad_out[o, c] * inv
    count_a = np.empty(max(n_out, 1), dtype=np.int32)
    cdef int32_t[::1] count = count_a
    _count_active(out_idx, &count[0], n_out)
    missing = (K - count_a[:n_out]).astype(dtype) / K
    gg = (missing @ np.asarray(grad_out)).astype(dtype, copy=False)
    return gx_a, gg
