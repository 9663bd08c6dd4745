"""Coordinate hashing and rulebooks (CPU).

A rulebook lists, for each of the K = f**d filter offsets, the (input row, output row) pairs:
``in_idx``/``out_idx`` (int32) in CSR layout by offset with ``offsets`` (int64, K + 1).
Offsets are numbered row-major over the window: k = ((i_0 f) + i_1) f + ...
Within one offset every output row (and every input row) appears at most once, which is what
lets the kernels scatter without atomics.
"""
from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport free
from libc.string cimport memcpy

import numpy as np

from ._alloc cimport scn_alloc_pending, scn_fail_alloc, scn_malloc
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
    and its pair counts zeroed (if lcount is not NULL); returns bits."""
    cdef int bits = _log2_capacity(n_in)
    cdef Py_ssize_t q
    if bits > max_bits:
        bits = max_bits
    for q in range(<Py_ssize_t>1 << bits):
        keys[q] = -1
    if lcount != NULL:
        for q in range(K):
            lcount[q] = 0
    return bits


cdef inline void _end_sample(const int64_t* lcount, int K, int64_t* count, Py_ssize_t P,
                             int64_t* n_pairs) noexcept nogil:
    """Publish a sample's pair counts (kept thread-private while it ran; if lcount is not
    NULL) and total."""
    cdef int k
    if lcount != NULL:
        for k in range(K):
            count[k] = lcount[k]
    n_pairs[0] = P


cdef inline int64_t _first_window(int64_t p, int64_t f, int64_t s, int sh) noexcept nogil:
    """The first window o with o*s <= p < o*s + f: ceil((p - f + 1) / s), at least 0 (in 64
    bits: p - f + s may pass 2**31)."""
    if p - f + 1 <= 0:
        return 0
    return (p - f + s) >> sh if sh >= 0 else (p - f + s) // s


cdef inline int64_t _last_window(int64_t p, int64_t s, int sh, int64_t n_out) noexcept nogil:
    """The last window o with o*s <= p (floor(p / s)), at most n_out - 1."""
    cdef int64_t o = p >> sh if sh >= 0 else p // s
    return o if o < n_out else n_out - 1


cdef Py_ssize_t _conv_sample_2d(const int32_t* coords, const int64_t* out_shape, int f, int s,
                                int sh, const int64_t* perm, Py_ssize_t a, Py_ssize_t b,
                                int max_bits, int64_t* keys, int32_t* vals, int64_t* okeys,
                                int32_t* ocoords, int32_t* lin, int32_t* lout, int32_t* lk,
                                int64_t* count, int64_t* lcount, int K,
                                int64_t* n_pairs) noexcept nogil:
    """_conv_sample for d == 2 (the common case): the same outputs, pairs and order, with the
    two candidate loops written out, so that everything stays in registers."""
    cdef int bits = _start_sample(b - a, max_bits, keys, lcount, K)
    cdef Py_ssize_t cap = <Py_ssize_t>1 << bits, mask = cap - 1, q, h, P = 0, i, nb = b - a
    cdef int shift = 64 - bits
    cdef int64_t H = out_shape[0], W = out_shape[1], key, rowkey, krow
    cdef int y, x, lo0, hi0, lo1, hi1, oy, ox, k, batch
    cdef int32_t n_out = 0, o
    for q in range(a, b):
        i = q if perm == NULL else perm[q]
        batch = coords[3 * i]
        y = coords[3 * i + 1]
        x = coords[3 * i + 2]
        lo0 = <int>_first_window(y, f, s, sh)
        hi0 = <int>_last_window(y, s, sh, H)
        lo1 = <int>_first_window(x, f, s, sh)
        hi1 = <int>_last_window(x, s, sh, W)
        for oy in range(lo0, hi0 + 1):
            rowkey = oy * W
            krow = (y - <int64_t>oy * s) * f + x     # 64 bits: x may be near 2**31
            for ox in range(lo1, hi1 + 1):
                key = rowkey + ox
                k = <int>(krow - <int64_t>ox * s)
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
                        ocoords[3 * <Py_ssize_t>o] = batch
                        ocoords[3 * <Py_ssize_t>o + 1] = oy
                        ocoords[3 * <Py_ssize_t>o + 2] = ox
                        n_out += 1
                        if 2 * n_out >= cap and bits < max_bits:
                            bits = _grow(keys, vals, okeys, n_out, bits)
                            cap = cap * 2
                            mask = cap - 1
                            shift = 64 - bits
                        break
                    h = (h + 1) & mask
                if lk == NULL:
                    h = k * nb + lcount[k]
                    lcount[k] += 1
                else:
                    h = P
                    lk[h] = k
                lin[h] = <int32_t>i
                lout[h] = o
                P += 1
    _end_sample(lcount, K, count, P, n_pairs)
    return n_out


cdef Py_ssize_t _conv_sample(const int32_t[:, ::1] coords, const int64_t* out_shape, int d,
                             int f, int s, int sh, const int64_t* perm, Py_ssize_t a,
                             Py_ssize_t b, int max_bits, int64_t* keys, int32_t* vals,
                             int64_t* okeys,
                             int32_t* ocoords, int32_t* lin, int32_t* lout, int32_t* lk,
                             int64_t* count, int64_t* lcount, int K,
                             int64_t* n_pairs) noexcept nogil:
    """Outputs and pairs of the inputs perm[a:b] (rows a:b if perm is NULL: one sample) with
    a private hash table of local keys (the output's row-major index within the sample);
    sh = log2(s) when s is a power of two (shifts instead of divisions), else -1.

    The table starts small and doubles at load 1/2 (at most 2**max_bits slots), so it stays
    in cache; candidate keys and offsets are updated incrementally along the odometer.
    Writes local output coords (in order of first appearance) to ocoords. Pairs: with lk
    NULL, those of offset k go to lin/lout[k * nb ...] (input row, local output; nb = b - a
    inputs, and an input has at most one pair per offset), so that they are already grouped
    by offset, and are counted per offset into count (K entries). The counting goes to a
    thread-private buffer lcount first: neighbouring samples' rows of count share cache
    lines, and another thread writing there on every pair made the counts a false-sharing
    hot spot. With lk not NULL (a window far larger than the pairs: see
    build_conv_rulebook), the pairs go to lin/lout/lk (offset) in the order they are found,
    and nothing is sized by K. Returns the number of outputs."""
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
            lo[j] = <int>_first_window(p, f, s, sh)
            hi[j] = <int>_last_window(p, s, sh, out_shape[j])
            if lo[j] > hi[j]:
                skip = 1
            cur[j] = lo[j]
            key += lo[j] * ostride[j]
            k += <int32_t>((p - <int64_t>lo[j] * s) * fstride[j])    # < f**d
        if skip:
            continue
        batch = coords[i, 0]
        while True:
            r = _get_or_insert(keys, vals, mask, shift, key, n_out)
            if r < 0:
                o = n_out
                okeys[o] = key
                ocoords[<Py_ssize_t>o * (d + 1)] = batch
                for j in range(d):
                    ocoords[<Py_ssize_t>o * (d + 1) + 1 + j] = cur[j]
                n_out += 1
                if 2 * n_out >= cap and bits < max_bits:    # grow: rehash the outputs
                    bits = _grow(keys, vals, okeys, n_out, bits)
                    cap = cap * 2
                    mask = cap - 1
                    shift = 64 - bits
            else:
                o = r
            if lk == NULL:
                h = k * nb + lcount[k]
                lcount[k] += 1
            else:
                h = P
                lk[h] = k
            lin[h] = <int32_t>i
            lout[h] = o
            P += 1
            # odometer over the candidate outputs, last dimension fastest (a second
            # candidate along j means s < f, so s * fstride[j] < f**d)
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


# The window table (rows x K) is kept only while it is not far larger than the pairs: at most
# WINDOW_SLACK entries per pair, or WINDOW_FLOOR entries in all (4 MiB). Otherwise the
# kernels work from the pair lists (sparsecnn._cpu._ops.window_of applies the same rule).
WINDOW_SLACK = 16
WINDOW_FLOOR = 2**20
# per-sample scratch of the grouped-by-offset layout: (n + samples) * K entries; beyond
# this and beyond 32 entries per possible pair, the pairs are sorted by offset instead
BY_OFFSET_FLOOR = 2**24
PAIRS_LIMIT = 2**31 - 1     # in_idx / out_idx and output rows are int32


def window_fits(n_rows, K, n_pairs) -> bool:
    """Whether a (n_rows, K) window table is worth building for n_pairs pairs."""
    return int(n_rows) * int(K) <= max(WINDOW_SLACK * int(n_pairs), WINDOW_FLOOR)


def pairs_bound(spatial_shape, filter_size, stride) -> int:
    """Most windows (f, s) that one site can lie in: prod over dimensions of
    min(ceil(f / s), output size)."""
    f, s = int(filter_size), int(stride)
    span = -(-f // s)
    bound = 1
    for n in spatial_shape:
        bound *= min(span, (int(n) - f) // s + 1)
    return bound


def build_conv_rulebook(const int32_t[:, ::1] coords, const int64_t[::1] spatial_shape,
                        int filter_size, int stride, *, bint window=False, by_offset=None):
    """Rulebook of a valid convolution / pooling window (f, s) over unique sites.

    Output site o is active iff some input site lies in its window [o*s, o*s + f)^d.
    coords : (n, 1 + d) int32, unique sites                      # IN
    spatial_shape : (d,) int64, input size; (N - f) % s == 0     # IN
    Returns out_coords (n_out, 1 + d) int32, in_idx, out_idx (P,) int32 and offsets (K + 1,)
    int64. Samples are independent, so each OpenMP task takes one sample (one batch index
    present; scratch is sized by the samples present, not by the largest batch index) with
    a small private hash table. Outputs are ordered by sample, then by first appearance
    while scanning that sample's inputs in order; pairs of offset k likewise: a
    deterministic order that does not depend on the number of threads.
    window : also return build_window's (n_out, K) table (a fifth element), filled while
             the pairs are placed, at less cost than a separate pass; None instead when
             it would be far larger than the pairs (window_fits).
    by_offset : None (choose), True or False (for tests): whether each sample writes its
             pairs grouped by offset (scratch (n + samples) * K: the fast layout for small
             windows) or in the order found, then stably sorted by offset (scratch by the
             pairs: large windows). Both give the same rulebook.
    Raises ValueError if f**d or the number of pairs does not fit int32, MemoryError if
    scratch cannot be allocated.
    """
    cdef Py_ssize_t n = coords.shape[0]
    cdef int d = coords.shape[1] - 1
    if filter_size < 1 or stride < 1:
        raise ValueError(f"filter_size and stride must be >= 1, got {filter_size}, {stride}")
    K_all = int(filter_size) ** d
    if K_all > PAIRS_LIMIT:
        raise ValueError(f"filter_size**dim = {filter_size}**{d} = {K_all} exceeds 2**31 - 1")
    bound = n * pairs_bound(np.asarray(spatial_shape), filter_size, stride)
    if bound > PAIRS_LIMIT:
        raise ValueError(f"filter_size={filter_size}, stride={stride} on {n} sites gives up "
                         f"to {bound} (input, output) pairs; at most 2**31 - 1 are supported")
    cdef int f = filter_size, s = stride, j, K = K_all
    cdef Py_ssize_t per_in = bound // n if n else 1
    cdef int64_t out_shape[MAX_DIM]
    for j in range(d):
        out_shape[j] = (spatial_shape[j] - f) // s + 1
    if n == 0:
        empty = (np.empty((0, 1 + d), np.int32), np.empty(0, np.int32), np.empty(0, np.int32),
                 np.zeros(K + 1, np.int64))
        return empty + (np.empty((0, K), np.int32),) if window else empty
    # the samples present: runs of one batch index. Usually the rows are grouped by sample
    # already (every geometry this library makes is); otherwise a stable sort by batch.
    cdef Py_ssize_t S = 0, bb, r0, q, biggest = 0, t, kk
    cdef bint grouped = True
    with nogil:
        for q in range(1, n):
            if coords[q, 0] < coords[q - 1, 0]:
                grouped = False
                break
    cdef int64_t* perm = NULL
    cdef const int64_t[::1] perm_v
    if not grouped:
        perm_a = np.argsort(np.asarray(coords)[:, 0], kind="stable").astype(np.int64)
        perm_v = perm_a
        perm = <int64_t*>&perm_v[0]
    bstart_a = np.empty(n + 1, dtype=np.int64)
    cdef int64_t[::1] bstart = bstart_a
    cdef int32_t prev = -1, cur_b
    with nogil:
        for q in range(n):
            cur_b = coords[q if perm == NULL else perm[q], 0]
            if cur_b != prev:
                bstart[S] = q
                S += 1
                prev = cur_b
        bstart[S] = n
        for bb in range(S):
            if (bstart[bb + 1] - bstart[bb]) * per_in > biggest:
                biggest = (bstart[bb + 1] - bstart[bb]) * per_in
    cdef bint grouped_pairs = (
        (int(n) + S) * K_all <= max(BY_OFFSET_FLOOR, 32 * int(n) * per_in)
        if by_offset is None else bool(by_offset))
    cdef Py_ssize_t KS = K if grouped_pairs else 0      # pair counts per (sample, offset)
    cdef Py_ssize_t slots = K if grouped_pairs else per_in     # pair slots per input
    # per sample: outputs, pairs, output base (S + 1), pair base (S + 1); then pair counts and
    # write positions (S x K each, grouped layout only)
    work_a = np.zeros(4 * S + 2 + 2 * S * KS, dtype=np.int64)
    cdef int64_t[::1] work = work_a
    cdef int64_t* nout = &work[0]
    cdef int64_t* npairs = nout + S
    cdef int64_t* obase = npairs + S
    cdef int64_t* pbase = obase + S + 1
    cdef int64_t* count = pbase + S + 1
    cdef int64_t* pos = count + S * KS
    cdef int cap_bits = _log2_capacity(biggest)
    cdef int sh = -1       # log2(s) if s is a power of two
    if s & (s - 1) == 0:
        sh = 0
        while (1 << sh) < s:
            sh += 1
    # Phase 1 (parallel over samples): sample b's outputs go to rows bstart[b] * per_in ...
    # of ocoords (a sample has at most per_in outputs per input), its pairs to
    # lpairs[:, bstart[b] * slots ...] (grouped: offset k at k * nb ..., at most one per
    # input; else in order, at most per_in per input). Then the global numbering, the
    # results at their exact sizes, and phase 2 moves each sample's runs to their places.
    ocoords_a = np.empty((n * per_in, 1 + d), dtype=np.int32)
    lpairs_a = np.empty((2 if grouped_pairs else 3, n * slots), dtype=np.int32)
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
    cdef int32_t* lk0 = NULL if grouped_pairs else &lpairs[2, 0]
    cdef int32_t* lkb
    cdef bint ok
    cdef int failed = 0
    cdef int* failp = &failed
    with nogil, parallel():
        # sized for the worst case; pages are touched only as far as a table grows
        keys = <int64_t*>scn_malloc((<Py_ssize_t>1 << cap_bits) * sizeof(int64_t))
        vals = <int32_t*>scn_malloc((<Py_ssize_t>1 << cap_bits) * sizeof(int32_t))
        okeys = <int64_t*>scn_malloc(biggest * sizeof(int64_t))
        lcount = NULL
        if grouped_pairs:
            lcount = <int64_t*>scn_malloc(K * sizeof(int64_t))
        ok = keys != NULL and vals != NULL and okeys != NULL and (
            lcount != NULL or not grouped_pairs)
        if not ok:
            failp[0] = 1
        for bb in prange(S, schedule='dynamic'):
            if not ok:
                continue
            r0 = bstart[bb] * per_in
            t = bstart[bb] * slots
            lkb = NULL if lk0 == NULL else lk0 + t
            if d == 2:
                nout[bb] = _conv_sample_2d(&coords[0, 0], out_shape, f, s, sh, perm, bstart[bb],
                                           bstart[bb + 1], cap_bits, keys, vals, okeys,
                                           ocp + r0 * (d + 1), lin0 + t, lout0 + t, lkb,
                                           count + bb * KS, lcount, K, &npairs[bb])
                continue
            nout[bb] = _conv_sample(coords, out_shape, d, f, s, sh, perm, bstart[bb],
                                    bstart[bb + 1], cap_bits, keys, vals, okeys,
                                    ocp + r0 * (d + 1), lin0 + t, lout0 + t, lkb,
                                    count + bb * KS, lcount, K, &npairs[bb])
        free(keys)
        free(vals)
        free(okeys)
        free(lcount)
    if failed:
        raise MemoryError(f"build_conv_rulebook: out of memory for the per-thread hash tables "
                          f"({(1 << cap_bits) * 12 + biggest * 8} bytes each)")
    if not grouped_pairs:
        return _sorted_rulebook(S, K, d, per_in, slots, &bstart[0], nout, npairs, obase, pbase,
                                ocp, lin0, lout0, lk0, window)
    # global numbering, then the result arrays at their exact sizes
    offsets_a = np.empty(K + 1, dtype=np.int64)
    cdef int64_t[::1] offsets = offsets_a
    _numbering(S, K, nout, count, obase, &offsets[0], pos)
    cdef Py_ssize_t n_out = obase[S], P = offsets[K]
    cdef bint want = window
    window = want and window_fits(n_out, K, P)
    out_coords_a = np.empty((n_out, 1 + d), dtype=np.int32)
    in_a = np.empty(P, dtype=np.int32)
    out_a = np.empty(P, dtype=np.int32)
    win_a = np.empty((n_out if window else 0, K), dtype=np.int32)
    res = out_coords_a, in_a, out_a, offsets_a
    if want:
        res = res + ((win_a if window else None),)
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
        for bb in prange(S, schedule='static'):
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


cdef _sorted_rulebook(Py_ssize_t S, int K, int d, Py_ssize_t per_in, Py_ssize_t slots,
                      const int64_t* bstart, const int64_t* nout, const int64_t* npairs,
                      int64_t* obase, int64_t* pbase, const int32_t* ocp, const int32_t* lin0,
                      const int32_t* lout0, const int32_t* lk0, bint window):
    """build_conv_rulebook's results from pairs listed per sample in the order found (with
    their offsets lk0): concatenated by sample, then stably sorted by offset, which is the
    grouped layout's order (by offset, then sample, then order found). Scratch by the pairs,
    and K + 1 offsets: nothing of size samples x K or inputs x K."""
    cdef Py_ssize_t bb, e, t, P
    obase[0] = 0
    pbase[0] = 0
    for bb in range(S):
        obase[bb + 1] = obase[bb] + nout[bb]
        pbase[bb + 1] = pbase[bb] + npairs[bb]
    cdef Py_ssize_t n_out = obase[S]
    P = pbase[S]
    out_coords_a = np.empty((n_out, 1 + d), dtype=np.int32)
    flat_a = np.empty((3, max(P, 1)), dtype=np.int32)
    cdef int32_t[:, ::1] out_coords = out_coords_a
    cdef int32_t[:, ::1] flat = flat_a
    cdef int32_t obase_b
    with nogil:
        for bb in prange(S, schedule='static'):
            obase_b = <int32_t>obase[bb]
            if nout[bb]:
                memcpy(&out_coords[obase_b, 0], ocp + bstart[bb] * per_in * (d + 1),
                       nout[bb] * (d + 1) * sizeof(int32_t))
            t = bstart[bb] * slots
            for e in range(npairs[bb]):
                flat[0, pbase[bb] + e] = lin0[t + e]
                flat[1, pbase[bb] + e] = lout0[t + e] + obase_b
                flat[2, pbase[bb] + e] = lk0[t + e]
    k_a = flat_a[2, :P]
    order = np.argsort(k_a, kind="stable")
    in_a = flat_a[0, :P][order]
    out_a = flat_a[1, :P][order]
    offsets_a = np.zeros(K + 1, dtype=np.int64)
    np.cumsum(np.bincount(k_a, minlength=K), out=offsets_a[1:])
    res = out_coords_a, in_a, out_a, offsets_a
    if window:
        res = res + (build_window(in_a, out_a, offsets_a, n_out)
                     if window_fits(n_out, K, P) else None,)
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
            if q0 == q1:        # the same for every thread
                continue
            for q in prange(q0, q1, schedule='static'):
                win[out_idx[q], k] = in_idx[q]
    return win_a


cdef inline int32_t _neighbour(const int32_t[:, ::1] coords, const int64_t* shape, int d,
                               int f, const int64_t* keys, const int32_t* vals,
                               Py_ssize_t mask, int shift, Py_ssize_t i, int k) noexcept nogil:
    """Row of the site at x_i - f//2 + offset_k, or -1 (none there, or outside the grid)."""
    cdef int32_t row[MAX_DIM + 1]
    cdef int j, kk = k, half = f // 2
    cdef int64_t c
    row[0] = coords[i, 0]
    for j in range(d - 1, -1, -1):
        c = <int64_t>coords[i, 1 + j] + kk % f - half     # 64 bits: near 2**31 with a big f
        kk = kk // f
        if c < 0 or c >= shape[j]:
            return -1
        row[1 + j] = <int32_t>c
    return _lookup(keys, vals, mask, shift, _pack(row, shape, d))


cdef void _neighbours(const int32_t[:, ::1] coords, const int64_t* shape, int d, int f, int K,
                      const int64_t* keys, const int32_t* vals, Py_ssize_t mask, int shift,
                      Py_ssize_t a, Py_ssize_t b, int32_t* nbr, int64_t* count) noexcept nogil:
    """nbr[(i - a) * K + k] = _neighbour(i, k); counts per k."""
    cdef int k
    cdef Py_ssize_t i
    cdef int32_t v
    for i in range(a, b):
        for k in range(K):
            v = _neighbour(coords, shape, d, f, keys, vals, mask, shift, i, k)
            nbr[(i - a) * K + k] = v
            if v >= 0:
                count[k] += 1


cdef Py_ssize_t _neighbour_pairs(const int32_t[:, ::1] coords, const int64_t* shape, int d,
                                 int f, int K, const int64_t* keys, const int32_t* vals,
                                 Py_ssize_t mask, int shift, Py_ssize_t a, Py_ssize_t b,
                                 int32_t* vin, int32_t* vout, int32_t* vk) noexcept nogil:
    """The pairs of outputs a <= i < b in order (i, then k) to vin/vout/vk (if vin is not
    NULL: else only counted); returns their number."""
    cdef int k
    cdef Py_ssize_t i, P = 0
    cdef int32_t v
    for i in range(a, b):
        for k in range(K):
            v = _neighbour(coords, shape, d, f, keys, vals, mask, shift, i, k)
            if v >= 0:
                if vin != NULL:
                    vin[P] = v
                    vout[P] = <int32_t>i
                    vk[P] = k
                P += 1
    return P


def build_submanifold_rulebook(const int32_t[:, ::1] coords, const int64_t[::1] spatial_shape,
                               const int64_t[::1] table_keys, const int32_t[::1] table_vals,
                               int filter_size, *, by_offset=None):
    """Rulebook of a submanifold convolution (f odd): outputs are the input sites.

    Pair (j, i) at offset k when site j sits at x_i - f//2 + offset_k (inside the grid).
    coords : (n, 1 + d) int32 unique sites; table_keys/table_vals: their hash    # IN
    Returns in_idx, out_idx (P,) int32 and offsets (K + 1,) int64; pairs of an offset are
    ordered by output row. Built in parallel: count per (chunk, k), prefix-sum, fill. With a
    large window (n * K above 2**24 and K above 128; or by_offset=False) the (n, K)
    neighbour table is not kept: pairs are counted per chunk, listed, and stably sorted by
    offset instead (the same rulebook, scratch by the pairs).
    """
    cdef Py_ssize_t n = coords.shape[0]
    cdef int d = coords.shape[1] - 1, f = filter_size, K, k
    K_all = int(filter_size) ** d
    if filter_size < 1 or K_all > PAIRS_LIMIT:
        raise ValueError(f"filter_size**dim = {filter_size}**{d} = {K_all} must be in "
                         f"[1, 2**31 - 1]")
    K = K_all
    cdef Py_ssize_t mask = table_keys.shape[0] - 1
    cdef int shift = 64 - (int(table_keys.shape[0]).bit_length() - 1)
    cdef Py_ssize_t nchunks = (n + CHUNK - 1) // CHUNK, c, a, b, i
    grouped = (int(n) * K <= max(BY_OFFSET_FLOOR, 128 * int(n)) if by_offset is None
               else bool(by_offset))
    if not grouped:
        return _sorted_submanifold(coords, spatial_shape, table_keys, table_vals, f, K)
    counts_a = np.zeros((max(nchunks, 1), K), dtype=np.int64)
    nbr_a = np.empty((max(n, 1), K), dtype=np.int32)
    cdef int64_t[:, ::1] counts = counts_a
    cdef int32_t[:, ::1] nbr = nbr_a
    with nogil:
        for c in prange(nchunks, schedule='static'):
            a = c * CHUNK
            b = min(a + CHUNK, n)
            _neighbours(coords, &spatial_shape[0], d, f, K, &table_keys[0], &table_vals[0],
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


cdef _sorted_submanifold(const int32_t[:, ::1] coords, const int64_t[::1] spatial_shape,
                         const int64_t[::1] table_keys, const int32_t[::1] table_vals, int f,
                         int K):
    """build_submanifold_rulebook for large windows: pairs counted per chunk, then listed by
    output (then offset) and stably sorted by offset (twice the lookups, scratch by pairs)."""
    cdef Py_ssize_t n = coords.shape[0], c, a
    cdef int d = coords.shape[1] - 1
    cdef Py_ssize_t mask = table_keys.shape[0] - 1
    cdef int shift = 64 - (int(table_keys.shape[0]).bit_length() - 1)
    cdef Py_ssize_t nchunks = (n + CHUNK - 1) // CHUNK
    base_a = np.zeros(nchunks + 1, dtype=np.int64)
    cdef int64_t[::1] base = base_a
    if n:
        with nogil:
            for c in prange(nchunks, schedule='static'):
                a = c * CHUNK
                base[c + 1] = _neighbour_pairs(coords, &spatial_shape[0], d, f, K,
                                               &table_keys[0], &table_vals[0], mask, shift, a,
                                               min(a + CHUNK, n), NULL, NULL, NULL)
    np.cumsum(base_a, out=base_a)
    cdef Py_ssize_t P = base_a[nchunks]
    flat_a = np.empty((3, max(P, 1)), dtype=np.int32)
    cdef int32_t[:, ::1] flat = flat_a
    cdef int32_t* vin = &flat[0, 0]
    cdef int32_t* vout = &flat[1, 0]
    cdef int32_t* vk = &flat[2, 0]
    if P:
        with nogil:
            for c in prange(nchunks, schedule='static'):
                a = c * CHUNK
                _neighbour_pairs(coords, &spatial_shape[0], d, f, K, &table_keys[0],
                                 &table_vals[0], mask, shift, a, min(a + CHUNK, n),
                                 vin + base[c], vout + base[c], vk + base[c])
    k_a = flat_a[2, :P]
    order = np.argsort(k_a, kind="stable")
    offsets_a = np.zeros(K + 1, dtype=np.int64)
    np.cumsum(np.bincount(k_a, minlength=K), out=offsets_a[1:])
    return flat_a[0, :P][order], flat_a[1, :P][order], offsets_a


def _fail_alloc(long nth):
    """Test hook: the nth scratch allocation from now in this module fails (0: none).
    Returns how many were still to go before this call (0: the last one set has failed)."""
    cdef long pending = scn_alloc_pending()
    scn_fail_alloc(nth)
    return pending
