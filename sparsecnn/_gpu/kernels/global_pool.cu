// Per-sample (segment) sums and maxima of the active sites' features, for the global poolings
// of sparsecnn/heads.py. Deterministic: no atomics, every sum in an order fixed by the sizes.
//
// The caller orders the rows once (order: the feature rows sorted by sample, then by the
// row-major position of their site), so sample b owns the sorted positions
// [seg[b], seg[b + 1]). Each sample's positions are cut into chunks of SCNN_GPOOL_CHUNK
// (sample b owns the chunks [chunk_off[b], chunk_off[b + 1]); chunk_seg[j] is the sample of
// chunk j). Two passes:
//   partial  one thread per (chunk j, channel c): the sum of features[order[p], c] over the
//            chunk's positions p in ascending order, and the maximum with its row (a value
//            wins only if strictly greater: ties keep the earliest position; NaN never wins);
//   final    one thread per (sample b, channel c): the chunks' sums added in chunk order, the
//            chunks' maxima compared in chunk order (strictly greater wins). A sample with no
//            site gets sum 0, max -inf and argmax -1.
// Launch both as 1-D grid-stride kernels (any grid, any block); n_chunks >= 1 and B >= 1
// (the caller skips empty launches).
//
// Portable subset of sparsecnn/_gpu/cuda_sim.h (the CPU simulation runs this file too).

#define SCNN_GPOOL_CHUNK 256

#include "common.cuh"

template <class T>
__device__ __forceinline__ void scnn_gpool_partial(
        const T* __restrict__ x, const int* __restrict__ order, const long long* __restrict__ seg,
        const long long* __restrict__ chunk_off, const int* __restrict__ chunk_seg,
        long long n_chunks, int C, T* __restrict__ psum, T* __restrict__ pmax,
        int* __restrict__ parg) {
    const long long total = n_chunks * C;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        const long long j = t / C;
        const int c = (int)(t - j * C);
        const int b = chunk_seg[j];
        const long long p0 = seg[b] + (j - chunk_off[b]) * SCNN_GPOOL_CHUNK;
        const long long p1 = min(seg[b + 1], p0 + SCNN_GPOOL_CHUNK);
        int row = order[p0];
        T v = x[(long long)row * C + c];
        T s = v;  // the first value starts the sum (no 0 + x)
        T best = v;
        int arg = row;
        for (long long p = p0 + 1; p < p1; ++p) {
            row = order[p];
            v = x[(long long)row * C + c];
            s += v;
            if (v > best || (best != best && v == v)) {  // strictly greater; a NaN first loses
                best = v;
                arg = row;
            }
        }
        psum[t] = s;
        pmax[t] = best;
        parg[t] = arg;
    }
}

template <class T>
__device__ __forceinline__ void scnn_gpool_final(
        const T* __restrict__ psum, const T* __restrict__ pmax, const int* __restrict__ parg,
        const long long* __restrict__ chunk_off, long long B, int C, T* __restrict__ sum,
        T* __restrict__ mx, int* __restrict__ argmax) {
    const long long total = B * C;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        const long long b = t / C;
        const int c = (int)(t - b * C);
        const long long j0 = chunk_off[b], j1 = chunk_off[b + 1];
        T s = T(0);
        T best = scnn_neg_inf<T>();
        int arg = -1;
        if (j0 < j1) {
            s = psum[j0 * C + c];
            best = pmax[j0 * C + c];
            arg = parg[j0 * C + c];
            for (long long j = j0 + 1; j < j1; ++j) {
                s += psum[j * C + c];
                const T v = pmax[j * C + c];
                if (v > best || (best != best && v == v)) {
                    best = v;
                    arg = parg[j * C + c];
                }
            }
        }
        sum[t] = s;
        mx[t] = best;
        argmax[t] = arg;
    }
}

extern "C" __global__ void scnn_gpool_partial_f32(
        const float* __restrict__ x, const int* __restrict__ order,
        const long long* __restrict__ seg, const long long* __restrict__ chunk_off,
        const int* __restrict__ chunk_seg, long long n_chunks, int C, float* __restrict__ psum,
        float* __restrict__ pmax, int* __restrict__ parg) {
    scnn_gpool_partial<float>(x, order, seg, chunk_off, chunk_seg, n_chunks, C, psum, pmax,
                              parg);
}

extern "C" __global__ void scnn_gpool_partial_f64(
        const double* __restrict__ x, const int* __restrict__ order,
        const long long* __restrict__ seg, const long long* __restrict__ chunk_off,
        const int* __restrict__ chunk_seg, long long n_chunks, int C, double* __restrict__ psum,
        double* __restrict__ pmax, int* __restrict__ parg) {
    scnn_gpool_partial<double>(x, order, seg, chunk_off, chunk_seg, n_chunks, C, psum, pmax,
                               parg);
}

extern "C" __global__ void scnn_gpool_final_f32(
        const float* __restrict__ psum, const float* __restrict__ pmax,
        const int* __restrict__ parg, const long long* __restrict__ chunk_off, long long B, int C,
        float* __restrict__ sum, float* __restrict__ mx, int* __restrict__ argmax) {
    scnn_gpool_final<float>(psum, pmax, parg, chunk_off, B, C, sum, mx, argmax);
}

extern "C" __global__ void scnn_gpool_final_f64(
        const double* __restrict__ psum, const double* __restrict__ pmax,
        const int* __restrict__ parg, const long long* __restrict__ chunk_off, long long B, int C,
        double* __restrict__ sum, double* __restrict__ mx, int* __restrict__ argmax) {
    scnn_gpool_final<double>(psum, pmax, parg, chunk_off, B, C, sum, mx, argmax);
}
