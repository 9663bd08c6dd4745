// Window tables of a rulebook (the pairs grouped by output, or by input), and per-row counts.
//
// Same result as sparsecnn._cpu.build_window: window[o, k] = the input row paired with output
// o at offset k, or -1 (that window position is inactive). With in_idx and out_idx swapped
// (and n_in rows) it groups the pairs by input: the (n_in, K) input window.
//   scnn_window_fill     win[t] = -1 for t < n (grid-stride)
//   scnn_window_scatter  one thread per pair p: k = the offset whose CSR range holds p (binary
//                        search of `offsets`), win[out_idx[p] * K + k] = in_idx[p]. Within one
//                        offset a row occurs at most once, so every pair has its own slot: no
//                        races, and the result does not depend on the schedule.
//   scnn_window_count    count[o] = number of entries >= 0 in row o (active sites of a window)
// Integers only; 64-bit index arithmetic throughout. Launch each with any 1-D grid/block
// (grid-stride loops).
//
// Portable subset of sparsecnn/_gpu/cuda_sim.h (the CPU simulation runs this file too).

#include "common.cuh"

extern "C" __global__ void scnn_window_fill(int* __restrict__ win, long long n) {
    for (long long t = scnn_gstart(); t < n; t += scnn_gstep()) win[t] = -1;
}

extern "C" __global__ void scnn_window_scatter(const int* __restrict__ in_idx,
                                               const int* __restrict__ out_idx,
                                               const long long* __restrict__ offsets, int K,
                                               long long P, int* __restrict__ win) {
    for (long long p = scnn_gstart(); p < P; p += scnn_gstep()) {
        int lo = 0, hi = K;  // the last k with offsets[k] <= p: offsets[lo] <= p < offsets[hi]
        while (hi - lo > 1) {
            const int mid = lo + (hi - lo) / 2;
            if (offsets[mid] <= p) lo = mid; else hi = mid;
        }
        win[(long long)out_idx[p] * K + lo] = in_idx[p];
    }
}

extern "C" __global__ void scnn_window_count(const int* __restrict__ win, long long n, int K,
                                             int* __restrict__ count) {
    for (long long o = scnn_gstart(); o < n; o += scnn_gstep()) {
        const int* w = win + o * K;
        int c = 0;
        for (int k = 0; k < K; ++k) c += w[k] >= 0;
        count[o] = c;
    }
}
