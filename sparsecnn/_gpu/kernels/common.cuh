// Device helpers shared by the kernel files (included as "common.cuh"; the launcher adds the
// kernels folder to the include path, and the CUDA simulation's cache key covers this file).
//
// Portable subset of sparsecnn/_gpu/cuda_sim.h (the CPU simulation runs this file too).
#pragma once

// first index and step of a grid-stride loop over a flat 1-D index space
__device__ __forceinline__ long long scnn_gstart() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long scnn_gstep() {
    return (long long)gridDim.x * blockDim.x;
}

// -inf of T, from its bit pattern (no <limits> on the device)
template <class T>
__device__ __forceinline__ T scnn_neg_inf();
template <>
__device__ __forceinline__ float scnn_neg_inf<float>() {
    return __int_as_float(0xff800000u);
}
template <>
__device__ __forceinline__ double scnn_neg_inf<double>() {
    return __longlong_as_double((long long)0xfff0000000000000ull);
}
