"""Coordinate hashing and rulebooks (CPU).

A rulebook lists, for each of the K = f**d filter offsets, the (input row, output row) pairs:
``in_idx``/``out_idx`` (int32) in CSR layout by offset with ``offsets`` (int64, K + 1).
Offsets are numbered row-major over the window: k = ((i_0 f) + i_1) f + ...
Within one offset every output row (and every input row) appears at most once, which is what
lets the kernels scatter without atomics.
"""
from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

import numpy as np

from ._hash cimport _get_or_insert, _lookup, _pack, _slot
from ._omp cimport barrier

cdef enum:
    MAX_DIM = 8
    CHUNK = 1024


cdef inline int _log2_capacity(Py_ssize_t n) noexcept nogil:
    """log2 of the power-of-two table size for n keys at load <= 1/2 (at least 16 slots)."""
    cdef int bits = 4
    while (<Py_ssize_t>1 << bits) < 2 * n:
        bits += 1
    return bits


def build_hash(const int32_t[:, ::1] coords, const int64_t[::1] spatial_shape):
    """Hash the sites of a coordinate list; duplicates map to their first occurrence.

    coords : (n, 1 + d) int32 (batch, c_0, ..., c_{d-1})      # IN, range-checked by the caller
    spatial_shape : (d,) int64                                   # IN
    Returns table_keys (cap,) int64, table_vals (cap,) int32, inverse (n,) int32 (unique row of
    each input row, numbered in order of first occurrence) and n_unique.
    """
    cdef Py_ssize_t n = coords.shape[0], i
    cdef int d = coords.shape[1] - 1
    cdef int bits = _log2_capacity(n)
    cdef int shift = 64 - bits
    cdef Py_ssize_t cap = <Py_ssize_t>1 << bits, mask = cap - 1
    keys_a = np.full(cap, -1, dtype=np.int64)
    vals_a = np.empty(cap, dtype=np.int32)
    inv_a = np.empty(n, dtype=np.int32)
    cdef int64_t[::1] keys = keys_a
    cdef int32_t[::1] vals = vals_a
    cdef int32_t[::1] inv = inv_a
    cdef int32_t n_unique = 0, r
    if n == 0:
        return keys_a, vals_a, inv_a, 0
    with nogil:
        for i in range(n):
            r = _get_or_insert(&keys[0], &vals[0], mask, shift,
                               _pack(&coords[i, 0], &spatial_shape[0], d), n_unique)
            if r < 0:
                inv[i] = n_unique
                n_unique += 1
            else:
                inv[i] = r
    return keys_a, vals_a, inv_a, int(n_unique)


cdef int _grow(int64_t* keys, int32_t* vals, const int64_t* okeys, int32_t n_out,
               int bits) noexcept nogil:
    """Double a table of 2**bits slots holding the n_out keys okeys (values 0..n_out-1) and
    re-insert them; returns the new bits."""
    cdef Py_ssize_t h, cap = <Py_ssize_t>1 << (bits + 1)
    for h in range(cap):
        keys[h] = -1
    for h in range(n_out):
        _get_or_insert(keys, vals, cap - 1, 63 - bits, okeys[h], <int32_t>h)
    return bits + 1


cdef int _start_sample(Py_ssize_t n_in, int max_bits, int64_t* keys, int64_t* lcount,
                       int K) noexcept nogil:
    """A sample's private table for n_in inputs (2**bits slots, at most 2**max_bits) cleared,
    and its pair counts zeroed; returns bits."""
    cdef int bits = _log2_capacity(n_in)
    cdef Py_ssize_t q
    if bits > max_bits:
        bits = max_bits
    for q in range(<Py_ssize_t>1 << bits):
        keys[q] = -1
    for q in range(K):
        lcount[q] = 0
    return bits


cdef inline void _end_sample(const int64_t* lcount, int K, int64_t* count, Py_ssize_t P,
                             int64_t* n_pairs) noexcept nogil:
    """Publish a sample's pair counts (kept thread-private while it ran) and total."""
    cdef int k
    for k in range(K):
        count[k] = lcount[k]
    n_pairs[0] = P


cdef Py_ssize_t _conv_sample_2d(const int32_t* coords, const int64_t* out_shape, int f, int s,
                                int sh, const int64_t* perm, Py_ssize_t a, Py_ssize_t b,
                                int max_bits, int64_t* keys, int32_t* vals, int64_t* okeys,
                                int32_t* ocoords, int32_t* lin, int32_t* lout,
                                int64_t* count, int64_t* lcount, int K,
                                int64_t* n_pairs) noexcept nogil:
    """_conv_sample for d == 2 (the common case): the same outputs, pairs and order, with the
    two candidate loops written out, so that everything stays in registers."""
    cdef int bits = _start_sample(b - a, max_bits, keys, lcount, K)
    cdef Py_ssize_t cap = <Py_ssize_t>1 << bits, mask = cap - 1, q, h, P = 0, i, nb = b - a
    cdef int shift = 64 - bits
    cdef int64_t H = out_shape[0], W = out_shape[1], key, rowkey
    cdef int y, x, lo0, hi0, lo1, hi1, oy, ox, k, krow, batch
    cdef int32_t n_out = 0, o
    for q in range(a, b):
        i = q if perm == NULL else perm[q]
        batch = coords[3 * i]
        y = coords[3 * i + 1]
        x = coords[3 * i + 2]
        if sh >= 0:
            lo0 = 0 if y - f + 1 <= 0 else (y - f + s) >> sh
            hi0 = y >> sh
            lo1 = 0 if x - f + 1 <= 0 else (x - f + s) >> sh
            hi1 = x >> sh
        else:
            lo0 = 0 if y - f + 1 <= 0 else (y - f + s) // s
            hi0 = y // s
            lo1 = 0 if x - f + 1 <= 0 else (x - f + s) // s
            hi1 = x // s
        if hi0 > H - 1:
            hi0 = <int>H - 1
        if hi1 > W - 1:
            hi1 = <int>W - 1
        for oy in range(lo0, hi0 + 1):
            rowkey = oy * W
            krow = (y - oy * s) * f + x
            for ox in range(lo1, hi1 + 1):
                key = rowkey + ox
                k = krow - ox * s
                h = _slot(key, shift)
                while True:
                    if keys[h] == key:
                        o = vals[h]
                        break
                    if keys[h] == -1:
                        o = n_out
                        keys[h] = key
                        vals[h] = o
                        okeys[o] = key
                        ocoords[3 * o] = batch
                        ocoords[3 * o + 1] = oy
                        ocoords[3 * o + 2] = ox
                        n_out += 1
                        if 2 * n_out >= cap and bits < max_bits:
                            bits = _grow(keys, vals, okeys, n_out, bits)
                            cap = cap * 2
                            mask = cap - 1
                            shift = 64 - bits
                        break
                    h = (h + 1) & mask
                h = k * nb + lcount[k]
                lin[h] = <int32_t>i
                lout[h] = o
                lcount[k] += 1
                P += 1
    _end_sample(lcount, K, count, P, n_pairs)
    return n_out


cdef Py_ssize_t _conv_sample(const int32_t[:, ::1] coords, const int64_t* out_shape, int d,
                             int f, int s, int sh, const int64_t* perm, Py_ssize_t a,
                             Py_ssize_t b, int max_bits, int64_t* keys, int32_t* vals,
                             int64_t* okeys,
                             int32_t* ocoords, int32_t* lin, int32_t* lout,
                             int64_t* count, int64_t* lcount, int K,
                             int64_t* n_pairs) noexcept nogil:
    """Outputs and pairs of the inputs perm[a:b] (rows a:b if perm is NULL: one sample) with
    a private hash table of local keys (the output's row-major index within the sample);
    sh = log2(s) when s is a power of two (shifts instead of divisions), else -1.

    The table starts small and doubles at load 1/2 (at most 2**max_bits slots), so it stays
    in cache; candidate keys and offsets are updated incrementally along the odometer.
    Writes local output coords (in order of first appearance) to ocoords, and the pairs of
    offset k to lin/lout[k * nb ...] (input row, local output; nb = b - a inputs, and an
    input has at most one pair per offset), so that they are already grouped by offset;
    counts pairs per offset into count (K entries). The counting goes to a thread-private
    buffer lcount first: neighbouring samples' rows of count share cache lines, and another
    thread writing there on every pair made the counts a false-sharing hot spot. Returns
    the number of outputs."""
    cdef int bits = _start_sample(b - a, max_bits, keys, lcount, K)
    cdef Py_ssize_t cap = <Py_ssize_t>1 << bits, mask = cap - 1, q, P = 0, h, nb = b - a
    cdef int shift = 64 - bits, j, p, skip
    cdef int lo[MAX_DIM]
    cdef int hi[MAX_DIM]
    cdef int cur[MAX_DIM]
    cdef int64_t ostride[MAX_DIM]
    cdef int fstride[MAX_DIM]
    cdef int32_t n_out = 0, r, o, batch, k
    cdef int64_t i, key
    ostride[d - 1] = 1
    fstride[d - 1] = 1
    for j in range(d - 2, -1, -1):
        ostride[j] = ostride[j + 1] * out_shape[j + 1]
        fstride[j] = fstride[j + 1] * f
    for q in range(a, b):
        i = q if perm == NULL else perm[q]
        skip = 0
        key = 0
        k = 0
        for j in range(d):
            p = coords[i, 1 + j]
            # o*s <= p < o*s + f  <=>  ceil((p - f + 1) / s) <= o <= floor(p / s)
            if sh >= 0:      # s a power of two: shifts, not divisions
                lo[j] = 0 if p - f + 1 <= 0 else (p - f + s) >> sh
                hi[j] = p >> sh
            else:
                lo[j] = 0 if p - f + 1 <= 0 else (p - f + s) // s
                hi[j] = p // s
            if hi[j] > out_shape[j] - 1:
                hi[j] = <int>out_shape[j] - 1
            if lo[j] > hi[j]:
                skip = 1
            cur[j] = lo[j]
            key += lo[j] * ostride[j]
            k += (p - lo[j] * s) * fstride[j]
        if skip:
            continue
        batch = coords[i, 0]
        while True:
            r = _get_or_insert(keys, vals, mask, shift, key, n_out)
            if r < 0:
                o = n_out
                okeys[o] = key
                ocoords[o * (d + 1)] = batch
                for j in range(d):
                    ocoords[o * (d + 1) + 1 + j] = cur[j]
                n_out += 1
                if 2 * n_out >= cap and bits < max_bits:    # grow: rehash the outputs
                    bits = _grow(keys, vals, okeys, n_out, bits)
                    cap = cap * 2
                    mask = cap - 1
                    shift = 64 - bits
            else:
                o = r
            h = k * nb + lcount[k]
            lin[h] = <int32_t>i
            lout[h] = o
            lcount[k] += 1
            P += 1
            # odometer over the candidate outputs, last dimension fastest
            j = d - 1
            while j >= 0:
                if cur[j] < hi[j]:
                    cur[j] += 1
                    key += ostride[j]
                    k -= s * fstride[j]
                    break
                key -= (cur[j] - lo[j]) * ostride[j]
                k += (cur[j] - lo[j]) * s * fstride[j]
                cur[j] = lo[j]
                j -= 1
            if j < 0:
                break
    _end_sample(lcount, K, count, P, n_pairs)
    return n_out


cdef void _numbering(Py_ssize_t B, int K, const int64_t* nout, const int64_t* count,
                     int64_t* obase, int64_t* offsets, int64_t* pos) noexcept nogil:
    """Global numbering from per-sample results: obase (B + 1) numbers the outputs by sample;
    offsets (K + 1) is the CSR of pairs by offset; pos[b, k] is where sample b's first pair
    of offset k goes (pairs by offset, then by sample)."""
    cdef Py_ssize_t bb
    cdef int k
    obase[0] = 0
    for bb in range(B):
        obase[bb + 1] = obase[bb] + nout[bb]
    offsets[0] = 0
    for k in range(K):
        offsets[k + 1] = offsets[k]
        for bb in range(B):
            pos[bb * K + k] = offsets[k + 1]
            offsets[k + 1] += count[bb * K + k]


def build_conv_rulebook(const int32_t[:, ::1] coords, const int64_t[::1] spatial_shape,
                        int filter_size, int stride, *, bint window=False):
    """Rulebook of a valid convolution / pooling window (f, s) over unique sites.

    Output site o is active iff some input site lies in its window [o*s, o*s + f)^d.
    coords : (n, 1 + d) int32, unique sites                      # IN
    spatial_shape : (d,) int64, input size; (N - f) % s == 0     # IN
    Returns out_coords (n_out, 1 + d) int32, in_idx, out_idx (P,) int32 and offsets (K + 1,)
    int64. Samples are independent, so each OpenMP task takes one sample with a small
    private hash table. Outputs are ordered by sample, then by first appearance while
    scanning that sample's inputs in order; pairs of offset k likewise: a deterministic order
    that does not depend on the number of threads.
    window : also return build_window's (n_out, K) table (a fifth element), filled while
             the pairs are placed, at less cost than a separate pass.
    """
    cdef Py_ssize_t n = coords.shape[0]
    cdef int d = coords.shape[1] - 1
    cdef int f = filter_size, s = stride, j, K = 1, span = (filter_size + stride - 1) // stride
    cdef Py_ssize_t per_in = 1
    cdef int64_t out_shape[MAX_DIM]
    for j in range(d):
        K *= f
        per_in *= span
        out_shape[j] = (spatial_shape[j] - f) // s + 1
    if n == 0:
        empty = (np.empty((0, 1 + d), np.int32), np.empty(0, np.int32), np.empty(0, np.int32),
                 np.zeros(K + 1, np.int64))
        return empty + (np.empty((0, K), np.int32),) if window else empty
    # group the rows by sample: usually they already are (every geometry this library
    # makes is ordered by sample); otherwise a stable counting sort
    cdef Py_ssize_t B = 0, bb, r0, q, biggest = 0, t, kk
    cdef bint grouped = True
    with nogil:
        for q in range(n):
            if coords[q, 0] >= B:
                B = coords[q, 0] + 1
            if q and coords[q, 0] < coords[q - 1, 0]:
                grouped = False
    # per sample: start row (B + 1), outputs, pairs, output base (B + 1); then pair counts and
    # write positions (B x K each)
    work_a = np.zeros(5 * B + 2 + 2 * B * K, dtype=np.int64)
    cdef int64_t[::1] work = work_a
    cdef int64_t* bstart = &work[0]
    cdef int64_t* nout = bstart + B + 1
    cdef int64_t* npairs = nout + B
    cdef int64_t* obase = nout + 2 * B
    cdef int64_t* count = obase + B + 1
    cdef int64_t* pos = count + B * K
    cdef int64_t* perm = NULL
    with nogil:
        for q in range(n):
            bstart[coords[q, 0] + 1] += 1
        for bb in range(B):
            if bstart[bb + 1] * per_in > biggest:
                biggest = bstart[bb + 1] * per_in
            bstart[bb + 1] += bstart[bb]
        if not grouped:
            perm = <int64_t*>malloc(n * sizeof(int64_t))
            for bb in range(B):      # npairs doubles as the fill pointer here
                npairs[bb] = bstart[bb]
            for q in range(n):
                perm[npairs[coords[q, 0]]] = q
                npairs[coords[q, 0]] += 1
    cdef int cap_bits = _log2_capacity(biggest)
    cdef int sh = -1       # log2(s) if s is a power of two
    if s & (s - 1) == 0:
        sh = 0
        while (1 << sh) < s:
            sh += 1
    # Phase 1 (parallel over samples): sample b's outputs go to rows bstart[b] * per_in ...
    # of ocoords (a sample has at most per_in outputs per input), its pairs of offset k to
    # lpairs[:, bstart[b] * K + k * nb ...] (at most one per input). Then the global
    # numbering (serial, B x K), the results at their exact sizes, and phase 2 (parallel
    # over samples) moves each sample's runs to their global places.
    ocoords_a = np.empty((n * per_in, 1 + d), dtype=np.int32)
    lpairs_a = np.empty((2, n * K), dtype=np.int32)   # per sample and offset, at most nb each
    cdef int32_t[:, ::1] ocoords = ocoords_a
    cdef int32_t[:, ::1] lpairs = lpairs_a
    cdef int64_t* keys
    cdef int32_t* vals
    cdef int64_t* okeys
    cdef int64_t* lcount
    cdef const int32_t* src_in
    cdef const int32_t* src_out
    cdef int32_t obase_b
    cdef Py_ssize_t nb, e
    # raw pointers (n > 0, so no array is empty): runs of a sample may end at the very end
    cdef int32_t* ocp = &ocoords[0, 0]
    cdef int32_t* lin0 = &lpairs[0, 0]
    cdef int32_t* lout0 = &lpairs[1, 0]
    with nogil, parallel():
        # sized for the worst case; pages are touched only as far as a table grows
        keys = <int64_t*>malloc((<Py_ssize_t>1 << cap_bits) * sizeof(int64_t))
        vals = <int32_t*>malloc((<Py_ssize_t>1 << cap_bits) * sizeof(int32_t))
        okeys = <int64_t*>malloc(max(biggest, 1) * sizeof(int64_t))
        lcount = <int64_t*>malloc(K * sizeof(int64_t))
        for bb in prange(B, schedule='dynamic'):
            r0 = bstart[bb] * per_in
            t = bstart[bb] * K
            if d == 2:
                nout[bb] = _conv_sample_2d(&coords[0, 0], out_shape, f, s, sh, perm, bstart[bb],
                                           bstart[bb + 1], cap_bits, keys, vals, okeys,
                                           ocp + r0 * (d + 1), lin0 + t, lout0 + t,
                                           count + bb * K, lcount, K, &npairs[bb])
                continue
            nout[bb] = _conv_sample(coords, out_shape, d, f, s, sh, perm, bstart[bb],
                                    bstart[bb + 1], cap_bits, keys, vals, okeys,
                                    ocp + r0 * (d + 1), lin0 + t, lout0 + t,
                                    count + bb * K, lcount, K, &npairs[bb])
        free(keys)
        free(vals)
        free(okeys)
        free(lcount)
    free(perm)
    # global numbering, then the result arrays at their exact sizes
    offsets_a = np.empty(K + 1, dtype=np.int64)
    cdef int64_t[::1] offsets = offsets_a
    _numbering(B, K, nout, count, obase, &offsets[0], pos)
    cdef Py_ssize_t n_out = obase[B], P = offsets[K]
    out_coords_a = np.empty((n_out, 1 + d), dtype=np.int32)
    in_a = np.empty(P, dtype=np.int32)
    out_a = np.empty(P, dtype=np.int32)
    win_a = np.empty((n_out if window else 0, K), dtype=np.int32)
    res = out_coords_a, in_a, out_a, offsets_a
    if window:
        res = res + (win_a,)
    if n_out == 0:
        return res
    cdef int32_t[:, ::1] out_coords = out_coords_a
    cdef int32_t[::1] in_idx = in_a
    cdef int32_t[::1] out_idx = out_a
    cdef int32_t[:, ::1] win = win_a
    cdef int32_t* outcp = &out_coords[0, 0]
    cdef int32_t* inp = &in_idx[0]          # P >= n_out > 0
    cdef int32_t* outp = &out_idx[0]
    cdef int32_t* winp = &win[0, 0] if window else NULL
    cdef int32_t* wrow
    # each sample's outputs and its pairs of each offset go to their global places as
    # contiguous runs (local output numbers shifted by the sample's first output)
    with nogil:
        for bb in prange(B, schedule='static'):
            r0 = bstart[bb] * per_in
            obase_b = <int32_t>obase[bb]
            memcpy(outcp + <Py_ssize_t>obase_b * (d + 1), ocp + r0 * (d + 1),
                   nout[bb] * (d + 1) * sizeof(int32_t))
            nb = bstart[bb + 1] - bstart[bb]
            if window:
                wrow = winp + <Py_ssize_t>obase_b * K     # this sample's rows of the table
                for e in range(nout[bb] * K):
                    wrow[e] = -1
                for kk in range(K):
                    src_in = lin0 + bstart[bb] * K + kk * nb
                    src_out = lout0 + bstart[bb] * K + kk * nb
                    for e in range(count[bb * K + kk]):
                        wrow[<Py_ssize_t>src_out[e] * K + kk] = src_in[e]
            for kk in range(K):
                t = pos[bb * K + kk]
                src_in = lin0 + bstart[bb] * K + kk * nb
                src_out = lout0 + bstart[bb] * K + kk * nb
                memcpy(inp + t, src_in, count[bb * K + kk] * sizeof(int32_t))
                for e in range(count[bb * K + kk]):
                    outp[t + e] = src_out[e] + obase_b
    return res


def build_window(const int32_t[::1] in_idx, const int32_t[::1] out_idx,
                 const int64_t[::1] offsets, Py_ssize_t n_out):
    """The rulebook grouped by output: window[o, k] = the input row paired with output o at
    offset k, or -1 (that window position is inactive).

    in_idx, out_idx : (P,) int32; offsets : (K + 1,) int64     # IN, a rulebook
    Returns window (n_out, K) int32. Kernels that reduce over a window (pooling, convolution
    forward) then work output by output: no scatter, no barrier per offset. With in_idx and
    out_idx swapped (and n_in) it groups the pairs by input (convolution backward).
    """
    cdef Py_ssize_t K = offsets.shape[0] - 1, o, q, k, kk, q0, q1
    win_a = np.empty((n_out, K), dtype=np.int32)
    cdef int32_t[:, ::1] win = win_a
    if n_out == 0 or K == 0:
        return win_a
    with nogil, parallel():
        for o in prange(n_out, schedule='static'):
            for kk in range(K):
                win[o, kk] = -1
        barrier()
        for k in range(K):      # every pair has its own slot: no races, no barrier needed
            q0 = offsets[k]
            q1 = offsets[k + 1]
            for q in prange(q0, q1, schedule='static'):
                win[out_idx[q], k] = in_idx[q]
    return win_a


cdef void _neighbours(const int32_t[:, ::1] coords, const int64_t* shape, int d, int f,
                      const int64_t* keys, const int32_t* vals, Py_ssize_t mask, int shift,
                      Py_ssize_t a, Py_ssize_t b, int32_t* nbr, int64_t* count) noexcept nogil:
    """nbr[(i - a) * K + k] = row of the site at x_i - f//2 + offset_k, or -1; counts per k."""
    cdef int K = 1, j, k, kk, c, half = f // 2, outside
    cdef int32_t row[MAX_DIM + 1]
    cdef Py_ssize_t i
    cdef int32_t v
    for j in range(d):
        K *= f
    for i in range(a, b):
        row[0] = coords[i, 0]
        for k in range(K):
            kk = k
            outside = 0
            for j in range(d - 1, -1, -1):
                c = coords[i, 1 + j] + kk % f - half
                kk = kk // f
                if c < 0 or c >= shape[j]:
                    outside = 1
                row[1 + j] = c
            v = -1
            if not outside:
                v = _lookup(keys, vals, mask, shift, _pack(row, shape, d))
            nbr[(i - a) * K + k] = v
            if v >= 0:
                count[k] += 1


def build_submanifold_rulebook(const int32_t[:, ::1] coords, const int64_t[::1] spatial_shape,
                               const int64_t[::1] table_keys, const int32_t[::1] table_vals,
                               int filter_size):
    """Rulebook of a submanifold convolution (f odd): outputs are the input sites.

    Pair (j, i) at offset k when site j sits at x_i - f//2 + offset_k (inside the grid).
    coords : (n, 1 + d) int32 unique sites; table_keys/table_vals: their hash    # IN
    Returns in_idx, out_idx (P,) int32 and offsets (K + 1,) int64; pairs of an offset are
    ordered by output row. Built in parallel: count per (chunk, k), prefix-sum, fill.
    """
    cdef Py_ssize_t n = coords.shape[0]
    cdef int d = coords.shape[1] - 1, f = filter_size, K = 1, j, k
    for j in range(d):
        K *= f
    cdef Py_ssize_t mask = table_keys.shape[0] - 1
    cdef int shift = 64 - (int(table_keys.shape[0]).bit_length() - 1)
    cdef Py_ssize_t nchunks = (n + CHUNK - 1) // CHUNK, c, a, b, i
    counts_a = np.zeros((max(nchunks, 1), K), dtype=np.int64)
    nbr_a = np.empty((max(n, 1), K), dtype=np.int32)
    cdef int64_t[:, ::1] counts = counts_a
    cdef int32_t[:, ::1] nbr = nbr_a
    with nogil:
        for c in prange(nchunks, schedule='static'):
            a = c * CHUNK
            b = min(a + CHUNK, n)
            _neighbours(coords, &spatial_shape[0], d, f, &table_keys[0], &table_vals[0],
                        mask, shift, a, b, &nbr[a, 0], &counts[c, 0])
    per_k = counts_a.sum(axis=0)
    offsets_a = np.zeros(K + 1, dtype=np.int64)
    np.cumsum(per_k, out=offsets_a[1:])
    # start of chunk c's pairs for offset k: offsets[k] + sum of counts of earlier chunks
    start_a = offsets_a[:K][None, :] + np.cumsum(counts_a, axis=0) - counts_a
    cdef int64_t[:, ::1] start = np.ascontiguousarray(start_a)
    cdef Py_ssize_t P = offsets_a[K]
    in_a = np.empty(P, dtype=np.int32)
    out_a = np.empty(P, dtype=np.int32)
    cdef int32_t[::1] in_idx = in_a
    cdef int32_t[::1] out_idx = out_a
    cdef int64_t t
    cdef int32_t v
    if P:
        with nogil, parallel():
            for c in prange(nchunks, schedule='static'):
                for k in range(K):
                    t = start[c, k]
                    for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
                        v = nbr[i, k]
                        if v >= 0:
                            in_idx[t] = v
                            out_idx[t] = <int32_t>i
                            t = t + 1
    return in_a, out_a, offsets_a
