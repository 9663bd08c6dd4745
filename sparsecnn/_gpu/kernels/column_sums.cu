// Column sums of a C-contiguous (n, C) float32/float64 array, deterministic, in two passes.
//
// The order of additions is exactly sparsecnn._cpu.column_sums's, so the results are bitwise
// equal to the CPU's (and identical run to run):
//   pass 1  partial[b, c] = a[r0, c] + a[r0 + 1, c] + ... + a[r1 - 1, c] over the chunk
//           b of `chunk` rows (r0 = b * chunk; the CPU uses chunk = 256), left to right;
//   pass 2  out[c] = partial[0, c] + partial[1, c] + ... in chunk order.
// No atomics. Pass 1 runs one block per (chunk, group of 32 columns); the block stages
// sub-tiles of the chunk in shared memory with every thread loading (consecutive threads read
// consecutive addresses even when C < 32), then one thread per column adds the sub-tile's rows
// in order. Launch pass 1 with grid (n_chunks, ceil(C / 32)) and any block size (128 is
// good); pass 2 with grid ceil(C / 256), block 256. n >= 1 and C >= 1 (the caller skips
// empty launches).
//
// Portable subset of sparsecnn/_gpu/cuda_sim.h (the CPU simulation runs this file too).

#define SCNN_COLSUM_TILE_ROWS 64
#define SCNN_COLSUM_TILE_COLS 32

template <class T>
__device__ __forceinline__ void scnn_colsum_partial(const T* __restrict__ a, long long n,
                                                    int C, int chunk, T* __restrict__ partial,
                                                    T* tile) {
    const long long r0 = (long long)blockIdx.x * chunk;
    const long long r_end = min(n, r0 + chunk);
    const int c0 = blockIdx.y * SCNN_COLSUM_TILE_COLS;
    const int w = min(SCNN_COLSUM_TILE_COLS, C - c0);  // columns of this block
    const int tid = threadIdx.x;
    const int nthreads = blockDim.x;
    T acc = T(0);
    for (long long s0 = r0; s0 < r_end; s0 += SCNN_COLSUM_TILE_ROWS) {
        const int rows = (int)min((long long)SCNN_COLSUM_TILE_ROWS, r_end - s0);
        // stage rows [s0, s0 + rows) x columns [c0, c0 + w)
        for (int e = tid; e < rows * w; e += nthreads) {
            const int r = e / w, c = e - r * w;
            tile[r * SCNN_COLSUM_TILE_COLS + c] = a[(s0 + r) * C + c0 + c];
        }
        __syncthreads();  // the tile is complete
        if (tid < w) {
            int r = 0;
            if (s0 == r0) {  // the chunk's first row starts the sum (as on the CPU: no 0 + x)
                acc = tile[tid];
                r = 1;
            }
            for (; r < rows; ++r) acc += tile[r * SCNN_COLSUM_TILE_COLS + tid];
        }
        __syncthreads();  // everyone is done reading before the tile is overwritten
    }
    if (tid < w) partial[(long long)blockIdx.x * C + c0 + tid] = acc;
}

template <class T>
__device__ __forceinline__ void scnn_colsum_final(const T* __restrict__ partial, int n_chunks,
                                                  int C, T* __restrict__ out) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    T acc = partial[c];
    for (int b = 1; b < n_chunks; ++b) acc += partial[(long long)b * C + c];
    out[c] = acc;
}

extern "C" __global__ void scnn_column_sums_partial_f32(const float* __restrict__ a, long long n,
                                                        int C, int chunk,
                                                        float* __restrict__ partial) {
    __shared__ float tile[SCNN_COLSUM_TILE_ROWS * SCNN_COLSUM_TILE_COLS];
    scnn_colsum_partial<float>(a, n, C, chunk, partial, tile);
}

extern "C" __global__ void scnn_column_sums_partial_f64(const double* __restrict__ a, long long n,
                                                        int C, int chunk,
                                                        double* __restrict__ partial) {
    __shared__ double tile[SCNN_COLSUM_TILE_ROWS * SCNN_COLSUM_TILE_COLS];
    scnn_colsum_partial<double>(a, n, C, chunk, partial, tile);
}

extern "C" __global__ void scnn_column_sums_final_f32(const float* __restrict__ partial,
                                                      int n_chunks, int C,
                                                      float* __restrict__ out) {
    scnn_colsum_final<float>(partial, n_chunks, C, out);
}

extern "C" __global__ void scnn_column_sums_final_f64(const double* __restrict__ partial,
                                                      int n_chunks, int C,
                                                      double* __restrict__ out) {
    scnn_colsum_final<double>(partial, n_chunks, C, out);
}
