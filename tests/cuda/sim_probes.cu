// Test-only kernels for tests/test_cuda_sim.py: they probe the CUDA simulation (barriers,
// shared memory, atomics, error reports) and include deliberate bugs the tests must catch.
// Valid CUDA: tests/test_cuda_compile.py compiles this file too.

// Block sum of x by a shared-memory tree reduction (blockDim.x a power of two <= 1024),
// one result per block; threads past n contribute 0 but take part in every barrier.
// skip_barrier != 0 removes the barrier between the levels: a race a GPU would show.
extern "C" __global__ void probe_tree_sum(const int* __restrict__ x, int n, int skip_barrier,
                                          int* __restrict__ out) {
    __shared__ int s[1024];
    const int t = threadIdx.x;
    const int i = blockIdx.x * blockDim.x + t;
    s[t] = i < n ? x[i] : 0;
    __syncthreads();
    for (int h = blockDim.x / 2; h > 0; h >>= 1) {
        if (t < h) s[t] += s[t + h];
        if (!skip_barrier) __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = s[0];
}

// Threads past n return before the barrier (allowed: exited threads do not count), the others
// pass a value to their left neighbour through shared memory.
extern "C" __global__ void probe_early_exit(const int* __restrict__ x, int n,
                                            int* __restrict__ out) {
    __shared__ int s[1024];
    const int t = threadIdx.x;
    const int i = blockIdx.x * blockDim.x + t;
    if (i >= n) return;
    s[t] = x[i];
    __syncthreads();
    const int j = t + 1 < (int)blockDim.x && i + 1 < n ? t + 1 : t;
    out[i] = s[j];
}

// Every thread writes the same cell: the last writer wins (an inter-thread race).
extern "C" __global__ void probe_last_writer(int* out) {
    out[0] = blockIdx.x * blockDim.x + threadIdx.x;
}

// Half the block waits at one __syncthreads(), half at another: undefined in CUDA.
extern "C" __global__ void probe_divergent_barrier(int* out) {
    if (threadIdx.x < blockDim.x / 2) {
        __syncthreads();
        out[threadIdx.x] = 1;
    } else {
        __syncthreads();
        out[threadIdx.x] = 2;
    }
}

// Indices of all three dimensions, written per thread.
extern "C" __global__ void probe_indices(int* __restrict__ out) {
    const int tpb = blockDim.x * blockDim.y * blockDim.z;
    const int b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const int t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    int* o = out + 6 * (b * tpb + t);
    o[0] = blockIdx.x; o[1] = blockIdx.y; o[2] = blockIdx.z;
    o[3] = threadIdx.x; o[4] = threadIdx.y; o[5] = threadIdx.z;
}

// Every atomic the simulation provides, on cells shared by all threads: thread i contributes
// v = x[i] (small non-negative integers, so float sums are exact in any order).
extern "C" __global__ void probe_atomics(const int* __restrict__ x, int n, int* ci,
                                         unsigned* cu, unsigned long long* cull, long long* cll,
                                         float* cf, double* cd, int* owner) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int v = x[i];
    atomicAdd(ci + 0, v);
    atomicSub(ci + 1, v);
    atomicMin(ci + 2, v);
    atomicMax(ci + 3, v);
    atomicOr(ci + 4, 1 << (v & 31));
    atomicAdd(cu + 0, (unsigned)v);
    atomicMin(cu + 1, (unsigned)v);
    atomicMax(cu + 2, (unsigned)v);
    atomicAdd(cull + 0, (unsigned long long)v << 33);
    atomicMin(cull + 1, (unsigned long long)v << 33);
    atomicMax(cull + 2, (unsigned long long)v << 33);
    atomicMin(cll + 0, -((long long)v << 33));
    atomicMax(cll + 1, -((long long)v << 33));
    atomicAdd(cf, (float)v);
    atomicAdd(cd, (double)v);
    // one winner per slot v % 8: the first thread whose CAS sees -1
    atomicCAS(owner + (v & 7), -1, i);
    atomicExch(ci + 5, 7);
}
