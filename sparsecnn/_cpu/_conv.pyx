"""Sparse convolution kernels (CPU): gather -> GEMM -> scatter.

Forward, given the rulebook's window table (pairs grouped by output): OpenMP threads take
chunks of outputs; for each offset in turn, the chunk's outputs that have an input there are
gathered into a private buffer, multiplied with BLAS (held at one thread by the caller) and
added to their rows, which stay in cache until the chunk is done. Backward, given the pairs
grouped by input, when nearly every input has all K pairs: chunks of inputs with the K
paired output gradients side by side, two deep GEMMs per chunk. Otherwise pairs of one
offset are cut into fixed chunks, gathered, multiplied and scatter-added into the whole
output (or input gradient). Within one offset an output (or input) row occurs at most
once, so scatters never race; the offsets run in order, so every sum has a fixed order and
results are bitwise reproducible whatever the number of threads (chunks depend on the sizes
only). Weight gradients go to per-chunk partial buffers that are summed afterwards in chunk
order (no float atomics).
"""
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport free
from libc.string cimport memcpy

import numpy as np

from ._alloc cimport scn_alloc_pending, scn_fail_alloc, scn_malloc
from ._blas cimport _gemm_nn, _gemm_nt, _gemm_tn
from ._omp cimport barrier
from ._rows cimport (
    pool_row,
    scn_add_double,
    scn_add_float,
    scn_axpy_double,
    scn_axpy_float,
    scn_sub_double,
    scn_sub_float,
)

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


cdef inline Py_ssize_t _fwd_rows(Py_ssize_t m) noexcept nogil:
    """Rows per task for m pairs of an offset (or m outputs, or m inputs): FWD_CHUNK, but at
    least 8 tasks (rounded to 16 rows, at least 32) when m is small, so that the last layers
    still keep every thread busy. Depends on m only, never on the number of threads."""
    cdef Py_ssize_t r = ((m + 7) // 8 + 15) // 16 * 16
    return min(<Py_ssize_t>FWD_CHUNK, max(<Py_ssize_t>32, r))


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


cdef void _out_chunk(const floating* x, const floating* w, const floating* g,
                     const floating* bias, const int32_t* win, const int32_t* rows,
                     Py_ssize_t o0, Py_ssize_t r, int K, int cin, int cout, floating* gbuf,
                     floating* ybuf, int32_t* sel, int32_t* src, floating* dst) noexcept nogil:
    """r outputs, all offsets: output rows o0 + t (or rows[t] if rows is not NULL) computed
    into dst[t] (row stride cout): dst[t] = bias, then for k = 0, 1, ...: the outputs whose
    window has an input at offset k are gathered (x - g), multiplied by w[k] and added to
    their rows, which stay in cache for the whole chunk (written once to memory, no bias
    pass over the whole output, no barrier between offsets). Per output the same sums in
    the same order as the per-offset path. win: (n_out, K) row-major."""
    cdef Py_ssize_t t, j, m, o
    cdef int k
    cdef int32_t i
    for t in range(r):
        memcpy(dst + t * cout, bias, cout * sizeof(floating))
    for k in range(K):
        m = 0
        for t in range(r):          # branch-free compaction: which are present has no pattern
            o = o0 + t if rows == NULL else rows[t]
            i = win[o * K + k]
            sel[m] = <int32_t>t
            src[m] = i
            m += i >= 0
        if m == 0:
            continue
        for j in range(m):
            _sub(x + <Py_ssize_t>src[j] * cin, g, gbuf + j * cin, cin)
        _gemm_nn(<int>m, cout, cin, gbuf, w + <Py_ssize_t>k * cin * cout, <floating>0, ybuf)
        for j in range(m):
            _add(ybuf + j * cout, dst + <Py_ssize_t>sel[j] * cout, cout)


cdef void _im2col(const floating* xg, Py_ssize_t n_in, const int32_t[:, ::1] win,
                  const int32_t* rows, Py_ssize_t o0, Py_ssize_t r, int cin, floating* a,
                  int lda) noexcept nogil:
    """a[t, k * cin + ci] = xg[win[o, k], ci] for t < r and o = o0 + t (or rows[t] if rows
    is not NULL), where xg (n_in + 1, cin) holds
    features - ground and a last row of zeros, taken where the window has no input
    (win < 0): the outputs' windows as the rows of a matrix (row stride lda). Branch-free:
    which offsets are present varies from output to output without pattern."""
    cdef int K = win.shape[1], k, ci
    cdef Py_ssize_t t, o
    cdef int32_t i
    cdef const floating* src
    cdef floating* dst
    for t in range(r):
        dst = a + t * lda
        o = o0 + t if rows == NULL else rows[t]
        # cin written out for 1 and 2: a variable-length copy of a few floats becomes a
        # memcpy call per window entry
        if cin == 1:
            for k in range(K):
                i = win[o, k]
                dst[k] = xg[<Py_ssize_t>i if i >= 0 else n_in]
        elif cin == 2:
            for k in range(K):
                i = win[o, k]
                src = xg + 2 * (<Py_ssize_t>i if i >= 0 else n_in)
                dst[2 * k] = src[0]
                dst[2 * k + 1] = src[1]
        else:
            for k in range(K):
                i = win[o, k]
                src = xg + (<Py_ssize_t>i if i >= 0 else n_in) * cin
                for ci in range(cin):
                    dst[k * cin + ci] = src[ci]


cdef inline void _xg_row(const floating[:, ::1] x, const floating[::1] g, Py_ssize_t i,
                         floating* xg) noexcept nogil:
    """Row i of the table xg (n_in + 1, cin) that _im2col reads: features - ground, and a last
    row of zeros."""
    cdef Py_ssize_t n_in = x.shape[0]
    cdef int cin = x.shape[1], ci
    for ci in range(cin):
        xg[i * cin + ci] = x[i, ci] - g[ci] if i < n_in else 0


def _weight_bias(weight, bias):
    """[weight as (K * C_in, C_out); bias]: the matrix the few-channel im2col rows (with their
    column of ones) are multiplied by."""
    K, cin, cout = weight.shape[0], weight.shape[1], weight.shape[2]
    return np.concatenate([np.asarray(weight).reshape(K * cin, cout),
                           np.asarray(bias).reshape(1, cout)])


cdef int _small_cin_forward(const floating[:, ::1] x, const floating[:, ::1] wb,
                            const floating[::1] g, const int32_t[:, ::1] win,
                            floating[:, ::1] out) noexcept nogil:
    """Few input channels: per chunk of outputs, their windows as the rows of a matrix A
    (zeros where an offset has no input, then a column of ones), and out = A @ wb with wb =
    [weight as (K * C_in, C_out); bias]. With C_in this small the zeros cost little, while
    K scattered passes over the whole output (or a branch per window entry) cost much.
    Returns 0, or -1 if out of memory."""
    cdef Py_ssize_t n_out = out.shape[0], n_in = x.shape[0], i
    cdef Py_ssize_t nch = (n_out + FWD_CHUNK - 1) // FWD_CHUNK, c, o0, r, t
    cdef int KC = wb.shape[0], cout = wb.shape[1], cin = x.shape[1]
    cdef floating* abuf
    cdef floating* xg = <floating*>scn_malloc((n_in + 1) * cin * sizeof(floating))
    cdef int failed = 0
    cdef int* failp = &failed
    if xg == NULL:
        return -1
    with parallel():
        for i in prange(n_in + 1, schedule='static'):
            _xg_row(x, g, i, xg)
        barrier()
        abuf = <floating*>scn_malloc(min(<Py_ssize_t>FWD_CHUNK, n_out) * KC * sizeof(floating))
        if abuf == NULL:
            failp[0] = 1
        for c in prange(nch, schedule='static'):
            if abuf == NULL:
                continue
            o0 = c * FWD_CHUNK
            r = min(FWD_CHUNK, n_out - o0)
            _im2col(xg, n_in, win, NULL, o0, r, cin, abuf, KC)
            for t in range(r):
                abuf[t * KC + KC - 1] = 1
            _gemm_nn(<int>r, cout, KC, abuf, &wb[0, 0], <floating>0, &out[o0, 0])
        free(abuf)
    free(xg)
    return -failed


def conv_forward(const floating[:, ::1] features, const floating[:, :, ::1] weight,
                 const floating[::1] bias, const floating[::1] ground,
                 const int32_t[::1] in_idx, const int32_t[::1] out_idx,
                 const int64_t[::1] offsets, Py_ssize_t n_out, *, window=None):
    """out[o] = bias + sum over pairs (i, o) of offset k of weight[k]^T (features[i] - ground).

    features : (n_in, C_in) float32/float64      # IN
    weight : (K, C_in, C_out), bias : (C_out,)   # IN (bias: the row outputs start from)
    ground : (C_in,)                             # IN, value of the inactive input sites
    in_idx, out_idx : (P,) int32; offsets : (K + 1,) int64    # IN, the rulebook
    window : (n_out, K) int32, optional: build_window of the rulebook. With it the kernel
             works on chunks of outputs, each output row accumulated in cache and written
             once (faster; the same sums in the same order, up to BLAS's rounding of a row
             by its place in a block); without it, per offset, scattering into the whole
             output. When C_in is small and the window is given: im2col + GEMM per chunk of
             outputs.
    Returns out : (n_out, C_out).
    """
    cdef int K = weight.shape[0], cin = weight.shape[1], cout = weight.shape[2], k
    dtype = np.float32 if floating is float else np.float64
    out_a = np.empty((n_out, cout), dtype=dtype)
    cdef floating[:, ::1] out = out_a
    cdef Py_ssize_t c, a, m, nch, o, co, rows
    cdef floating* gbuf
    cdef floating* ybuf
    cdef int failed = 0, status
    cdef int* failp = &failed
    cdef bint ok
    if n_out == 0:
        return out_a
    cdef const int32_t[:, ::1] win
    cdef const floating[:, ::1] wb
    if cin < SMALL_CIN and in_idx.shape[0] and window is not None:
        win = window
        wb = _weight_bias(weight, bias)
        with nogil:
            status = _small_cin_forward(features, wb, ground, win, out)
        if status:
            raise MemoryError(f"conv_forward: out of memory for scratch ({n_out} outputs, "
                              f"{K * cin} window values each)")
        return out_a
    cdef int32_t* sel
    cdef int32_t* src
    if window is not None:       # output-stationary: chunks of outputs, each row written once
        win = window
        rows = _fwd_rows(n_out)
        nch = (n_out + rows - 1) // rows
        with nogil, parallel():
            gbuf = <floating*>scn_malloc(FWD_CHUNK * cin * sizeof(floating))
            ybuf = <floating*>scn_malloc(FWD_CHUNK * cout * sizeof(floating))
            sel = <int32_t*>scn_malloc(2 * FWD_CHUNK * sizeof(int32_t))
            src = sel + FWD_CHUNK
            ok = gbuf != NULL and ybuf != NULL and sel != NULL
            if not ok:
                failp[0] = 1
            for c in prange(nch, schedule='dynamic'):
                if not ok:
                    continue
                o = c * rows
                _out_chunk(&features[0, 0], &weight[0, 0, 0], &ground[0], &bias[0], &win[0, 0],
                           NULL, o, min(rows, n_out - o), K, cin, cout, gbuf, ybuf, sel, src,
                           &out[o, 0])
            free(gbuf)
            free(ybuf)
            free(sel)
        if failed:
            raise MemoryError(f"conv_forward: out of memory ({cin} + {cout} channels)")
        return out_a
    with nogil:
        for o in prange(n_out, schedule='static'):   # every output starts from bias
            for co in range(cout):
                out[o, co] = bias[co]
    if in_idx.shape[0] == 0:
        return out_a
    with nogil, parallel():
        gbuf = <floating*>scn_malloc(FWD_CHUNK * cin * sizeof(floating))
        ybuf = <floating*>scn_malloc(FWD_CHUNK * cout * sizeof(floating))
        ok = gbuf != NULL and ybuf != NULL
        if not ok:
            failp[0] = 1
        for k in range(K):
            m = offsets[k + 1] - offsets[k]
            if m == 0:      # the same for every thread (a large window has many empty offsets)
                continue
            rows = _fwd_rows(m)
            nch = (m + rows - 1) // rows
            for c in prange(nch, schedule='dynamic'):
                if not ok:
                    continue
                a = offsets[k] + c * rows
                _fwd_chunk(&features[0, 0], &weight[k, 0, 0], &ground[0], &in_idx[a],
                           &out_idx[a], min(rows, offsets[k + 1] - a), cin, cout,
                           gbuf, ybuf, &out[0, 0])
            barrier()       # offset k + 1 scatters into the same rows
        free(gbuf)
        free(ybuf)
    if failed:
        raise MemoryError(f"conv_forward: out of memory ({cin} + {cout} channels)")
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


cdef void _bwd_in_chunk(const floating* x, const floating* wt, const floating* g,
                        const floating* gy, const int32_t* iwin, Py_ssize_t i0, Py_ssize_t r,
                        int K, int cin, int cout, floating* abuf, floating* xbuf,
                        floating* gx, floating* part, floating beta) noexcept nogil:
    """Inputs i0 <= i < i0 + r, all offsets at once. Row t of A (r, K * cout) holds, for each
    offset k, the gradient of the output paired with input i0 + t there (zeros if none):
    part (cin, K * cout) = (x - g)^T A + beta part, the chunk's weight gradient with the
    offsets side by side (beta = 1 adds it to the partial of the chunk group); gx rows (when
    gx is not NULL) = A wt, wt = weight as (K * cout, cin), written once.
    With (nearly) every input in all its K windows, as in stride-1 convolutions, A has few
    zeros, and two deep GEMMs replace 2 K shallow ones and the scatter."""
    cdef Py_ssize_t t, c
    cdef int k
    cdef int32_t o
    cdef Py_ssize_t KC = <Py_ssize_t>K * cout
    cdef floating* arow
    for t in range(r):
        arow = abuf + t * KC
        for k in range(K):
            o = iwin[(i0 + t) * K + k]
            if o >= 0:
                memcpy(arow + k * cout, gy + <Py_ssize_t>o * cout, cout * sizeof(floating))
            else:
                for c in range(cout):
                    arow[k * cout + c] = 0
        _sub(x + (i0 + t) * cin, g, xbuf + t * cin, cin)
    _gemm_tn(cin, <int>KC, <int>r, xbuf, abuf, beta, part)
    if gx != NULL:
        _gemm_nn(<int>r, cin, <int>KC, abuf, wt, <floating>0, gx + i0 * cin)


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
                  const int64_t[::1] offsets, *, bint grad_input=True, window=None,
                  input_window=None):
    """Gradients of conv_forward's pair sum.

    grad_features[i] = sum over pairs (i, o, k) of weight[k] grad_out[o]
    grad_weight[k] = sum over pairs (i, o) of offset k of (features[i] - ground) grad_out[o]^T
    features : (n_in, C_in); weight : (K, C_in, C_out); ground : (C_in,)   # IN
    grad_out : (n_out, C_out)                                              # IN
    window : (n_out, K) int32, optional: build_window of the rulebook. With few input
             channels and grad_input=False the weight gradient then goes output by output.
    input_window : (n_in, K) int32, optional: the pairs grouped by input,
             build_window(out_idx, in_idx, offsets, n_in). With it (and C_in >= 4) both
             gradients go by chunks of inputs with all offsets side by side: worth it when
             most inputs have all K pairs (stride-1 convolutions), see _bwd_in_chunk.
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
    cdef Py_ssize_t E = cin * cout, e0, nblk = (E + RED_BLOCK - 1) // RED_BLOCK, t, c, a, kk, i
    cdef const int32_t[:, ::1] win
    cdef floating[:, ::1] flat
    cdef floating* xg
    cdef floating* abuf
    cdef int failed = 0
    cdef int* failp = &failed
    cdef bint ok
    if window is not None and not grad_input and cin < SMALL_CIN:
        # few input channels: dw = sum over chunks of outputs of A^T gy, A the chunk's
        # windows as rows (_im2col), partials summed in chunk order
        win = window
        nch1 = max((n_out + FWD_CHUNK - 1) // FWD_CHUNK, 1)
        part1_a = np.empty((nch1, K * E), dtype=dtype)
        flat = part1_a
        nblk = (K * E + RED_BLOCK - 1) // RED_BLOCK
        xg = <floating*>scn_malloc((n_in + 1) * cin * sizeof(floating))
        if xg == NULL:
            raise MemoryError(f"conv_backward: out of memory ({n_in + 1} x {cin} values)")
        with nogil, parallel():
            for i in prange(n_in + 1, schedule='static'):
                _xg_row(features, ground, i, xg)
            barrier()
            abuf = <floating*>scn_malloc(min(<Py_ssize_t>FWD_CHUNK, max(n_out, 1)) * K * cin
                                         * sizeof(floating))
            if abuf == NULL:
                failp[0] = 1
            for c in prange(nch1, schedule='static'):
                if abuf == NULL:
                    continue
                a = min(FWD_CHUNK, n_out - c * FWD_CHUNK)
                if a <= 0:      # no outputs at all: one zero partial
                    for e0 in range(K * E):
                        flat[c, e0] = 0
                    continue
                _im2col(xg, n_in, win, NULL, c * FWD_CHUNK, a, cin, abuf, K * cin)
                _gemm_tn(K * cin, cout, <int>a, abuf, &grad_out[c * FWD_CHUNK, 0],
                         <floating>0, &flat[c, 0])
            free(abuf)
            barrier()
            for t in prange(nblk, schedule='static'):   # chunk partials in a fixed order
                e0 = t * RED_BLOCK
                _sum_partials(&flat[0, 0], K * E, nch1, e0, min(e0 + RED_BLOCK, K * E),
                              &gw[0, 0, 0])
        free(xg)
        if failed:
            raise MemoryError(f"conv_backward: out of memory ({K * cin} window values per "
                              f"output)")
        return None, gw_a
    gx_a = np.empty((n_in if grad_input else 1, cin), dtype=dtype)
    cdef floating[:, ::1] gx = gx_a
    if input_window is not None and cin >= SMALL_CIN and n_in and n_out:
        _backward_by_inputs(features, weight, ground, grad_out, input_window,
                            gx if grad_input else None, gw)
        return (gx_a if grad_input else None), gw_a
    # fixed chunking per offset, independent of the thread count
    m_a = np.diff(np.asarray(offsets))
    # BWD_MIN_CHUNK rows, at most BWD_MAX_CHUNKS chunks; small offsets (the last layers)
    # are cut finer, into about 8 chunks of at least 32 rows, so that every thread has work
    small_a = np.clip((-(-m_a // 8) + 15) // 16 * 16, 32, BWD_MIN_CHUNK)
    rows_a = np.maximum(small_a, -(-m_a // BWD_MAX_CHUNKS)).astype(np.int64)
    nch_a = -(-m_a // rows_a)
    base_a = np.zeros(K + 1, dtype=np.int64)
    np.cumsum(nch_a, out=base_a[1:])
    cdef Py_ssize_t total = base_a[K], maxrows = int(rows_a.max()) if K else 1, ci
    part_a = np.empty((max(total, 1), cin, cout), dtype=dtype)
    cdef const int64_t[::1] rows = rows_a
    cdef const int64_t[::1] nch = nch_a
    cdef const int64_t[::1] base = base_a
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
        xbuf = <floating*>scn_malloc(maxrows * cin * sizeof(floating))
        gbuf = <floating*>scn_malloc(maxrows * cout * sizeof(floating))
        dxbuf = <floating*>scn_malloc(maxrows * cin * sizeof(floating))
        ok = xbuf != NULL and gbuf != NULL and dxbuf != NULL
        if not ok:
            failp[0] = 1
        for k in range(K):
            nk = nch[k]
            if nk == 0:     # the same for every thread (a large window has many empty offsets)
                continue
            for c in prange(nk, schedule='dynamic'):
                if not ok:
                    continue
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
    if failed:
        raise MemoryError(f"conv_backward: out of memory ({maxrows} rows of {cin} + {cout} "
                          f"channels)")
    return (gx_a if grad_input else None), gw_a


cdef _backward_by_inputs(const floating[:, ::1] x, weight, const floating[::1] g,
                         const floating[:, ::1] gy, iwindow, gx_view,
                         floating[:, :, ::1] gw):
    """conv_backward by chunks of inputs (_bwd_in_chunk). The chunks form at most
    2 * BWD_MAX_CHUNKS fixed groups of consecutive chunks (memory for the partials stays
    bounded); a group accumulates its chunks' weight gradients in order into its partial
    (C_in, K * C_out); the partials are summed in group order, then laid out as
    (K, C_in, C_out). The input gradient (if gx_view is not None) is written chunk by chunk.
    Groups depend on the sizes only: the result does not depend on the number of threads."""
    cdef Py_ssize_t n_in = x.shape[0], c, i0, t, e0
    cdef int K = weight.shape[0], cin = weight.shape[1], cout = weight.shape[2]
    cdef Py_ssize_t KC = <Py_ssize_t>K * cout, E = cin * KC
    dtype = np.float32 if floating is float else np.float64
    wt_a = np.ascontiguousarray(np.asarray(weight).transpose(0, 2, 1)).reshape(KC, cin)
    cdef const floating[:, ::1] wt = wt_a
    cdef const int32_t[:, ::1] iwin = iwindow
    cdef floating[:, ::1] gx
    cdef floating* gxp = NULL
    if gx_view is not None:
        gx = gx_view
        gxp = &gx[0, 0]
    cdef Py_ssize_t rows = _fwd_rows(n_in)
    cdef Py_ssize_t nch = (n_in + rows - 1) // rows
    cdef Py_ssize_t per = (nch + 2 * BWD_MAX_CHUNKS - 1) // (2 * BWD_MAX_CHUNKS)
    cdef Py_ssize_t ngr = (nch + per - 1) // per, q
    cdef Py_ssize_t nblk = (E + RED_BLOCK - 1) // RED_BLOCK
    part_a = np.empty((ngr, E), dtype=dtype)
    flat_a = np.empty(E, dtype=dtype)
    cdef floating[:, ::1] part = part_a
    cdef floating[::1] flat = flat_a
    cdef floating* abuf
    cdef floating* xbuf
    cdef int failed = 0
    cdef int* failp = &failed
    cdef bint ok
    with nogil, parallel():
        abuf = <floating*>scn_malloc(min(rows, n_in) * KC * sizeof(floating))
        xbuf = <floating*>scn_malloc(min(rows, n_in) * cin * sizeof(floating))
        ok = abuf != NULL and xbuf != NULL
        if not ok:
            failp[0] = 1
        for q in prange(ngr, schedule='dynamic'):
            if not ok:
                continue
            for c in range(q * per, min(nch, (q + 1) * per)):
                i0 = c * rows
                _bwd_in_chunk(&x[0, 0], &wt[0, 0], &g[0], &gy[0, 0], &iwin[0, 0], i0,
                              min(rows, n_in - i0), K, cin, cout, abuf, xbuf, gxp,
                              &part[q, 0], <floating>(c > q * per))
        free(abuf)
        free(xbuf)
        barrier()
        for t in prange(nblk, schedule='static'):   # group partials in a fixed order
            e0 = t * RED_BLOCK
            _sum_partials(&part[0, 0], E, ngr, e0, min(e0 + RED_BLOCK, E), &flat[0])
    if failed:
        raise MemoryError(f"conv_backward: out of memory ({rows} rows of {KC} values)")
    np.asarray(gw)[...] = flat_a.reshape(cin, K, cout).transpose(1, 0, 2)


def conv_maxpool_forward(const floating[:, ::1] features, const floating[:, :, ::1] weight,
                         const floating[::1] bias, const floating[::1] ground,
                         const int32_t[:, ::1] window, const int32_t[:, ::1] pool_window,
                         const floating[::1] pool_ground, *, negative_slope=None):
    """maxpool_forward(conv_forward(...)) without storing the convolution's output.

    features, weight, bias, ground : as conv_forward                     # IN
    window : (n_conv, K) int32, the convolution rulebook's window        # IN
    pool_window : (n_out, K2) int32, the pooling rulebook's window over the convolution's
             outputs; the pooling windows must partition them (pool size == stride)   # IN
    pool_ground : (C_out,) the pooling's ground candidate (the convolution's output ground,
             or -inf for active sites only); negative_slope as maxpool_forward      # IN
    Returns out (n_out, C_out) and argmax (n_out, C_out) int32 (the convolution output row
    that won, -1 for the ground): what maxpool_forward returns for conv_forward's output,
    up to the rounding of the convolution's rows (computed in different chunks).
    Per chunk of pooling outputs, the convolution rows of their windows are computed into
    a private buffer (output-stationary, or im2col + GEMM for few input channels) and
    max-pooled at once: the convolution's output never goes to memory.
    """
    cdef Py_ssize_t n_out = pool_window.shape[0], n_in = features.shape[0]
    cdef int K = weight.shape[0], cin = weight.shape[1], cout = weight.shape[2]
    cdef int K2 = pool_window.shape[1], KC = K * cin + 1
    dtype = np.float32 if floating is float else np.float64
    out_a = np.empty((n_out, cout), dtype=dtype)
    # argmax offset by half a page from out (as in maxpool_forward)
    arg_a = np.empty(n_out * cout + 512, dtype=np.int32)[512:].reshape(n_out, cout)
    if n_out == 0:
        return out_a, arg_a
    cdef floating[:, ::1] out = out_a
    cdef int32_t[:, ::1] arg = arg_a
    cdef bint small = cin < SMALL_CIN, act = negative_slope is not None, ok
    cdef floating a = negative_slope if act else 0
    cdef int failed = 0
    cdef int* failp = &failed
    cdef const floating[:, ::1] wb
    if small:
        wb = _weight_bias(weight, bias)
    # pooling outputs per task: their windows hold at most FWD_CHUNK convolution rows
    cdef Py_ssize_t per = max(1, min(FWD_CHUNK // K2, (n_out + 7) // 8))
    cdef Py_ssize_t nch = (n_out + per - 1) // per, ch, p0, r2, t, m, j, i
    cdef floating* xg = NULL
    cdef floating* ybuf
    cdef floating* gbuf
    cdef floating* hbuf
    cdef int32_t* lst
    cdef int32_t* pos
    cdef int32_t* sel
    cdef int32_t* src
    cdef int32_t o
    if small:
        xg = <floating*>scn_malloc((n_in + 1) * cin * sizeof(floating))
        if xg == NULL:
            raise MemoryError(f"conv_maxpool_forward: out of memory ({n_in + 1} x {cin} "
                              f"values)")
    with nogil, parallel():
        if small:
            for i in prange(n_in + 1, schedule='static'):
                _xg_row(features, ground, i, xg)
            barrier()
        ybuf = <floating*>scn_malloc(per * K2 * cout * sizeof(floating))
        gbuf = <floating*>scn_malloc(per * K2 * max(cin, KC) * sizeof(floating))
        hbuf = <floating*>scn_malloc(per * K2 * cout * sizeof(floating))
        lst = <int32_t*>scn_malloc(4 * per * K2 * sizeof(int32_t))
        pos = lst + per * K2
        sel = pos + per * K2
        src = sel + per * K2
        ok = ybuf != NULL and gbuf != NULL and hbuf != NULL and lst != NULL
        if not ok:
            failp[0] = 1
        for ch in prange(nch, schedule='dynamic'):
            if not ok:
                continue
            p0 = ch * per
            r2 = min(per, n_out - p0)
            m = 0                       # the convolution rows of these windows, in order
            for t in range(r2 * K2):
                o = pool_window[p0 + t // K2, t % K2]
                pos[t] = <int32_t>m if o >= 0 else -1
                if o >= 0:
                    lst[m] = o
                    m = m + 1
            if small:
                _im2col(xg, n_in, window, lst, 0, m, cin, gbuf, KC)
                for j in range(m):
                    gbuf[j * KC + KC - 1] = 1
                _gemm_nn(<int>m, cout, KC, gbuf, &wb[0, 0], <floating>0, ybuf)
            else:
                _out_chunk(&features[0, 0], &weight[0, 0, 0], &ground[0], &bias[0],
                           &window[0, 0], lst, 0, m, K, cin, cout, gbuf, hbuf, sel, src,
                           ybuf)
            for t in range(r2):         # max-pool them, as maxpool_forward does
                pool_row(pos + t * K2, K2, ybuf, cout, lst, &pool_ground[0], &out[p0 + t, 0],
                         &arg[p0 + t, 0], act, a)
        free(ybuf)
        free(gbuf)
        free(hbuf)
        free(lst)
    free(xg)
    if failed:
        raise MemoryError(f"conv_maxpool_forward: out of memory ({per * K2} rows of "
                          f"{max(cin, KC)} values)")
    return out_a, arg_a


def _fail_alloc(long nth):
    """Test hook: the nth scratch allocation from now in this module fails (0: none).
    Returns how many were still to go before this call (0: the last one set has failed)."""
    cdef long pending = scn_alloc_pending()
    scn_fail_alloc(nth)
    return pending
