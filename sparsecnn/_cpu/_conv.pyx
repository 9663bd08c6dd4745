"""Sparse convolution kernels (CPU): gather -> GEMM -> scatter, per filter offset.

Pairs of one offset are cut into fixed chunks; OpenMP threads take chunks, gather the rows
into a private buffer, multiply with BLAS (held at one thread by the caller) and scatter-add.
Within one offset an output (or input) row occurs at most once, so scatters never race; the
offsets run in order, so every sum has a fixed order and results are bitwise reproducible
whatever the number of threads. Weight gradients go to per-chunk partial buffers that are
summed afterwards in chunk order (no float atomics).
"""
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

import numpy as np

from ._blas cimport _gemm_nn, _gemm_nt, _gemm_tn
from ._omp cimport barrier
from ._rows cimport (
    scn_add_double,
    scn_add_float,
    scn_axpy_double,
    scn_axpy_float,
    scn_sub_double,
    scn_sub_float,
)

from ._rulebook import build_window

cdef enum:
    FWD_CHUNK = 256     # rows per forward task (gather + result buffers stay in L2)
    BWD_MIN_CHUNK = 256  # rows per backward task, at least
    BWD_MAX_CHUNKS = 32  # per offset: bounds the partial weight-gradient buffers
    SMALL_CIN = 4       # below this many input channels a GEMM is the wrong tool
    RED_BLOCK = 512     # elements per task when weight-gradient partials are summed


cdef inline void _axpy(floating a, const floating* x, floating* y, Py_ssize_t n) noexcept nogil:
    """y += a x"""
    if floating is float:
        scn_axpy_float(a, x, y, n)
    else:
        scn_axpy_double(a, x, y, n)


cdef inline void _add(const floating* x, floating* y, Py_ssize_t n) noexcept nogil:
    """y += x"""
    if floating is float:
        scn_add_float(x, y, n)
    else:
        scn_add_double(x, y, n)


cdef inline void _sub(const floating* x, const floating* g, floating* y,
                      Py_ssize_t n) noexcept nogil:
    """y = x - g"""
    if floating is float:
        scn_sub_float(x, g, y, n)
    else:
        scn_sub_double(x, g, y, n)


cdef void _fwd_chunk(const floating* x, const floating* w, const floating* g,
                     const int32_t* in_idx, const int32_t* out_idx, Py_ssize_t r,
                     int cin, int cout, floating* gbuf, floating* ybuf,
                     floating* out) noexcept nogil:
    """out[out_idx[t]] += w^T (x[in_idx[t]] - g) for t < r."""
    cdef Py_ssize_t t
    for t in range(r):
        _sub(x + <Py_ssize_t>in_idx[t] * cin, g, gbuf + t * cin, cin)
    _gemm_nn(<int>r, cout, cin, gbuf, w, <floating>0, ybuf)
    for t in range(r):
        _add(ybuf + t * cout, out + <Py_ssize_t>out_idx[t] * cout, cout)


cdef void _small_cin_forward(const floating[:, ::1] x, const floating[:, :, ::1] w,
                             const floating[::1] bias, const floating[::1] g,
                             const int32_t[:, ::1] win, floating[:, ::1] out) noexcept nogil:
    """Few input channels: go output by output over the window (build_window) and
    accumulate each output row once, instead of K scattered passes over the whole output.
    Same sums in the same order (bias, then offsets ascending) as the per-offset path."""
    cdef Py_ssize_t n_out = out.shape[0], o, ci
    cdef int K = w.shape[0], cin = w.shape[1], cout = w.shape[2], k
    cdef int32_t i
    cdef floating* orow
    for o in prange(n_out, schedule='static'):
        orow = &out[o, 0]
        for ci in range(cout):
            orow[ci] = bias[ci]
        for k in range(K):
            i = win[o, k]
            if i < 0:
                continue
            for ci in range(cin):
                _axpy(x[i, ci] - g[ci], &w[k, ci, 0], orow, cout)


def conv_forward(const floating[:, ::1] features, const floating[:, :, ::1] weight,
                 const floating[::1] bias, const floating[::1] ground,
                 const int32_t[::1] in_idx, const int32_t[::1] out_idx,
                 const int64_t[::1] offsets, Py_ssize_t n_out, *, window=None):
    """out[o] = bias + sum over pairs (i, o) of offset k of weight[k]^T (features[i] - ground).

    features : (n_in, C_in) float32/float64      # IN
    weight : (K, C_in, C_out), bias : (C_out,)   # IN (bias: the row outputs start from)
    ground : (C_in,)                             # IN, value of the inactive input sites
    in_idx, out_idx : (P,) int32; offsets : (K + 1,) int64    # IN, the rulebook
    window : (n_out, K) int32, optional: build_window of the rulebook. Used (and built here
             if None) only when C_in is small, where the kernel works output by output.
    Returns out : (n_out, C_out).
    """
    cdef int K = weight.shape[0], cin = weight.shape[1], cout = weight.shape[2], k
    dtype = np.float32 if floating is float else np.float64
    out_a = np.empty((n_out, cout), dtype=dtype)
    cdef floating[:, ::1] out = out_a
    cdef Py_ssize_t c, a, m, nch, o, co
    cdef floating* gbuf
    cdef floating* ybuf
    if n_out == 0:
        return out_a
    cdef const int32_t[:, ::1] win
    if cin < SMALL_CIN and in_idx.shape[0]:
        if window is None:
            window = build_window(in_idx, out_idx, offsets, n_out)
        win = window
        with nogil:
            _small_cin_forward(features, weight, bias, ground, win, out)
        return out_a
    with nogil:
        for o in prange(n_out, schedule='static'):   # every output starts from bias
            for co in range(cout):
                out[o, co] = bias[co]
    if in_idx.shape[0] == 0:
        return out_a
    with nogil, parallel():
        gbuf = <floating*>malloc(FWD_CHUNK * cin * sizeof(floating))
        ybuf = <floating*>malloc(FWD_CHUNK * cout * sizeof(floating))
        for k in range(K):
            m = offsets[k + 1] - offsets[k]
            nch = (m + FWD_CHUNK - 1) // FWD_CHUNK
            for c in prange(nch, schedule='dynamic'):
                a = offsets[k] + c * FWD_CHUNK
                _fwd_chunk(&features[0, 0], &weight[k, 0, 0], &ground[0], &in_idx[a],
                           &out_idx[a], min(FWD_CHUNK, offsets[k + 1] - a), cin, cout,
                           gbuf, ybuf, &out[0, 0])
            barrier()       # offset k + 1 scatters into the same rows
        free(gbuf)
        free(ybuf)
    return out_a


cdef void _bwd_chunk(const floating* x, const floating* w, const floating* g,
                     const floating* gy, const int32_t* in_idx, const int32_t* out_idx,
                     Py_ssize_t r, int cin, int cout, floating* xbuf, floating* gbuf,
                     floating* dxbuf, floating* gx, floating* dw, bint want_gx) noexcept nogil:
    """gx[in_idx[t]] += w gy[out_idx[t]];  dw = sum_t (x[in_idx[t]] - g) gy[out_idx[t]]^T."""
    cdef Py_ssize_t t, ci, co
    cdef const floating* xr
    cdef const floating* gr
    cdef floating* dr
    cdef floating acc
    if cin < SMALL_CIN:
        for ci in range(cin * cout):
            dw[ci] = 0
        for t in range(r):
            xr = x + <Py_ssize_t>in_idx[t] * cin
            gr = gy + <Py_ssize_t>out_idx[t] * cout
            dr = gx + <Py_ssize_t>in_idx[t] * cin
            for ci in range(cin):
                _axpy(xr[ci] - g[ci], gr, dw + ci * cout, cout)
                if want_gx:
                    acc = 0
                    for co in range(cout):
                        acc = acc + w[ci * cout + co] * gr[co]
                    dr[ci] += acc
        return
    for t in range(r):
        _sub(x + <Py_ssize_t>in_idx[t] * cin, g, xbuf + t * cin, cin)
        memcpy(gbuf + t * cout, gy + <Py_ssize_t>out_idx[t] * cout, cout * sizeof(floating))
    _gemm_tn(cin, cout, <int>r, xbuf, gbuf, <floating>0, dw)     # (cin, cout) = x_r^T @ gy_r
    if not want_gx:
        return
    _gemm_nt(<int>r, cin, cout, gbuf, w, <floating>0, dxbuf)    # (r, cin) = gy_r @ w^T
    for t in range(r):
        _add(dxbuf + t * cin, gx + <Py_ssize_t>in_idx[t] * cin, cin)


cdef void _small_cin_dw(const floating[:, ::1] x, const floating[::1] g,
                       const floating[:, ::1] gy, const int32_t[:, ::1] win, Py_ssize_t o0,
                       Py_ssize_t o1, int cin, int cout, floating* dw) noexcept nogil:
    """dw[k] = sum over outputs o0 <= o < o1 and their pairs (i, k) of (x[i] - g) gy[o]^T:
    the weight gradient of a few-input-channel convolution, output by output (each gy row is
    read once, not once per offset). dw: (K, cin, cout), overwritten."""
    cdef int K = win.shape[1], k, ci
    cdef Py_ssize_t o, e
    cdef int32_t i
    for e in range(K * cin * cout):
        dw[e] = 0
    for o in range(o0, o1):
        for k in range(K):
            i = win[o, k]
            if i >= 0:
                for ci in range(cin):
                    _axpy(x[i, ci] - g[ci], &gy[o, 0], dw + (k * cin + ci) * cout, cout)


cdef void _sum_partials(const floating* part, Py_ssize_t stride, Py_ssize_t n,
                        Py_ssize_t e0, Py_ssize_t e1, floating* dst) noexcept nogil:
    """dst[e] = sum over c < n of part[c * stride + e], for e0 <= e < e1, in order of c
    (a fixed order: the weight gradient does not depend on the number of threads)."""
    cdef Py_ssize_t c, e
    for e in range(e0, e1):
        dst[e] = 0
    for c in range(n):
        _add(part + c * stride + e0, dst + e0, e1 - e0)


def conv_backward(const floating[:, ::1] features, const floating[:, :, ::1] weight,
                  const floating[::1] ground, const floating[:, ::1] grad_out,
                  const int32_t[::1] in_idx, const int32_t[::1] out_idx,
                  const int64_t[::1] offsets, *, bint grad_input=True, window=None):
    """Gradients of conv_forward's pair sum.

    grad_features[i] = sum over pairs (i, o, k) of weight[k] grad_out[o]
    grad_weight[k] = sum over pairs (i, o) of offset k of (features[i] - ground) grad_out[o]^T
    features : (n_in, C_in); weight : (K, C_in, C_out); ground : (C_in,)   # IN
    grad_out : (n_out, C_out)                                              # IN
    window : (n_out, K) int32, optional: build_window of the rulebook. With few input
             channels and grad_input=False the weight gradient then goes output by output.
    Returns grad_features (n_in, C_in) (None with grad_input=False: the input needs no
    gradient, and its GEMM and scatter are skipped), grad_weight (K, C_in, C_out).
    (The bias/ground terms of the layer are plain sums, left to the caller.)
    Weight gradients are summed from per-chunk partials in a fixed order: the chunking does
    not depend on the number of threads, so neither do the results.
    """
    cdef int K = weight.shape[0], cin = weight.shape[1], cout = weight.shape[2], k
    cdef Py_ssize_t n_in = features.shape[0], n_out = grad_out.shape[0]
    dtype = np.float32 if floating is float else np.float64
    gw_a = np.empty((K, cin, cout), dtype=dtype)
    cdef floating[:, :, ::1] gw = gw_a
    cdef Py_ssize_t E = cin * cout, e0, nblk = (E + RED_BLOCK - 1) // RED_BLOCK, t, c, a, kk
    cdef const int32_t[:, ::1] win
    cdef floating[:, ::1] flat
    if window is not None and not grad_input and cin < SMALL_CIN:
        win = window
        nch1 = max((n_out + FWD_CHUNK - 1) // FWD_CHUNK, 1)
        part1_a = np.empty((nch1, K * E), dtype=dtype)      # each chunk zeroes its own
        flat = part1_a
        nblk = (K * E + RED_BLOCK - 1) // RED_BLOCK
        with nogil, parallel():
            for c in prange(nch1, schedule='dynamic'):
                _small_cin_dw(features, ground, grad_out, win, c * FWD_CHUNK,
                              min(c * FWD_CHUNK + FWD_CHUNK, n_out), cin, cout, &flat[c, 0])
            barrier()
            for t in prange(nblk, schedule='static'):   # chunk partials in a fixed order
                e0 = t * RED_BLOCK
                _sum_partials(&flat[0, 0], K * E, nch1, e0, min(e0 + RED_BLOCK, K * E),
                              &gw[0, 0, 0])
        return None, gw_a
    gx_a = np.empty((n_in if grad_input else 1, cin), dtype=dtype)
    # fixed chunking per offset, independent of the thread count
    m_a = np.diff(np.asarray(offsets))
    rows_a = np.maximum(BWD_MIN_CHUNK, -(-m_a // BWD_MAX_CHUNKS)).astype(np.int64)
    nch_a = -(-m_a // rows_a)
    base_a = np.zeros(K + 1, dtype=np.int64)
    np.cumsum(nch_a, out=base_a[1:])
    cdef Py_ssize_t total = base_a[K], maxrows = int(rows_a.max()) if K else 1, i, ci
    part_a = np.empty((max(total, 1), cin, cout), dtype=dtype)
    cdef const int64_t[::1] rows = rows_a
    cdef const int64_t[::1] nch = nch_a
    cdef const int64_t[::1] base = base_a
    cdef floating[:, ::1] gx = gx_a
    cdef floating[:, :, ::1] part = part_a
    cdef Py_ssize_t nk
    cdef floating* xbuf
    cdef floating* gbuf
    cdef floating* dxbuf
    with nogil, parallel():
        for i in prange(gx.shape[0], schedule='static'):   # zero (and first-touch) in parallel
            for ci in range(cin):
                gx[i, ci] = 0
        barrier()
        xbuf = <floating*>malloc(maxrows * cin * sizeof(floating))
        gbuf = <floating*>malloc(maxrows * cout * sizeof(floating))
        dxbuf = <floating*>malloc(maxrows * cin * sizeof(floating))
        for k in range(K):
            nk = nch[k]
            for c in prange(nk, schedule='dynamic'):
                a = offsets[k] + c * rows[k]
                _bwd_chunk(&features[0, 0], &weight[k, 0, 0], &ground[0], &grad_out[0, 0],
                           &in_idx[a], &out_idx[a], min(rows[k], offsets[k + 1] - a),
                           cin, cout, xbuf, gbuf, dxbuf, &gx[0, 0], &part[base[k] + c, 0, 0],
                           grad_input)
            barrier()   # offset k + 1 scatters into the same rows
        free(xbuf)
        free(gbuf)
        free(dxbuf)
        # weight gradient of offset k: its chunk partials, summed in chunk order
        for t in prange(K * nblk, schedule='static'):
            kk = t // nblk
            e0 = (t % nblk) * RED_BLOCK
            _sum_partials(&part[base[kk], 0, 0], E, base[kk + 1] - base[kk], e0,
                          min(e0 + RED_BLOCK, E), &gw[kk, 0, 0])
    return (gx_a if grad_input else None), gw_a
