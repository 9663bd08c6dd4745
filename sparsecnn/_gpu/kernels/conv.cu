// Sparse convolution kernels (forward, input gradient, weight gradient, fused max-pooling),
// deterministic: no atomics, every float sum in a fixed order that depends on the sizes only.
//
// Semantics are sparsecnn._cpu's (_conv.pyx):
//   forward     out[o, co] = row[co] + sum_k sum_ci (x[win[o, k], ci] - g[ci]) w[k, ci, co]
//               over the offsets k with win[o, k] >= 0 (row: the output ground, or the bias)
//   dgrad       gx[i, ci] = sum_k sum_co w[k, ci, co] gy[iwin[i, k], co]   (iwin >= 0)
//   wgrad       gw[k, ci, co] = sum over pairs p of offset k of
//               (x[in_idx[p], ci] - g[ci]) gy[out_idx[p], co]
//   conv+max    pool output p, channel co: max over its pool window's convolution rows o
//               (pwin[p, k2] >= 0) of the forward value, and pool_ground[co] if the pool
//               window has a gap; argmax = the winning convolution row, -1 for the ground
//               (ties keep the earlier candidate: the ground, then k2 ascending); then the
//               (leaky) ReLU v > a v ? v : a v if act.
// Order of every forward/dgrad sum: k ascending, then the reduced channel ascending, starting
// from row[co] (forward) or from the first product (dgrad). The simple and the tiled kernels
// use this same order, so they agree bitwise wherever the compiler contracts them alike (in
// the CPU simulation always).
//
// Two families:
// - simple (*_simple_*): one thread per output value, grid-stride over the flattened
//   (rows, channels) index; the reference. Any 1-D launch.
// - tiled (*_tiled_*): output-stationary, window-driven implicit GEMM. A block of 16 x 16
//   threads computes a tile of SCNN_TBM rows x SCNN_TBN channels (4 x 2 values per thread);
//   per offset k it reads the tile's window column into shared memory, skips k if no row of
//   the tile has an input there (a block-uniform decision), and otherwise stages the gathered
//   operand rows (ground subtracted on load, zeros where absent) and the weight slice in
//   shared memory, SCNN_TBK reduced channels at a time. Epilogue: row (forward), or the
//   max-pooling with ground candidate and activation (fused conv+max). Launch with block
//   (16, 16) and grid (ceil(rows / SCNN_TBM), ceil(channels / SCNN_TBN)); for the fused
//   kernel rows are pool outputs and a block holds SCNN_TBM / K2 of them (K2 <= SCNN_TBM).
// - wgrad: fixed split over pairs, S chunks per offset (chunk s of offset k holds pairs
//   [off_k + m_k s / S, off_k + m_k (s + 1) / S)), each summed in pair order into
//   partial[k, s, ci, co]; then the S partials in order (scnn_conv_wgrad_reduce_*).
//
// Portable subset of sparsecnn/_gpu/cuda_sim.h (the CPU simulation runs this file too).

#define SCNN_TBM 64
#define SCNN_TBN 32
#define SCNN_TBK 16
#define SCNN_TTX 16
#define SCNN_TTY 16
#define SCNN_TRM (SCNN_TBM / SCNN_TTY)  // rows per thread
#define SCNN_TRN (SCNN_TBN / SCNN_TTX)  // channels per thread

#include "common.cuh"

// forward value of convolution row o, channel co (the simple kernels' order)
template <class T>
__device__ __forceinline__ T scnn_conv_value(const T* __restrict__ x, const T* __restrict__ w,
                                             const T* __restrict__ row,
                                             const T* __restrict__ g,
                                             const int* __restrict__ win, long long o, int K,
                                             int cin, int cout, int co) {
    T acc = row[co];
    const int* wr = win + o * K;
    for (int k = 0; k < K; ++k) {
        const int i = wr[k];
        if (i < 0) continue;
        const T* xr = x + (long long)i * cin;
        const T* wk = w + (long long)k * cin * cout + co;
        for (int ci = 0; ci < cin; ++ci) acc += (xr[ci] - g[ci]) * wk[(long long)ci * cout];
    }
    return acc;
}

// ------------------------------------------------------------------------------ simple

template <class T>
__device__ __forceinline__ void scnn_conv_fwd_simple(const T* __restrict__ x,
                                                     const T* __restrict__ w,
                                                     const T* __restrict__ row,
                                                     const T* __restrict__ g,
                                                     const int* __restrict__ win,
                                                     long long n_out, int K, int cin, int cout,
                                                     T* __restrict__ out) {
    const long long total = n_out * cout;
    for (long long t = scnn_gstart(); t < total; t += scnn_gstep()) {
        const long long o = t / cout;
        const int co = (int)(t - o * cout);
        out[t] = scnn_conv_value<T>(x, w, row, g, win, o, K, cin, cout, co);
    }
}

template <class T>
__device__ __forceinline__ void scnn_conv_dgrad_simple(const T* __restrict__ gy,
                                                       const T* __restrict__ w,
                                                       const int* __restrict__ iwin,
                                                       long long n_in, int K, int cin,
                                                       int cout, T* __restrict__ gx) {
    const long long total = n_in * cin;
    for (long long t = scnn_gstart(); t < total; t += scnn_gstep()) {
        const long long i = t / cin;
        const int ci = (int)(t - i * cin);
        const int* wr = iwin + i * K;
        T acc = T(0);
        bool first = true;
        for (int k = 0; k < K; ++k) {
            const int o = wr[k];
            if (o < 0) continue;
            const T* gr = gy + (long long)o * cout;
            const T* wk = w + ((long long)k * cin + ci) * cout;
            for (int co = 0; co < cout; ++co) {
                acc = first ? wk[co] * gr[co] : acc + wk[co] * gr[co];
                first = false;
            }
        }
        gx[t] = acc;
    }
}

template <class T>
__device__ __forceinline__ void scnn_conv_maxpool_simple(
        const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ row,
        const T* __restrict__ g, const int* __restrict__ win, const int* __restrict__ pwin,
        const T* __restrict__ pool_ground, long long n_out, int K, int K2, int cin, int cout,
        int act, T a, T* __restrict__ out, int* __restrict__ argmax) {
    const long long total = n_out * cout;
    for (long long t = scnn_gstart(); t < total; t += scnn_gstep()) {
        const long long p = t / cout;
        const int co = (int)(t - p * cout);
        const int* pw = pwin + p * K2;
        bool gap = false;
        for (int k2 = 0; k2 < K2; ++k2) gap = gap || pw[k2] < 0;
        T best = gap ? pool_ground[co] : scnn_neg_inf<T>();
        int arg = -1;
        for (int k2 = 0; k2 < K2; ++k2) {
            const int o = pw[k2];
            if (o < 0) continue;
            const T v = scnn_conv_value<T>(x, w, row, g, win, o, K, cin, cout, co);
            if (v > best) {
                best = v;
                arg = o;
            }
        }
        if (act) best = best > a * best ? best : a * best;
        out[t] = best;
        argmax[t] = arg;
    }
}

// ------------------------------------------------------------------------------ wgrad

template <class T>
__device__ __forceinline__ void scnn_conv_wgrad_partial(
        const T* __restrict__ x, const T* __restrict__ g, const T* __restrict__ gy,
        const int* __restrict__ in_idx, const int* __restrict__ out_idx,
        const long long* __restrict__ offsets, int K, int S, int cin, int cout,
        T* __restrict__ partial) {
    const long long E = (long long)cin * cout;
    const long long total = (long long)K * S * E;
    for (long long t = scnn_gstart(); t < total; t += scnn_gstep()) {
        const long long ks = t / E;
        const long long e = t - ks * E;
        const int k = (int)(ks / S), s = (int)(ks - (long long)k * S);
        const int ci = (int)(e / cout), co = (int)(e - (long long)ci * cout);
        const long long base = offsets[k], m = offsets[k + 1] - base;
        const long long lo = base + m * s / S, hi = base + m * (s + 1) / S;
        const T gc = g[ci];
        T acc = T(0);
        for (long long q = lo; q < hi; ++q)
            acc += (x[(long long)in_idx[q] * cin + ci] - gc) * gy[(long long)out_idx[q] * cout + co];
        partial[t] = acc;
    }
}

template <class T>
__device__ __forceinline__ void scnn_conv_wgrad_reduce(const T* __restrict__ partial, int K,
                                                       int S, long long E,
                                                       T* __restrict__ gw) {
    const long long total = (long long)K * E;
    for (long long t = scnn_gstart(); t < total; t += scnn_gstep()) {
        const long long k = t / E, e = t - k * E;
        const T* p = partial + k * S * E + e;
        T acc = p[0];
        for (int s = 1; s < S; ++s) acc += p[(long long)s * E];
        gw[t] = acc;
    }
}

// ------------------------------------------------------------------------------ tiled

// Shared-memory tiles of one block.
template <class T>
struct ScnnTiles {
    T* as;   // [SCNN_TBK][SCNN_TBM] gathered operand (reduced channel major)
    T* bs;   // [SCNN_TBK][SCNN_TBN] weight slice
    int* rw; // [SCNN_TBM] window column of the tile's rows at the current offset
    int* rs; // [SCNN_TBM] the window row of each tile row, -1 for none (set by the caller)
};

// The tile's accumulation: acc[r][c] (r: rows ty + 16 r, c: channels tx + 16 c) over all
// offsets. sh.rs[r] (r < SCNN_TBM) is the window row of tile row r, or -1 (no row).
// a_rows: (n_src, c_red) operand rows (x for forward, gy for dgrad); `sub` subtracts g on
// load. trans: weight element for (reduced rc, output nc) is w[k, nc, rc] instead of
// w[k, rc, nc]. Every thread of the block calls it (it has barriers).
template <class T, bool SUB, bool TRANS>
__device__ __forceinline__ void scnn_tile_accumulate(
        const T* __restrict__ a_rows, const T* __restrict__ w, const T* __restrict__ g,
        const int* __restrict__ win, int K, int c_red, int c_out,
        int n0, ScnnTiles<T> sh, T (&acc)[SCNN_TRM][SCNN_TRN]) {
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * SCNN_TTX + tx;
    const int nthreads = SCNN_TTX * SCNN_TTY;
    const long long wk_stride = (long long)c_red * c_out;
    __syncthreads();  // the caller's sh.rs is complete
    for (int k = 0; k < K; ++k) {
        for (int r = tid; r < SCNN_TBM; r += nthreads) {
            const int o = sh.rs[r];
            sh.rw[r] = o >= 0 ? win[(long long)o * K + k] : -1;
        }
        __syncthreads();  // the window column is complete
        bool any = false;
        for (int r = 0; r < SCNN_TBM; ++r) any = any || sh.rw[r] >= 0;
        bool present[SCNN_TRM];
        for (int i = 0; i < SCNN_TRM; ++i) present[i] = sh.rw[ty + SCNN_TTY * i] >= 0;
        if (any) {  // block-uniform: every thread read the same column
            const T* wk = w + (long long)k * wk_stride;
            for (int c0 = 0; c0 < c_red; c0 += SCNN_TBK) {
                const int kw = min(SCNN_TBK, c_red - c0);
                for (int e = tid; e < SCNN_TBM * SCNN_TBK; e += nthreads) {
                    const int r = e / SCNN_TBK, kk = e - r * SCNN_TBK;
                    const int src = sh.rw[r];
                    T v = T(0);
                    if (src >= 0 && kk < kw) {
                        v = a_rows[(long long)src * c_red + c0 + kk];
                        if (SUB) v = v - g[c0 + kk];
                    }
                    sh.as[kk * SCNN_TBM + r] = v;
                }
                for (int e = tid; e < SCNN_TBK * SCNN_TBN; e += nthreads) {
                    int kk, nn;
                    if (TRANS) {  // w[k, nc, rc]: consecutive threads read consecutive rc
                        nn = e / SCNN_TBK;
                        kk = e - nn * SCNN_TBK;
                    } else {      // w[k, rc, nc]: consecutive threads read consecutive nc
                        kk = e / SCNN_TBN;
                        nn = e - kk * SCNN_TBN;
                    }
                    const int nc = n0 + nn;
                    T v = T(0);
                    if (kk < kw && nc < c_out)
                        v = TRANS ? wk[(long long)nc * c_red + c0 + kk]
                                  : wk[(long long)(c0 + kk) * c_out + nc];
                    sh.bs[kk * SCNN_TBN + nn] = v;
                }
                __syncthreads();  // both tiles are staged
                for (int kk = 0; kk < kw; ++kk) {
                    T av[SCNN_TRM], bv[SCNN_TRN];
                    for (int i = 0; i < SCNN_TRM; ++i) av[i] = sh.as[kk * SCNN_TBM + ty + SCNN_TTY * i];
                    for (int j = 0; j < SCNN_TRN; ++j) bv[j] = sh.bs[kk * SCNN_TBN + tx + SCNN_TTX * j];
                    for (int i = 0; i < SCNN_TRM; ++i) {
                        if (!present[i]) continue;
                        for (int j = 0; j < SCNN_TRN; ++j) acc[i][j] += av[i] * bv[j];
                    }
                }
                __syncthreads();  // done reading before the tiles are refilled
            }
        }
        __syncthreads();  // done reading the window column before the next offset's
    }
}

template <class T>
__device__ __forceinline__ void scnn_conv_fwd_tiled(const T* __restrict__ x,
                                                    const T* __restrict__ w,
                                                    const T* __restrict__ row,
                                                    const T* __restrict__ g,
                                                    const int* __restrict__ win,
                                                    long long n_out, int K, int cin, int cout,
                                                    T* __restrict__ out, ScnnTiles<T> sh) {
    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long m0 = (long long)blockIdx.x * SCNN_TBM;
    const int n0 = blockIdx.y * SCNN_TBN;
    for (int r = ty * SCNN_TTX + tx; r < SCNN_TBM; r += SCNN_TTX * SCNN_TTY)
        sh.rs[r] = m0 + r < n_out ? (int)(m0 + r) : -1;
    T acc[SCNN_TRM][SCNN_TRN];
    for (int j = 0; j < SCNN_TRN; ++j) {
        const int nc = n0 + tx + SCNN_TTX * j;
        const T start = nc < cout ? row[nc] : T(0);
        for (int i = 0; i < SCNN_TRM; ++i) acc[i][j] = start;
    }
    scnn_tile_accumulate<T, true, false>(x, w, g, win, K, cin, cout, n0, sh, acc);
    for (int i = 0; i < SCNN_TRM; ++i) {
        const long long o = m0 + ty + SCNN_TTY * i;
        if (o >= n_out) continue;
        for (int j = 0; j < SCNN_TRN; ++j) {
            const int nc = n0 + tx + SCNN_TTX * j;
            if (nc < cout) out[o * cout + nc] = acc[i][j];
        }
    }
}

// dgrad: the forward tile over the input window with the weight transposed; the sum starts
// from the first product (as the simple kernel: acc = 0 is replaced, not added to)
template <class T>
__device__ __forceinline__ void scnn_conv_dgrad_tiled(const T* __restrict__ gy,
                                                      const T* __restrict__ w,
                                                      const int* __restrict__ iwin,
                                                      long long n_in, int K, int cin,
                                                      int cout, T* __restrict__ gx,
                                                      ScnnTiles<T> sh) {
    const int tx = threadIdx.x, ty = threadIdx.y;
    const long long m0 = (long long)blockIdx.x * SCNN_TBM;
    const int n0 = blockIdx.y * SCNN_TBN;
    for (int r = ty * SCNN_TTX + tx; r < SCNN_TBM; r += SCNN_TTX * SCNN_TTY)
        sh.rs[r] = m0 + r < n_in ? (int)(m0 + r) : -1;
    // -0.0 as the start: -0.0 + p == p for every p (also p = -0.0), so the sum equals the
    // simple kernel's "first product, then add" exactly; a row without any product is +0
    T acc[SCNN_TRM][SCNN_TRN];
    for (int i = 0; i < SCNN_TRM; ++i)
        for (int j = 0; j < SCNN_TRN; ++j) acc[i][j] = -T(0);
    scnn_tile_accumulate<T, false, true>(gy, w, nullptr, iwin, K, cout, cin, n0, sh, acc);
    for (int i = 0; i < SCNN_TRM; ++i) {
        const long long r = m0 + ty + SCNN_TTY * i;
        if (r >= n_in) continue;
        bool hit = false;
        for (int k = 0; k < K; ++k) hit = hit || iwin[r * K + k] >= 0;
        hit = hit && cout > 0;
        for (int j = 0; j < SCNN_TRN; ++j) {
            const int nc = n0 + tx + SCNN_TTX * j;
            if (nc < cin) gx[r * cin + nc] = hit ? acc[i][j] : T(0);
        }
    }
}

// fused conv + max-pool: tile rows are the convolution rows of SCNN_TBM / K2 pool outputs'
// windows (pool window order); the tile's values go through shared memory to the pooling
template <class T>
__device__ __forceinline__ void scnn_conv_maxpool_tiled(
        const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ row,
        const T* __restrict__ g, const int* __restrict__ win, const int* __restrict__ pwin,
        const T* __restrict__ pool_ground, long long n_out, int K, int K2, int cin, int cout,
        int act, T a, T* __restrict__ out, int* __restrict__ argmax, ScnnTiles<T> sh,
        T* ct) {
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int per = SCNN_TBM / K2;  // pool outputs per block
    const long long p0 = (long long)blockIdx.x * per;
    const int n0 = blockIdx.y * SCNN_TBN;
    for (int r = ty * SCNN_TTX + tx; r < SCNN_TBM; r += SCNN_TTX * SCNN_TTY) {
        const long long p = p0 + r / K2;
        sh.rs[r] = (r < per * K2 && p < n_out) ? pwin[p * K2 + r % K2] : -1;
    }
    T acc[SCNN_TRM][SCNN_TRN];
    for (int j = 0; j < SCNN_TRN; ++j) {
        const int nc = n0 + tx + SCNN_TTX * j;
        const T start = nc < cout ? row[nc] : T(0);
        for (int i = 0; i < SCNN_TRM; ++i) acc[i][j] = start;
    }
    scnn_tile_accumulate<T, true, false>(x, w, g, win, K, cin, cout, n0, sh, acc);
    for (int i = 0; i < SCNN_TRM; ++i)
        for (int j = 0; j < SCNN_TRN; ++j)
            ct[(ty + SCNN_TTY * i) * SCNN_TBN + tx + SCNN_TTX * j] = acc[i][j];
    __syncthreads();  // the convolution tile is complete
    const int tid = ty * SCNN_TTX + tx;
    for (int e = tid; e < per * SCNN_TBN; e += SCNN_TTX * SCNN_TTY) {
        const int q = e / SCNN_TBN, nn = e - q * SCNN_TBN;
        const long long p = p0 + q;
        const int nc = n0 + nn;
        if (p >= n_out || nc >= cout) continue;
        const int* pw = pwin + p * K2;
        bool gap = false;
        for (int k2 = 0; k2 < K2; ++k2) gap = gap || pw[k2] < 0;
        T best = gap ? pool_ground[nc] : scnn_neg_inf<T>();
        int arg = -1;
        for (int k2 = 0; k2 < K2; ++k2) {
            const int o = pw[k2];
            if (o < 0) continue;
            const T v = ct[(q * K2 + k2) * SCNN_TBN + nn];
            if (v > best) {
                best = v;
                arg = o;
            }
        }
        if (act) best = best > a * best ? best : a * best;
        out[p * cout + nc] = best;
        argmax[p * cout + nc] = arg;
    }
}

// ------------------------------------------------------------------------------ entry points

extern "C" __global__ void scnn_conv_fwd_simple_f32(const float* __restrict__ x,
                                                    const float* __restrict__ w,
                                                    const float* __restrict__ row,
                                                    const float* __restrict__ g,
                                                    const int* __restrict__ win, long long n_out,
                                                    int K, int cin, int cout,
                                                    float* __restrict__ out) {
    scnn_conv_fwd_simple<float>(x, w, row, g, win, n_out, K, cin, cout, out);
}

extern "C" __global__ void scnn_conv_fwd_simple_f64(const double* __restrict__ x,
                                                    const double* __restrict__ w,
                                                    const double* __restrict__ row,
                                                    const double* __restrict__ g,
                                                    const int* __restrict__ win, long long n_out,
                                                    int K, int cin, int cout,
                                                    double* __restrict__ out) {
    scnn_conv_fwd_simple<double>(x, w, row, g, win, n_out, K, cin, cout, out);
}

extern "C" __global__ void scnn_conv_dgrad_simple_f32(const float* __restrict__ gy,
                                                      const float* __restrict__ w,
                                                      const int* __restrict__ iwin,
                                                      long long n_in, int K, int cin, int cout,
                                                      float* __restrict__ gx) {
    scnn_conv_dgrad_simple<float>(gy, w, iwin, n_in, K, cin, cout, gx);
}

extern "C" __global__ void scnn_conv_dgrad_simple_f64(const double* __restrict__ gy,
                                                      const double* __restrict__ w,
                                                      const int* __restrict__ iwin,
                                                      long long n_in, int K, int cin, int cout,
                                                      double* __restrict__ gx) {
    scnn_conv_dgrad_simple<double>(gy, w, iwin, n_in, K, cin, cout, gx);
}

extern "C" __global__ void scnn_conv_maxpool_simple_f32(
        const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ row,
        const float* __restrict__ g, const int* __restrict__ win, const int* __restrict__ pwin,
        const float* __restrict__ pool_ground, long long n_out, int K, int K2, int cin,
        int cout, int act, float a, float* __restrict__ out, int* __restrict__ argmax) {
    scnn_conv_maxpool_simple<float>(x, w, row, g, win, pwin, pool_ground, n_out, K, K2, cin,
                                    cout, act, a, out, argmax);
}

extern "C" __global__ void scnn_conv_maxpool_simple_f64(
        const double* __restrict__ x, const double* __restrict__ w,
        const double* __restrict__ row, const double* __restrict__ g,
        const int* __restrict__ win, const int* __restrict__ pwin,
        const double* __restrict__ pool_ground, long long n_out, int K, int K2, int cin,
        int cout, int act, double a, double* __restrict__ out, int* __restrict__ argmax) {
    scnn_conv_maxpool_simple<double>(x, w, row, g, win, pwin, pool_ground, n_out, K, K2, cin,
                                     cout, act, a, out, argmax);
}

extern "C" __global__ void scnn_conv_wgrad_partial_f32(
        const float* __restrict__ x, const float* __restrict__ g, const float* __restrict__ gy,
        const int* __restrict__ in_idx, const int* __restrict__ out_idx,
        const long long* __restrict__ offsets, int K, int S, int cin, int cout,
        float* __restrict__ partial) {
    scnn_conv_wgrad_partial<float>(x, g, gy, in_idx, out_idx, offsets, K, S, cin, cout,
                                   partial);
}

extern "C" __global__ void scnn_conv_wgrad_partial_f64(
        const double* __restrict__ x, const double* __restrict__ g,
        const double* __restrict__ gy, const int* __restrict__ in_idx,
        const int* __restrict__ out_idx, const long long* __restrict__ offsets, int K, int S,
        int cin, int cout, double* __restrict__ partial) {
    scnn_conv_wgrad_partial<double>(x, g, gy, in_idx, out_idx, offsets, K, S, cin, cout,
                                    partial);
}

extern "C" __global__ void scnn_conv_wgrad_reduce_f32(const float* __restrict__ partial, int K,
                                                      int S, long long E,
                                                      float* __restrict__ gw) {
    scnn_conv_wgrad_reduce<float>(partial, K, S, E, gw);
}

extern "C" __global__ void scnn_conv_wgrad_reduce_f64(const double* __restrict__ partial, int K,
                                                      int S, long long E,
                                                      double* __restrict__ gw) {
    scnn_conv_wgrad_reduce<double>(partial, K, S, E, gw);
}

extern "C" __global__ void scnn_conv_fwd_tiled_f32(const float* __restrict__ x,
                                                   const float* __restrict__ w,
                                                   const float* __restrict__ row,
                                                   const float* __restrict__ g,
                                                   const int* __restrict__ win, long long n_out,
                                                   int K, int cin, int cout,
                                                   float* __restrict__ out) {
    __shared__ float as[SCNN_TBK * SCNN_TBM];
    __shared__ float bs[SCNN_TBK * SCNN_TBN];
    __shared__ int rw[SCNN_TBM];
    __shared__ int rs[SCNN_TBM];
    scnn_conv_fwd_tiled<float>(x, w, row, g, win, n_out, K, cin, cout, out, {as, bs, rw, rs});
}

extern "C" __global__ void scnn_conv_fwd_tiled_f64(const double* __restrict__ x,
                                                   const double* __restrict__ w,
                                                   const double* __restrict__ row,
                                                   const double* __restrict__ g,
                                                   const int* __restrict__ win, long long n_out,
                                                   int K, int cin, int cout,
                                                   double* __restrict__ out) {
    __shared__ double as[SCNN_TBK * SCNN_TBM];
    __shared__ double bs[SCNN_TBK * SCNN_TBN];
    __shared__ int rw[SCNN_TBM];
    __shared__ int rs[SCNN_TBM];
    scnn_conv_fwd_tiled<double>(x, w, row, g, win, n_out, K, cin, cout, out, {as, bs, rw, rs});
}

extern "C" __global__ void scnn_conv_dgrad_tiled_f32(const float* __restrict__ gy,
                                                     const float* __restrict__ w,
                                                     const int* __restrict__ iwin,
                                                     long long n_in, int K, int cin, int cout,
                                                     float* __restrict__ gx) {
    __shared__ float as[SCNN_TBK * SCNN_TBM];
    __shared__ float bs[SCNN_TBK * SCNN_TBN];
    __shared__ int rw[SCNN_TBM];
    __shared__ int rs[SCNN_TBM];
    scnn_conv_dgrad_tiled<float>(gy, w, iwin, n_in, K, cin, cout, gx, {as, bs, rw, rs});
}

extern "C" __global__ void scnn_conv_dgrad_tiled_f64(const double* __restrict__ gy,
                                                     const double* __restrict__ w,
                                                     const int* __restrict__ iwin,
                                                     long long n_in, int K, int cin, int cout,
                                                     double* __restrict__ gx) {
    __shared__ double as[SCNN_TBK * SCNN_TBM];
    __shared__ double bs[SCNN_TBK * SCNN_TBN];
    __shared__ int rw[SCNN_TBM];
    __shared__ int rs[SCNN_TBM];
    scnn_conv_dgrad_tiled<double>(gy, w, iwin, n_in, K, cin, cout, gx, {as, bs, rw, rs});
}

extern "C" __global__ void scnn_conv_maxpool_tiled_f32(
        const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ row,
        const float* __restrict__ g, const int* __restrict__ win, const int* __restrict__ pwin,
        const float* __restrict__ pool_ground, long long n_out, int K, int K2, int cin,
        int cout, int act, float a, float* __restrict__ out, int* __restrict__ argmax) {
    __shared__ float as[SCNN_TBK * SCNN_TBM];
    __shared__ float bs[SCNN_TBK * SCNN_TBN];
    __shared__ int rw[SCNN_TBM];
    __shared__ int rs[SCNN_TBM];
    __shared__ float ct[SCNN_TBM * SCNN_TBN];
    scnn_conv_maxpool_tiled<float>(x, w, row, g, win, pwin, pool_ground, n_out, K, K2, cin,
                                   cout, act, a, out, argmax, {as, bs, rw, rs}, ct);
}

extern "C" __global__ void scnn_conv_maxpool_tiled_f64(
        const double* __restrict__ x, const double* __restrict__ w,
        const double* __restrict__ row, const double* __restrict__ g,
        const int* __restrict__ win, const int* __restrict__ pwin,
        const double* __restrict__ pool_ground, long long n_out, int K, int K2, int cin,
        int cout, int act, double a, double* __restrict__ out, int* __restrict__ argmax) {
    __shared__ double as[SCNN_TBK * SCNN_TBM];
    __shared__ double bs[SCNN_TBK * SCNN_TBN];
    __shared__ int rw[SCNN_TBM];
    __shared__ int rs[SCNN_TBM];
    __shared__ double ct[SCNN_TBM * SCNN_TBN];
    scnn_conv_maxpool_tiled<double>(x, w, row, g, win, pwin, pool_ground, n_out, K, K2, cin,
                                    cout, act, a, out, argmax, {as, bs, rw, rs}, ct);
}
