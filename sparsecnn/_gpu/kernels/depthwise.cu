// Depthwise convolution kernels (one filter per channel): forward, input gradient, weight
// gradient. Deterministic: no atomics, every float sum in a fixed order that depends on the
// sizes only.
//
// Semantics are sparsecnn._cpu's (depthwise_forward / depthwise_backward in _ops.py); the
// weight is (K, C), the features (rows, C), all C-contiguous:
//   forward   out[o, c] = row[c] + sum_k w[k, c] (x[win[o, k], c] - g[c])   (win >= 0)
//   dgrad     gx[i, c]  = sum_k w[k, c] gy[iwin[i, k], c]                   (iwin >= 0)
//   wgrad     gw[k, c]  = sum over pairs p of offset k of (x[in_idx[p], c] - g[c]) gy[out_idx[p], c]
// Order of the forward / dgrad sums: k ascending, starting from row[c] (forward) or from the
// first product (dgrad); the CPU kernels add the offsets in the same order.
//
// - scnn_dw_fwd_*, scnn_dw_dgrad_*: one thread per (row, channel) value, grid-stride over
//   the flattened index (channel fastest, so a warp reads consecutive channels); the output
//   window (forward) or the input window (dgrad) of the rulebook gives the partner rows.
//   Any 1-D launch.
// - scnn_dw_wgrad_partial_*: fixed split over pairs, S chunks per offset (chunk s of offset
//   k holds pairs [off_k + m_k s / S, off_k + m_k (s + 1) / S)), each summed in pair order
//   into partial[k, s, c]; then scnn_dw_wgrad_reduce_* adds the S partials in order.
//
// Portable subset of sparsecnn/_gpu/cuda_sim.h (the CPU simulation runs this file too).

#include "common.cuh"

template <class T>
__device__ __forceinline__ void scnn_dw_fwd(const T* __restrict__ x, const T* __restrict__ w,
                                            const T* __restrict__ row,
                                            const T* __restrict__ g,
                                            const int* __restrict__ win, long long n_out,
                                            int K, int C, T* __restrict__ out) {
    const long long total = n_out * C;
    for (long long t = scnn_gstart(); t < total; t += scnn_gstep()) {
        const long long o = t / C;
        const int c = (int)(t - o * C);
        const int* wo = win + o * K;
        const T gc = g[c];
        T acc = row[c];
        for (int k = 0; k < K; ++k) {
            const int i = wo[k];
            if (i >= 0) acc += w[(long long)k * C + c] * (x[(long long)i * C + c] - gc);
        }
        out[t] = acc;
    }
}

template <class T>
__device__ __forceinline__ void scnn_dw_dgrad(const T* __restrict__ gy,
                                              const T* __restrict__ w,
                                              const int* __restrict__ iwin, long long n_in,
                                              int K, int C, T* __restrict__ gx) {
    const long long total = n_in * C;
    for (long long t = scnn_gstart(); t < total; t += scnn_gstep()) {
        const long long i = t / C;
        const int c = (int)(t - i * C);
        const int* wi = iwin + i * K;
        T acc = T(0);
        for (int k = 0; k < K; ++k) {
            const int o = wi[k];
            if (o >= 0) acc += w[(long long)k * C + c] * gy[(long long)o * C + c];
        }
        gx[t] = acc;
    }
}

template <class T>
__device__ __forceinline__ void scnn_dw_wgrad_partial(
        const T* __restrict__ x, const T* __restrict__ g, const T* __restrict__ gy,
        const int* __restrict__ in_idx, const int* __restrict__ out_idx,
        const long long* __restrict__ offsets, int K, int S, int C, T* __restrict__ partial) {
    const long long total = (long long)K * S * C;
    for (long long t = scnn_gstart(); t < total; t += scnn_gstep()) {
        const long long ks = t / C;
        const int c = (int)(t - ks * C);
        const int k = (int)(ks / S), s = (int)(ks - (long long)k * S);
        const long long base = offsets[k], m = offsets[k + 1] - base;
        const long long lo = base + m * s / S, hi = base + m * (s + 1) / S;
        const T gc = g[c];
        T acc = T(0);
        for (long long q = lo; q < hi; ++q)
            acc += (x[(long long)in_idx[q] * C + c] - gc) * gy[(long long)out_idx[q] * C + c];
        partial[t] = acc;
    }
}

template <class T>
__device__ __forceinline__ void scnn_dw_wgrad_reduce(const T* __restrict__ partial, int K,
                                                     int S, int C, T* __restrict__ gw) {
    const long long total = (long long)K * C;
    for (long long t = scnn_gstart(); t < total; t += scnn_gstep()) {
        const long long k = t / C, c = t - k * C;
        const T* p = partial + k * S * C + c;
        T acc = p[0];
        for (int s = 1; s < S; ++s) acc += p[(long long)s * C];
        gw[t] = acc;
    }
}

// ------------------------------------------------------------------------------ entry points

extern "C" __global__ void scnn_dw_fwd_f32(const float* __restrict__ x,
                                           const float* __restrict__ w,
                                           const float* __restrict__ row,
                                           const float* __restrict__ g,
                                           const int* __restrict__ win, long long n_out, int K,
                                           int C, float* __restrict__ out) {
    scnn_dw_fwd<float>(x, w, row, g, win, n_out, K, C, out);
}

extern "C" __global__ void scnn_dw_fwd_f64(const double* __restrict__ x,
                                           const double* __restrict__ w,
                                           const double* __restrict__ row,
                                           const double* __restrict__ g,
                                           const int* __restrict__ win, long long n_out, int K,
                                           int C, double* __restrict__ out) {
    scnn_dw_fwd<double>(x, w, row, g, win, n_out, K, C, out);
}

extern "C" __global__ void scnn_dw_dgrad_f32(const float* __restrict__ gy,
                                             const float* __restrict__ w,
                                             const int* __restrict__ iwin, long long n_in,
                                             int K, int C, float* __restrict__ gx) {
    scnn_dw_dgrad<float>(gy, w, iwin, n_in, K, C, gx);
}

extern "C" __global__ void scnn_dw_dgrad_f64(const double* __restrict__ gy,
                                             const double* __restrict__ w,
                                             const int* __restrict__ iwin, long long n_in,
                                             int K, int C, double* __restrict__ gx) {
    scnn_dw_dgrad<double>(gy, w, iwin, n_in, K, C, gx);
}

extern "C" __global__ void scnn_dw_wgrad_partial_f32(
        const float* __restrict__ x, const float* __restrict__ g, const float* __restrict__ gy,
        const int* __restrict__ in_idx, const int* __restrict__ out_idx,
        const long long* __restrict__ offsets, int K, int S, int C,
        float* __restrict__ partial) {
    scnn_dw_wgrad_partial<float>(x, g, gy, in_idx, out_idx, offsets, K, S, C, partial);
}

extern "C" __global__ void scnn_dw_wgrad_partial_f64(
        const double* __restrict__ x, const double* __restrict__ g,
        const double* __restrict__ gy, const int* __restrict__ in_idx,
        const int* __restrict__ out_idx, const long long* __restrict__ offsets, int K, int S,
        int C, double* __restrict__ partial) {
    scnn_dw_wgrad_partial<double>(x, g, gy, in_idx, out_idx, offsets, K, S, C, partial);
}

extern "C" __global__ void scnn_dw_wgrad_reduce_f32(const float* __restrict__ partial, int K,
                                                    int S, int C, float* __restrict__ gw) {
    scnn_dw_wgrad_reduce<float>(partial, K, S, C, gw);
}

extern "C" __global__ void scnn_dw_wgrad_reduce_f64(const double* __restrict__ partial, int K,
                                                    int S, int C, double* __restrict__ gw) {
    scnn_dw_wgrad_reduce<double>(partial, K, S, C, gw);
}
