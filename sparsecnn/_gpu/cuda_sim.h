// cuda_sim.h: run sparsecnn's CUDA kernels on the CPU (SPARSECNN_CUDA_SIM=1).
//
// sparsecnn/_gpu/_launch.py compiles a kernel file with the host C++ compiler as
//
//     g++ -std=c++17 -O2 -fopenmp -shared -fPIC wrapper.cpp     (wrapper.cpp is generated:)
//         #include "cuda_sim.h"
//         #include "kernels/<file>.cu"
//         SCNN_SIM_EXPORT(<kernel>) ...                      (one line per extern "C" kernel)
//
// and calls scnn_sim_launch_<kernel>(grid, block, args, reverse, err, errlen) through ctypes;
// args[i] points at the i-th argument's value, as in cuLaunchKernel's kernelParams.
//
// Execution model.
// - Blocks are spread over the OpenMP threads (schedule(dynamic, 1)), so blocks really run
//   at the same time and their atomics on global memory really contend.
// - The threads of a block are fibers on the one OS thread that runs the block: ucontext
//   stacks (64 KiB each by default, SPARSECNN_CUDA_SIM_STACK_KB, with a guard page), started
//   once with setcontext and then switched with _setjmp/_longjmp (no system call per switch).
//   A fiber runs until it reaches __syncthreads() or leaves the kernel; when every live
//   thread of the block waits at the barrier, all are released. Threads that have left the
//   kernel no longer count (as on current GPUs).
// - `reverse` (SPARSECNN_CUDA_SIM_REVERSE=1 on the Python side) hands out the blocks from the
//   last to the first and resumes the fibers of a block from the last thread to the first.
//   Tests run each kernel both ways and require identical results: a missing barrier or a
//   read of another thread's unfinished work then shows up as a difference.
// - __shared__ is `static thread_local`: one copy per OS thread, which is one copy per block
//   because a block never leaves its OS thread. It is not cleared between blocks.
// - Atomics are the compiler's __atomic builtins, relaxed like CUDA's; float and double
//   atomicAdd (and the 64-bit min/max) are compare-and-swap loops on the bit pattern. Only
//   the overloads CUDA has exist (e.g. atomicCAS on int, unsigned, unsigned long long).
// - Errors (bad launch configuration, threads waiting at different __syncthreads() calls)
//   are reported to the caller, which raises; the launch stops at the next block.
//
// The portable subset: kernels that meet these rules compile unchanged with NVRTC/nvcc and
// here, and behave the same (up to float summation order where a kernel leaves it open).
// - Entry points are `extern "C" __global__ void name(...)`, spelled out one per dtype
//   (no macro, no templates at the entry: the launcher reads their parameter lists); they may
//   call templated __device__ functions. Parameters: pointers to, or values of, int,
//   unsigned, long long, unsigned long long, float, double (32/64-bit integer typedefs too).
// - Shared memory: static `__shared__` arrays declared at kernel scope (pass pointers to
//   device functions). No dynamic (extern) shared memory yet.
// - Every __syncthreads() is reached by all threads of the block that have not returned,
//   at the same call; threads may return early (`if (i >= n) return;`) and then never
//   take part in a barrier again.
// - No warp-synchronous code: no warp shuffles/votes/__syncwarp, no reliance on lockstep.
// - No inter-block waiting (spin on a flag another block sets, "last block" patterns): use
//   two kernels. No __threadfence-dependent protocols: the CPU's memory model is stronger.
// - No inline PTX, textures, cooperative groups, CUB, half types, printf.
#pragma once

#ifndef _OPENMP
#error "cuda_sim.h needs OpenMP (-fopenmp): blocks run on OpenMP threads"
#endif

#include <omp.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __syncthreads() ::scnn_sim::barrier(__FILE__, __LINE__)

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
constexpr int warpSize = 32;

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// ---- device functions CUDA provides ------------------------------------------------------
__device__ inline int min(int a, int b) { return a < b ? a : b; }
__device__ inline int max(int a, int b) { return a > b ? a : b; }
__device__ inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
__device__ inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
__device__ inline long long min(long long a, long long b) { return a < b ? a : b; }
__device__ inline long long max(long long a, long long b) { return a > b ? a : b; }
__device__ inline unsigned long long min(unsigned long long a, unsigned long long b) {
    return a < b ? a : b;
}
__device__ inline unsigned long long max(unsigned long long a, unsigned long long b) {
    return a > b ? a : b;
}
__device__ inline float min(float a, float b) { return fminf(a, b); }
__device__ inline float max(float a, float b) { return fmaxf(a, b); }
__device__ inline double min(double a, double b) { return fmin(a, b); }
__device__ inline double max(double a, double b) { return fmax(a, b); }
template <class T>
__device__ inline T __ldg(const T* p) { return *p; }
__device__ inline int __popc(unsigned x) { return __builtin_popcount(x); }
__device__ inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
__device__ inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
__device__ inline int __clzll(long long x) {
    return x == 0 ? 64 : __builtin_clzll((unsigned long long)x);
}
__device__ inline int __ffs(int x) { return __builtin_ffs(x); }
__device__ inline int __ffsll(long long x) { return __builtin_ffsll(x); }
__device__ inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
__device__ inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
__device__ inline long long __double_as_longlong(double d) {
    long long i; std::memcpy(&i, &d, 8); return i;
}
__device__ inline double __longlong_as_double(long long i) {
    double d; std::memcpy(&d, &i, 8); return d;
}
__device__ inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
__device__ inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- atomics: the overloads of CUDA (sm_60+), relaxed ------------------------------------
#define SCNN_SIM_RLX __ATOMIC_RELAXED
#define SCNN_SIM_FETCH(fn, op, T) \
    __device__ inline T fn(T* p, T v) { return __atomic_fetch_##op(p, v, SCNN_SIM_RLX); }
SCNN_SIM_FETCH(atomicAdd, add, int)
SCNN_SIM_FETCH(atomicAdd, add, unsigned)
SCNN_SIM_FETCH(atomicAdd, add, unsigned long long)
SCNN_SIM_FETCH(atomicSub, sub, int)
SCNN_SIM_FETCH(atomicSub, sub, unsigned)
SCNN_SIM_FETCH(atomicAnd, and, int)
SCNN_SIM_FETCH(atomicAnd, and, unsigned)
SCNN_SIM_FETCH(atomicAnd, and, unsigned long long)
SCNN_SIM_FETCH(atomicOr, or, int)
SCNN_SIM_FETCH(atomicOr, or, unsigned)
SCNN_SIM_FETCH(atomicOr, or, unsigned long long)
SCNN_SIM_FETCH(atomicXor, xor, int)
SCNN_SIM_FETCH(atomicXor, xor, unsigned)
SCNN_SIM_FETCH(atomicXor, xor, unsigned long long)
#undef SCNN_SIM_FETCH

#define SCNN_SIM_EXCH(T) \
    __device__ inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, SCNN_SIM_RLX); }
SCNN_SIM_EXCH(int)
SCNN_SIM_EXCH(unsigned)
SCNN_SIM_EXCH(unsigned long long)
#undef SCNN_SIM_EXCH

#define SCNN_SIM_CAS(T)                                                            \
    __device__ inline T atomicCAS(T* p, T cmp, T v) {                              \
        __atomic_compare_exchange_n(p, &cmp, v, false, SCNN_SIM_RLX, SCNN_SIM_RLX); \
        return cmp; /* the old value: a failed exchange stores it into cmp */      \
    }
SCNN_SIM_CAS(int)
SCNN_SIM_CAS(unsigned)
SCNN_SIM_CAS(unsigned long long)
SCNN_SIM_CAS(unsigned short)
#undef SCNN_SIM_CAS

namespace scnn_sim {
// Replace *p by f(*p) atomically, through the bit pattern U of T; returns the old value.
template <class T, class U, class F>
inline T cas_update(T* p, F f) {
    static_assert(sizeof(T) == sizeof(U), "bit pattern of the same size");
    U* q = reinterpret_cast<U*>(p);
    U old = __atomic_load_n(q, SCNN_SIM_RLX);
    for (;;) {
        T a, b;
        std::memcpy(&a, &old, sizeof a);
        b = f(a);
        U nu;
        std::memcpy(&nu, &b, sizeof nu);
        if (__atomic_compare_exchange_n(q, &old, nu, true, SCNN_SIM_RLX, SCNN_SIM_RLX)) return a;
    }
}
}  // namespace scnn_sim

__device__ inline float atomicAdd(float* p, float v) {
    return scnn_sim::cas_update<float, uint32_t>(p, [v](float a) { return a + v; });
}
__device__ inline double atomicAdd(double* p, double v) {
    return scnn_sim::cas_update<double, uint64_t>(p, [v](double a) { return a + v; });
}
__device__ inline float atomicExch(float* p, float v) {
    return scnn_sim::cas_update<float, uint32_t>(p, [v](float) { return v; });
}
#define SCNN_SIM_MINMAX(T, U)                                                            \
    __device__ inline T atomicMin(T* p, T v) {                                           \
        return scnn_sim::cas_update<T, U>(p, [v](T a) { return v < a ? v : a; });        \
    }                                                                                    \
    __device__ inline T atomicMax(T* p, T v) {                                           \
        return scnn_sim::cas_update<T, U>(p, [v](T a) { return v > a ? v : a; });        \
    }
SCNN_SIM_MINMAX(int, uint32_t)
SCNN_SIM_MINMAX(unsigned, uint32_t)
SCNN_SIM_MINMAX(long long, uint64_t)
SCNN_SIM_MINMAX(unsigned long long, uint64_t)
#undef SCNN_SIM_MINMAX

// ---- the runtime: fibers per block, blocks over OpenMP threads ---------------------------
namespace scnn_sim {

enum State { RUNNABLE = 0, AT_BARRIER = 1, DONE = 2 };

struct Fiber {
    jmp_buf jb;            // where the fiber waits (a barrier, or idle between threads)
    ucontext_t uc;         // only to start the fiber on its own stack
    char* mem = nullptr;   // guard page + stack
    size_t mem_size = 0;
    bool started = false;
    int state = DONE;
    const char* file = nullptr;  // the __syncthreads() the fiber waits at
    int line = 0;
};

struct Launch {
    void (*tramp)(void*);  // calls the kernel with the unpacked arguments
    void* ctx;
    dim3 grid, block;
    int reverse;
    std::atomic<int> failed{0};
    char err[512];
};

struct Worker {
    jmp_buf sched;
    Fiber* fibers = nullptr;
    unsigned n_fibers = 0;
    Fiber* cur = nullptr;
    const Launch* launch = nullptr;
    char err[400];
    ~Worker() {
        for (unsigned i = 0; i < n_fibers; ++i) munmap(fibers[i].mem, fibers[i].mem_size);
        delete[] fibers;
    }
};

inline thread_local Worker worker;

inline void fail(Launch& L, const char* msg) {
    if (L.failed.exchange(1) == 0) {
        std::snprintf(L.err, sizeof L.err, "%s", msg);
    }
}

inline size_t stack_bytes() {
    static size_t bytes = [] {
        const char* s = std::getenv("SPARSECNN_CUDA_SIM_STACK_KB");
        long kb = s ? std::atol(s) : 64;
        if (kb < 16) kb = 16;
        return (size_t)kb * 1024;
    }();
    return bytes;
}

// The body of every fiber: run CUDA threads, one after another, for as long as it lives.
inline void fiber_main() {
    for (;;) {
        worker.launch->tramp(worker.launch->ctx);
        Fiber* f = worker.cur;
        f->state = DONE;
        if (!_setjmp(f->jb)) _longjmp(worker.sched, 1);
        // resumed by run_block for the next CUDA thread
    }
}

// __syncthreads(): wait here until every live thread of the block has arrived.
inline void barrier(const char* file, int line) {
    Fiber* f = worker.cur;
    if (f == nullptr) {
        std::fprintf(stderr, "cuda_sim: __syncthreads() outside a kernel launch\n");
        std::abort();
    }
    f->state = AT_BARRIER;
    f->file = file;
    f->line = line;
    if (!_setjmp(f->jb)) _longjmp(worker.sched, 1);
}

inline bool grow_fibers(unsigned n) {
    Worker& w = worker;
    if (n <= w.n_fibers) return true;
    Fiber* nf = new Fiber[n];
    for (unsigned i = 0; i < w.n_fibers; ++i) {
        // a fiber that was started keeps its stack; its jmp_buf stays valid (same stack)
        std::memcpy(static_cast<void*>(&nf[i]), static_cast<void*>(&w.fibers[i]), sizeof(Fiber));
    }
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t bytes = (stack_bytes() + page - 1) / page * page + page;
    for (unsigned i = w.n_fibers; i < n; ++i) {
        void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            for (unsigned j = w.n_fibers; j < i; ++j) munmap(nf[j].mem, nf[j].mem_size);
            delete[] nf;
            return false;
        }
        mprotect(m, page, PROT_NONE);  // guard page: a stack overflow faults, not corrupts
        nf[i].mem = static_cast<char*>(m);
        nf[i].mem_size = bytes;
        nf[i].started = false;
    }
    delete[] w.fibers;
    w.fibers = nf;
    w.n_fibers = n;
    return true;
}

inline void start_fiber(Fiber* f) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->mem + page;
    f->uc.uc_stack.ss_size = f->mem_size - page;
    f->uc.uc_link = nullptr;
    makecontext(&f->uc, fiber_main, 0);
    f->started = true;
    setcontext(&f->uc);
}

// Run block `b` (linear index, x fastest) to the end; false (with L.err set) on an error.
inline bool run_block(Launch& L, long long b) {
    Worker& w = worker;
    const dim3 g = L.grid, bd = L.block;
    blockIdx.x = (unsigned)(b % g.x);
    blockIdx.y = (unsigned)((b / g.x) % g.y);
    blockIdx.z = (unsigned)(b / ((long long)g.x * g.y));
    const unsigned n = bd.x * bd.y * bd.z;
    if (!grow_fibers(n)) {
        fail(L, "cuda_sim: cannot allocate fiber stacks");
        return false;
    }
    for (unsigned t = 0; t < n; ++t) w.fibers[t].state = RUNNABLE;
    unsigned live = n;
    while (live > 0) {
        for (unsigned k = 0; k < n; ++k) {
            const unsigned t = L.reverse ? n - 1 - k : k;
            Fiber* f = &w.fibers[t];
            if (f->state == DONE) continue;
            f->state = RUNNABLE;
            threadIdx.x = t % bd.x;
            threadIdx.y = (t / bd.x) % bd.y;
            threadIdx.z = t / (bd.x * bd.y);
            w.cur = f;
            if (!_setjmp(w.sched)) {
                if (!f->started) start_fiber(f);
                _longjmp(f->jb, 1);
            }
            w.cur = nullptr;
        }
        // every fiber now waits at a barrier or is done
        live = 0;
        const Fiber* first = nullptr;
        for (unsigned t = 0; t < n; ++t) {
            const Fiber* f = &w.fibers[t];
            if (f->state != AT_BARRIER) continue;
            ++live;
            if (first == nullptr) {
                first = f;
            } else if (f->line != first->line || std::strcmp(f->file, first->file) != 0) {
                std::snprintf(w.err, sizeof w.err,
                              "cuda_sim: block (%u,%u,%u): threads wait at different "
                              "__syncthreads() calls (%s:%d and %s:%d)",
                              blockIdx.x, blockIdx.y, blockIdx.z, first->file, first->line,
                              f->file, f->line);
                fail(L, w.err);
                // abandon the block: its suspended fibers start afresh next time
                for (unsigned u = 0; u < n; ++u) {
                    if (w.fibers[u].state != DONE) w.fibers[u].started = false;
                    w.fibers[u].state = DONE;
                }
                return false;
            }
        }
    }
    return true;
}

inline int launch(Launch& L, const unsigned* grid, const unsigned* block, int reverse,
                  char* err, int errlen) {
    L.grid = dim3(grid[0], grid[1], grid[2]);
    L.block = dim3(block[0], block[1], block[2]);
    L.reverse = reverse;
    const unsigned long long nthreads = (unsigned long long)block[0] * block[1] * block[2];
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || nthreads == 0 || nthreads > 1024 ||
        block[2] > 64 || grid[1] > 65535 || grid[2] > 65535 || grid[0] > 2147483647u) {
        std::snprintf(err, (size_t)errlen,
                      "cuda_sim: invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u)",
                      grid[0], grid[1], grid[2], block[0], block[1], block[2]);
        return 1;
    }
    const long long nblocks = (long long)grid[0] * grid[1] * grid[2];
#pragma omp parallel if (nblocks > 1)
    {
        Worker& w = worker;
        w.launch = &L;
        blockDim = L.block;
        gridDim = L.grid;
#pragma omp for schedule(dynamic, 1)
        for (long long i = 0; i < nblocks; ++i) {
            if (L.failed.load(std::memory_order_relaxed)) continue;
            run_block(L, L.reverse ? nblocks - 1 - i : i);
        }
        w.launch = nullptr;
    }
    if (L.failed.load()) {
        std::snprintf(err, (size_t)errlen, "%s", L.err);
        return 1;
    }
    return 0;
}

// ---- calling a kernel with type-erased arguments ----------------------------------------
template <class... A>
struct Call {
    void (*kernel)(A...);
    void** args;
};

template <class... A, size_t... I>
inline void call_unpacked(const Call<A...>* c, std::index_sequence<I...>) {
    c->kernel(*static_cast<std::remove_cv_t<A>*>(c->args[I])...);
}

template <class... A>
inline void trampoline(void* p) {
    call_unpacked(static_cast<const Call<A...>*>(p), std::index_sequence_for<A...>{});
}

template <class... A>
inline int launch_kernel(void (*kernel)(A...), const unsigned* grid, const unsigned* block,
                         void** args, int reverse, char* err, int errlen) {
    Call<A...> call{kernel, args};
    Launch L;
    L.tramp = &trampoline<A...>;
    L.ctx = &call;
    return launch(L, grid, block, reverse, err, errlen);
}

// Kind of a parameter's scalar (the value, or what a pointer points at).
template <class T>
constexpr int kind_of() {
    using U = std::remove_cv_t<T>;
    return std::is_same_v<U, bool>      ? 4
           : std::is_floating_point_v<U> ? 3
           : std::is_unsigned_v<U>       ? 2
           : std::is_integral_v<U>       ? 1
                                         : 0;
}

template <class T>
inline void describe(int* row) {
    using P = std::remove_pointer_t<T>;
    row[0] = (int)sizeof(T);
    row[1] = std::is_pointer_v<T> ? 1 : 0;
    row[2] = std::is_pointer_v<T> ? kind_of<P>() : kind_of<T>();
    row[3] = std::is_pointer_v<T> ? (std::is_void_v<P> ? 0 : (int)sizeof(P)) : (int)sizeof(T);
    row[4] = std::is_pointer_v<T> && std::is_const_v<P> ? 1 : 0;
}

// Five ints per parameter: size, is_pointer, kind (1 int, 2 unsigned, 3 float, 4 bool),
// size of the scalar, pointee is const. Returns the number of parameters.
template <class... A>
inline int arginfo(void (*)(A...), int* info, int max_params) {
    constexpr int n = (int)sizeof...(A);
    if (n <= max_params) {
        int i = 0;
        ((describe<A>(info + 5 * i), ++i), ...);
    }
    return n;
}

}  // namespace scnn_sim

#define SCNN_SIM_EXPORT(name)                                                                  \
    extern "C" int scnn_sim_launch_##name(const unsigned* grid, const unsigned* block,         \
                                          void** args, int reverse, char* err, int errlen) {   \
        return ::scnn_sim::launch_kernel(&name, grid, block, args, reverse, err, errlen);      \
    }                                                                                          \
    extern "C" int scnn_sim_arginfo_##name(int* info, int max_params) {                        \
        return ::scnn_sim::arginfo(&name, info, max_params);                                   \
    }
