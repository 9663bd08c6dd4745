// Coordinate hash table on the device: packed int64 keys, open addressing, linear probing.
//
// The table is sparsecnn._cpu's: `keys` (int64, -1 = empty) and `vals` (int32) of a
// power-of-two capacity 2**bits, slot = (key * 0x9E3779B97F4A7C15) >> (64 - bits) (Fibonacci
// hashing, as the CPU), key = row-major packing of (batch, c_0, ..., c_{d-1}) over
// (batch_size, *spatial_shape) (the caller checks that it cannot overflow).
//
// Building it (the same result as sparsecnn._cpu.build_hash, whatever the thread order):
//   1. scnn_hash_insert: one thread per input row inserts its key with a 64-bit atomicCAS
//      (first[] = INT_MAX beforehand) and takes atomicMin(first[slot], row): the first
//      occurrence of a key wins. slot_of[row] = its slot, or -1 and *full = 1 when the table
//      has no free slot left.
//   2. scnn_hash_first_flags: flag[row] = 1 where the row is its key's first occurrence.
//   3. an exclusive prefix sum of flag (integers: the array module's cumsum) = rank;
//   4. scnn_hash_number: inverse[row] = rank[first[slot]], the unique index of the row's key
//      in order of first occurrence, and vals[slot] = that index, written once per key by
//      the first row.
// Which slot a key lands in can differ from the CPU's when keys collide (insertion order),
// the set of (key, value) pairs and every lookup cannot.
//
// Portable subset of sparsecnn/_gpu/cuda_sim.h (the CPU simulation runs this file too).

#define SCNN_HASH_EMPTY (-1LL)

__device__ __forceinline__ long long scnn_hash_slot(long long key, int shift) {
    return (long long)(((unsigned long long)key * 0x9E3779B97F4A7C15ULL) >> shift);
}

extern "C" __global__ void scnn_hash_insert(const int* __restrict__ coords, int n, int d,
                                            const long long* __restrict__ spatial_shape,
                                            long long* keys, long long capacity, int shift,
                                            int* first, int* __restrict__ slot_of,
                                            int* full) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int* row = coords + (long long)i * (d + 1);
    long long key = row[0];
    for (int j = 0; j < d; ++j) key = key * spatial_shape[j] + row[1 + j];
    const long long mask = capacity - 1;
    long long h = scnn_hash_slot(key, shift);
    for (long long probe = 0; probe < capacity; ++probe) {
        const unsigned long long prev =
            atomicCAS(reinterpret_cast<unsigned long long*>(keys + h),
                      (unsigned long long)SCNN_HASH_EMPTY, (unsigned long long)key);
        if (prev == (unsigned long long)SCNN_HASH_EMPTY || prev == (unsigned long long)key) {
            atomicMin(first + h, i);
            slot_of[i] = (int)h;
            return;
        }
        h = (h + 1) & mask;
    }
    slot_of[i] = -1;
    atomicExch(full, 1);
}

extern "C" __global__ void scnn_hash_first_flags(const int* __restrict__ slot_of,
                                                 const int* __restrict__ first, int n,
                                                 int* __restrict__ flag) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    flag[i] = first[slot_of[i]] == i ? 1 : 0;
}

extern "C" __global__ void scnn_hash_number(const int* __restrict__ slot_of,
                                            const int* __restrict__ first,
                                            const int* __restrict__ rank, int n,
                                            int* __restrict__ inverse, int* __restrict__ vals) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int h = slot_of[i];
    const int f = first[h];
    const int u = rank[f];
    inverse[i] = u;
    if (f == i) vals[h] = u;
}

extern "C" __global__ void scnn_hash_lookup(const long long* __restrict__ keys,
                                            const int* __restrict__ vals, long long capacity,
                                            int shift, const long long* __restrict__ queries,
                                            int n_queries, int* __restrict__ out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_queries) return;
    const long long q = queries[i];
    int found = -1;
    if (q >= 0) {
        const long long mask = capacity - 1;
        long long h = scnn_hash_slot(q, shift);
        for (long long probe = 0; probe < capacity; ++probe) {
            const long long k = keys[h];
            if (k == q) {
                found = vals[h];
                break;
            }
            if (k == SCNN_HASH_EMPTY) break;
            h = (h + 1) & mask;
        }
    }
    out[i] = found;
}
