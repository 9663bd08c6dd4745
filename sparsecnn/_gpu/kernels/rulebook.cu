// Geometry on the device: the coordinate hash's final table and the convolution and
// submanifold rulebooks, in exactly the order of sparsecnn._cpu._rulebook.
//
// Keys are the CPU's: the row-major packing of (batch, c_0, ..., c_{d-1}) over
// (batch_size, *shape) into an int64 (the caller checks that it cannot overflow), tables of
// power-of-two capacity 2**bits with -1 = empty, slot = (key * 0x9E3779B97F4A7C15) >> (64 - bits)
// (Fibonacci hashing) and linear probing. The wrappers are sparsecnn/_gpu/_geometry.py.
//
// build_hash (with hash.cu, used unchanged):
//   hash.cu's scnn_hash_insert / _first_flags / _number dedupe the rows in a scratch table
//   (which slot a key lands in there depends on the thread order; the first row of each key,
//   its rank and inverse[] do not). Then, here:
//   scnn_rb_hash_unique_keys  ukeys[u] = key of the u-th distinct site (u = first-occurrence rank)
//   scnn_rb_hash_place        ordered linear probing on priorities: each thread carries a u,
//                             at each slot old = atomicMin(occ[h], carried); an empty slot ends
//                             the walk, a larger old is displaced and carried on, a smaller one
//                             is passed; always on to h + 1. Slot contents only decrease, so at
//                             the end every u sits at the first slot from its home slot not held
//                             by a smaller u: the table the CPU gets by inserting the distinct
//                             keys one after the other in first-occurrence order, whatever the
//                             thread order (the same keys[] and vals[] as the CPU, slot by slot).
//   scnn_rb_hash_fill         keys[h] = ukeys[occ[h]], vals[h] = occ[h] (empty: -1, -1).
//
// build_conv_rulebook (one thread per generator t = p * per_in + c: input p of the rows in
// stable order by sample (perm), candidate output c of its window in the CPU's odometer order,
// last dimension fastest; span = ceil(f / s) candidates per dimension):
//   scnn_rb_conv_insert   valid candidates insert their global output key (64-bit atomicCAS)
//                         and take atomicMin(gmin[slot], t): the first appearance wins;
//                         slot_of[t] (-1: no such candidate), has_pair[p, k] = 1.
//   scnn_rb_conv_flags    flag[t] = t is its output's first appearance; the wrapper scans it
//                         (rank = the output's number: by sample, then first appearance, as
//                         the CPU) and has_pair (column-wise: place of the pair within offset k,
//                         pairs by offset, then by sample and input, as the CPU).
//   scnn_rb_conv_emit     out_coords, in_idx, out_idx (and the (n_out, K) window).
//
// build_submanifold_rulebook (one thread per (row i, offset k)):
//   scnn_rb_sub_lookup    nbr[i, k] = row of the site at x_i - f//2 + offset_k, or -1.
//   scnn_rb_sub_emit      after the column-wise scan of nbr >= 0: pairs of offset k by row i.
//
// No float atomics; every result is independent of the thread and block order.
// Portable subset of sparsecnn/_gpu/cuda_sim.h (the CPU simulation runs this file too).

#define SCNN_RB_EMPTY (-1LL)
#define SCNN_RB_FREE 0x7fffffff
#define SCNN_RB_MAX_DIM 8

__device__ __forceinline__ long long scnn_rb_slot(long long key, int shift) {
    return (long long)(((unsigned long long)key * 0x9E3779B97F4A7C15ULL) >> shift);
}

__device__ __forceinline__ long long scnn_rb_thread() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long scnn_rb_pack(const int* row, const long long* shape, int d) {
    long long key = row[0];
    for (int j = 0; j < d; ++j) key = key * shape[j] + row[1 + j];
    return key;
}

// ---------------------------------------------------------------------------- build_hash

extern "C" __global__ void scnn_rb_hash_unique_keys(const int* __restrict__ coords, int n, int d,
                                                    const long long* __restrict__ spatial_shape,
                                                    const int* __restrict__ flag,
                                                    const int* __restrict__ rank,
                                                    long long* __restrict__ ukeys) {
    const long long i = scnn_rb_thread();
    if (i >= n || !flag[i]) return;
    ukeys[rank[i]] = scnn_rb_pack(coords + i * (d + 1), spatial_shape, d);
}

extern "C" __global__ void scnn_rb_hash_place(const long long* __restrict__ ukeys,
                                              const int* __restrict__ flag,
                                              const int* __restrict__ rank, int n,
                                              long long capacity, int shift, int* occ) {
    const long long i = scnn_rb_thread();
    if (i >= n || !flag[i]) return;
    const long long mask = capacity - 1;
    int carried = rank[i];
    long long h = scnn_rb_slot(ukeys[carried], shift);
    // at load <= 1/2 a walk ends long before this bound; it only rules out an endless loop
    for (long long step = 0; step < 4 * capacity; ++step) {
        const int old = atomicMin(occ + h, carried);
        if (old == SCNN_RB_FREE) return;
        if (old > carried) carried = old;   // displaced: it goes on from the next slot
        h = (h + 1) & mask;
    }
}

extern "C" __global__ void scnn_rb_hash_fill(const int* __restrict__ occ,
                                             const long long* __restrict__ ukeys,
                                             long long capacity, long long* __restrict__ keys,
                                             int* __restrict__ vals) {
    const long long h = scnn_rb_thread();
    if (h >= capacity) return;
    const int u = occ[h];
    keys[h] = u == SCNN_RB_FREE ? SCNN_RB_EMPTY : ukeys[u];
    vals[h] = u == SCNN_RB_FREE ? -1 : u;
}

// ---------------------------------------------------------------------------- conv rulebook

// Candidate c of the input site `row`: output coordinates o[], offset k and the packed global
// output key; false when the candidate lies outside the output grid or the window misses it.
// o*s <= x < o*s + f  <=>  ceil((x - f + 1) / s) <= o <= floor(x / s), clipped to the grid.
__device__ __forceinline__ bool scnn_rb_candidate(const int* row, int d,
                                                  const long long* shape, int f, int s,
                                                  int span, int c, int* o, int* k,
                                                  long long* key) {
    int digit[SCNN_RB_MAX_DIM];
    for (int j = d - 1; j >= 0; --j) {
        digit[j] = c % span;
        c /= span;
    }
    long long kk = 0, packed = row[0];
    for (int j = 0; j < d; ++j) {
        const int x = row[1 + j];
        const long long out_n = (shape[j] - f) / s + 1;
        const long long lo = x - f + 1 <= 0 ? 0 : ((long long)x - f + s) / s;
        long long hi = x / s;
        if (hi > out_n - 1) hi = out_n - 1;
        const long long oj = lo + digit[j];
        if (oj > hi) return false;
        o[j] = (int)oj;
        packed = packed * out_n + oj;
        kk = kk * f + (x - oj * s);
    }
    *k = (int)kk;
    *key = packed;
    return true;
}

extern "C" __global__ void scnn_rb_conv_insert(const int* __restrict__ coords,
                                               const long long* __restrict__ perm, int n, int d,
                                               const long long* __restrict__ spatial_shape,
                                               int f, int s, int span, int per_in, int K,
                                               long long* keys, long long capacity, int shift,
                                               int* gmin, int* __restrict__ slot_of,
                                               int* __restrict__ has_pair) {
    const long long t = scnn_rb_thread();
    if (t >= (long long)n * per_in) return;
    const long long p = t / per_in;
    const int c = (int)(t - p * per_in);
    const int* row = coords + perm[p] * (d + 1);
    int o[SCNN_RB_MAX_DIM];
    int k;
    long long key;
    if (!scnn_rb_candidate(row, d, spatial_shape, f, s, span, c, o, &k, &key)) {
        slot_of[t] = -1;
        return;
    }
    const long long mask = capacity - 1;
    long long h = scnn_rb_slot(key, shift);
    // capacity >= 2 * n * per_in: there is always a free slot, the bound is never reached
    for (long long probe = 0; probe < capacity; ++probe) {
        const unsigned long long prev =
            atomicCAS(reinterpret_cast<unsigned long long*>(keys + h),
                      (unsigned long long)SCNN_RB_EMPTY, (unsigned long long)key);
        if (prev == (unsigned long long)SCNN_RB_EMPTY || prev == (unsigned long long)key) break;
        h = (h + 1) & mask;
    }
    atomicMin(gmin + h, (int)t);
    slot_of[t] = (int)h;
    has_pair[p * K + k] = 1;   // an input has at most one pair per offset
}

extern "C" __global__ void scnn_rb_conv_flags(const int* __restrict__ slot_of,
                                              const int* __restrict__ gmin, long long n_gen,
                                              int* __restrict__ flag) {
    const long long t = scnn_rb_thread();
    if (t >= n_gen) return;
    const int h = slot_of[t];
    flag[t] = h >= 0 && gmin[h] == t ? 1 : 0;
}

extern "C" __global__ void scnn_rb_conv_emit(const int* __restrict__ coords,
                                             const long long* __restrict__ perm, int n, int d,
                                             const long long* __restrict__ spatial_shape,
                                             int f, int s, int span, int per_in, int K,
                                             const int* __restrict__ slot_of,
                                             const int* __restrict__ gmin,
                                             const int* __restrict__ rank,
                                             const long long* __restrict__ offsets,
                                             const int* __restrict__ before,
                                             int* __restrict__ out_coords,
                                             int* __restrict__ in_idx, int* __restrict__ out_idx,
                                             int window, int* __restrict__ win) {
    const long long t = scnn_rb_thread();
    if (t >= (long long)n * per_in) return;
    const int h = slot_of[t];
    if (h < 0) return;
    const long long p = t / per_in;
    const int c = (int)(t - p * per_in);
    const int i = (int)perm[p];
    const int* row = coords + (long long)i * (d + 1);
    int o[SCNN_RB_MAX_DIM];
    int k = 0;
    long long key = 0;
    scnn_rb_candidate(row, d, spatial_shape, f, s, span, c, o, &k, &key);  // valid (h >= 0)
    const int first = gmin[h];
    const int out = rank[first];
    if (first == t) {
        int* dst = out_coords + (long long)out * (d + 1);
        dst[0] = row[0];
        for (int j = 0; j < d; ++j) dst[1 + j] = o[j];
    }
    const long long q = offsets[k] + before[p * K + k];
    in_idx[q] = i;
    out_idx[q] = out;
    if (window) win[(long long)out * K + k] = i;
}

// ---------------------------------------------------------------------------- submanifold

extern "C" __global__ void scnn_rb_sub_lookup(const int* __restrict__ coords, int n, int d,
                                              const long long* __restrict__ spatial_shape,
                                              int f, int K,
                                              const long long* __restrict__ keys,
                                              const int* __restrict__ vals, long long capacity,
                                              int shift, int* __restrict__ nbr,
                                              int* __restrict__ has_pair) {
    const long long t = scnn_rb_thread();
    if (t >= (long long)n * K) return;
    const long long i = t / K;
    int kk = (int)(t - i * K);
    const int* row = coords + i * (d + 1);
    const int half = f / 2;
    long long site[SCNN_RB_MAX_DIM];   // 64-bit: x + offset near INT_MAX stays exact
    bool outside = false;
    for (int j = d - 1; j >= 0; --j) {
        const long long c = (long long)row[1 + j] + kk % f - half;
        kk /= f;
        if (c < 0 || c >= spatial_shape[j]) outside = true;
        site[j] = c;
    }
    int found = -1;
    if (!outside) {
        long long key = row[0];
        for (int j = 0; j < d; ++j) key = key * spatial_shape[j] + site[j];
        const long long mask = capacity - 1;
        long long h = scnn_rb_slot(key, shift);
        for (long long probe = 0; probe < capacity; ++probe) {
            const long long kh = keys[h];
            if (kh == key) {
                found = vals[h];
                break;
            }
            if (kh == SCNN_RB_EMPTY) break;
            h = (h + 1) & mask;
        }
    }
    nbr[t] = found;
    has_pair[t] = found >= 0 ? 1 : 0;
}

extern "C" __global__ void scnn_rb_sub_emit(const int* __restrict__ nbr,
                                            const int* __restrict__ before,
                                            const long long* __restrict__ offsets, int n, int K,
                                            int* __restrict__ in_idx, int* __restrict__ out_idx) {
    const long long t = scnn_rb_thread();
    if (t >= (long long)n * K) return;
    const int v = nbr[t];
    if (v < 0) return;
    const long long i = t / K;
    const int k = (int)(t - i * K);
    const long long q = offsets[k] + before[t];
    in_idx[q] = v;
    out_idx[q] = (int)i;
}
