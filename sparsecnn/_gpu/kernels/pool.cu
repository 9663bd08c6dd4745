// Max and average pooling with the ground state as a candidate, deterministic (no atomics).
//
// Semantics are sparsecnn._cpu's (_pool.pyx, _rows.pxd pool_row):
//   maxpool_fwd   out[o, c] = max over k of x[win[o, k], c] (win >= 0), starting from
//                 ground[c] if the window has a gap (some win < 0), else -inf; a candidate
//                 wins only if strictly greater (ties keep the earlier one: the ground, then
//                 k ascending; NaN never wins); argmax = the winning input row, -1 for the
//                 ground; then, if act, the (leaky) ReLU v > a v ? v : a v.
//   maxpool_bwd   gx[i, c] = sum over k (ascending) of d[o, c] for o = iwin[i, k] >= 0 with
//                 argmax[o, c] == i, where d = gy, or with act gy where y > 0 and a gy
//                 elsewhere (y: the forward's activated output); an input that won nothing
//                 gets +0. The ground's share: chunk partials (SCNN_POOL_CHUNK outputs each,
//                 in order) of d[o, c] where argmax[o, c] < 0 and the window has a gap
//                 (count[o] < K), summed afterwards in chunk order (column_sums.cu's final
//                 pass).
//   avgpool_fwd   out[o, c] = ground[c] + sum over k (ascending, win >= 0) of
//                 (x[i, c] - ground[c]) * inv, inv = 1 / K
//   avgpool_bwd   gx[i, c] = sum over k (ascending, iwin >= 0) of gy[o, c] * inv (+0 if none);
//                 the ground's share: chunk partials of gy[o, c] * ((K - count[o]) / K).
// One thread per output value, grid-stride over the flattened (rows, channels) index; any
// 1-D launch. The ground partial kernels: one thread per (chunk, channel).
//
// Portable subset of sparsecnn/_gpu/cuda_sim.h (the CPU simulation runs this file too).

#define SCNN_POOL_CHUNK 256

#include "common.cuh"

// the gradient reaching the pooling: gy, or through the fused activation's backward
template <class T>
__device__ __forceinline__ T scnn_pool_dy(const T* __restrict__ gy, const T* __restrict__ y,
                                          long long t, int act, T a) {
    const T v = gy[t];
    return act ? (y[t] > T(0) ? v : v * a) : v;
}

template <class T>
__device__ __forceinline__ void scnn_maxpool_fwd(const T* __restrict__ x,
                                                 const T* __restrict__ ground,
                                                 const int* __restrict__ win, long long n_out,
                                                 int K, int C, int act, T a,
                                                 T* __restrict__ out, int* __restrict__ argmax) {
    const long long total = n_out * C;
    for (long long t = scnn_gstart(); t < total; t += scnn_gstep()) {
        const long long o = t / C;
        const int c = (int)(t - o * C);
        const int* wr = win + o * K;
        bool gap = false;
        for (int k = 0; k < K; ++k) gap = gap || wr[k] < 0;
        T best = gap ? ground[c] : scnn_neg_inf<T>();
        int arg = -1;
        for (int k = 0; k < K; ++k) {
            const int i = wr[k];
            if (i < 0) continue;
            const T v = x[(long long)i * C + c];
            if (v > best) {
                best = v;
                arg = i;
            }
        }
        if (act) best = best > a * best ? best : a * best;
        out[t] = best;
        argmax[t] = arg;
    }
}

template <class T>
__device__ __forceinline__ void scnn_maxpool_bwd(const T* __restrict__ gy,
                                                 const T* __restrict__ y,
                                                 const int* __restrict__ argmax,
                                                 const int* __restrict__ iwin, long long n_in,
                                                 int K, int C, int act, T a,
                                                 T* __restrict__ gx) {
    const long long total = n_in * C;
    for (long long t = scnn_gstart(); t < total; t += scnn_gstep()) {
        const long long i = t / C;
        const int c = (int)(t - i * C);
        const int* wr = iwin + i * K;
        T acc = T(0);
        bool first = true;
        for (int k = 0; k < K; ++k) {
            const int o = wr[k];
            if (o < 0) continue;
            const long long q = (long long)o * C + c;
            if (argmax[q] != i) continue;
            const T d = scnn_pool_dy<T>(gy, y, q, act, a);
            acc = first ? d : acc + d;
            first = false;
        }
        gx[t] = acc;
    }
}

template <class T>
__device__ __forceinline__ void scnn_maxpool_ground_partial(
        const T* __restrict__ gy, const T* __restrict__ y, const int* __restrict__ argmax,
        const int* __restrict__ count, long long n_out, int K, int C, int act, T a,
        T* __restrict__ partial) {
    const long long n_chunks = (n_out + SCNN_POOL_CHUNK - 1) / SCNN_POOL_CHUNK;
    const long long total = n_chunks * C;
    for (long long t = scnn_gstart(); t < total; t += scnn_gstep()) {
        const long long b = t / C;
        const int c = (int)(t - b * C);
        const long long o1 = min(n_out, (b + 1) * SCNN_POOL_CHUNK);
        T acc = T(0);
        for (long long o = b * SCNN_POOL_CHUNK; o < o1; ++o) {
            const long long q = o * C + c;
            if (argmax[q] < 0 && count[o] < K) acc += scnn_pool_dy<T>(gy, y, q, act, a);
        }
        partial[t] = acc;
    }
}

template <class T>
__device__ __forceinline__ void scnn_avgpool_fwd(const T* __restrict__ x,
                                                 const T* __restrict__ ground,
                                                 const int* __restrict__ win, long long n_out,
                                                 int K, int C, T inv, T* __restrict__ out) {
    const long long total = n_out * C;
    for (long long t = scnn_gstart(); t < total; t += scnn_gstep()) {
        const long long o = t / C;
        const int c = (int)(t - o * C);
        const int* wr = win + o * K;
        const T gc = ground[c];
        T acc = gc;
        for (int k = 0; k < K; ++k) {
            const int i = wr[k];
            if (i >= 0) acc += (x[(long long)i * C + c] - gc) * inv;
        }
        out[t] = acc;
    }
}

template <class T>
__device__ __forceinline__ void scnn_avgpool_bwd(const T* __restrict__ gy,
                                                 const int* __restrict__ iwin, long long n_in,
                                                 int K, int C, T inv, T* __restrict__ gx) {
    const long long total = n_in * C;
    for (long long t = scnn_gstart(); t < total; t += scnn_gstep()) {
        const long long i = t / C;
        const int c = (int)(t - i * C);
        const int* wr = iwin + i * K;
        T acc = T(0);
        for (int k = 0; k < K; ++k) {
            const int o = wr[k];
            if (o >= 0) acc += gy[(long long)o * C + c] * inv;
        }
        gx[t] = acc;
    }
}

template <class T>
__device__ __forceinline__ void scnn_avgpool_ground_partial(const T* __restrict__ gy,
                                                            const int* __restrict__ count,
                                                            long long n_out, int K, int C,
                                                            T* __restrict__ partial) {
    const long long n_chunks = (n_out + SCNN_POOL_CHUNK - 1) / SCNN_POOL_CHUNK;
    const long long total = n_chunks * C;
    for (long long t = scnn_gstart(); t < total; t += scnn_gstep()) {
        const long long b = t / C;
        const int c = (int)(t - b * C);
        const long long o1 = min(n_out, (b + 1) * SCNN_POOL_CHUNK);
        T acc = T(0);
        for (long long o = b * SCNN_POOL_CHUNK; o < o1; ++o)
            acc += gy[o * C + c] * (T(K - count[o]) / T(K));
        partial[t] = acc;
    }
}

// ------------------------------------------------------------------------------ entry points

extern "C" __global__ void scnn_maxpool_fwd_f32(const float* __restrict__ x,
                                                const float* __restrict__ ground,
                                                const int* __restrict__ win, long long n_out,
                                                int K, int C, int act, float a,
                                                float* __restrict__ out,
                                                int* __restrict__ argmax) {
    scnn_maxpool_fwd<float>(x, ground, win, n_out, K, C, act, a, out, argmax);
}

extern "C" __global__ void scnn_maxpool_fwd_f64(const double* __restrict__ x,
                                                const double* __restrict__ ground,
                                                const int* __restrict__ win, long long n_out,
                                                int K, int C, int act, double a,
                                                double* __restrict__ out,
                                                int* __restrict__ argmax) {
    scnn_maxpool_fwd<double>(x, ground, win, n_out, K, C, act, a, out, argmax);
}

extern "C" __global__ void scnn_maxpool_bwd_f32(const float* __restrict__ gy,
                                                const float* __restrict__ y,
                                                const int* __restrict__ argmax,
                                                const int* __restrict__ iwin, long long n_in,
                                                int K, int C, int act, float a,
                                                float* __restrict__ gx) {
    scnn_maxpool_bwd<float>(gy, y, argmax, iwin, n_in, K, C, act, a, gx);
}

extern "C" __global__ void scnn_maxpool_bwd_f64(const double* __restrict__ gy,
                                                const double* __restrict__ y,
                                                const int* __restrict__ argmax,
                                                const int* __restrict__ iwin, long long n_in,
                                                int K, int C, int act, double a,
                                                double* __restrict__ gx) {
    scnn_maxpool_bwd<double>(gy, y, argmax, iwin, n_in, K, C, act, a, gx);
}

extern "C" __global__ void scnn_maxpool_ground_partial_f32(
        const float* __restrict__ gy, const float* __restrict__ y,
        const int* __restrict__ argmax, const int* __restrict__ count, long long n_out, int K,
        int C, int act, float a, float* __restrict__ partial) {
    scnn_maxpool_ground_partial<float>(gy, y, argmax, count, n_out, K, C, act, a, partial);
}

extern "C" __global__ void scnn_maxpool_ground_partial_f64(
        const double* __restrict__ gy, const double* __restrict__ y,
        const int* __restrict__ argmax, const int* __restrict__ count, long long n_out, int K,
        int C, int act, double a, double* __restrict__ partial) {
    scnn_maxpool_ground_partial<double>(gy, y, argmax, count, n_out, K, C, act, a, partial);
}

extern "C" __global__ void scnn_avgpool_fwd_f32(const float* __restrict__ x,
                                                const float* __restrict__ ground,
                                                const int* __restrict__ win, long long n_out,
                                                int K, int C, float inv,
                                                float* __restrict__ out) {
    scnn_avgpool_fwd<float>(x, ground, win, n_out, K, C, inv, out);
}

extern "C" __global__ void scnn_avgpool_fwd_f64(const double* __restrict__ x,
                                                const double* __restrict__ ground,
                                                const int* __restrict__ win, long long n_out,
                                                int K, int C, double inv,
                                                double* __restrict__ out) {
    scnn_avgpool_fwd<double>(x, ground, win, n_out, K, C, inv, out);
}

extern "C" __global__ void scnn_avgpool_bwd_f32(const float* __restrict__ gy,
                                                const int* __restrict__ iwin, long long n_in,
                                                int K, int C, float inv,
                                                float* __restrict__ gx) {
    scnn_avgpool_bwd<float>(gy, iwin, n_in, K, C, inv, gx);
}

extern "C" __global__ void scnn_avgpool_bwd_f64(const double* __restrict__ gy,
                                                const int* __restrict__ iwin, long long n_in,
                                                int K, int C, double inv,
                                                double* __restrict__ gx) {
    scnn_avgpool_bwd<double>(gy, iwin, n_in, K, C, inv, gx);
}

extern "C" __global__ void scnn_avgpool_ground_partial_f32(const float* __restrict__ gy,
                                                           const int* __restrict__ count,
                                                           long long n_out, int K, int C,
                                                           float* __restrict__ partial) {
    scnn_avgpool_ground_partial<float>(gy, count, n_out, K, C, partial);
}

extern "C" __global__ void scnn_avgpool_ground_partial_f64(const double* __restrict__ gy,
                                                           const int* __restrict__ count,
                                                           long long n_out, int K, int C,
                                                           double* __restrict__ partial) {
    scnn_avgpool_ground_partial<double>(gy, count, n_out, K, C, partial);
}
