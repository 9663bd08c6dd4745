# An explicit OpenMP barrier for use inside ``with parallel():`` blocks.
#
# Cython emits ``#pragma omp for nowait`` for a prange inside a parallel block, so there is
# NO barrier between two such loops: a thread that runs out of work in one loop starts the
# next while others are still in the first. Where a loop reads what the previous one wrote
# (or both scatter into the same rows), call ``barrier()`` between them. Every thread of the
# team must reach it. Without OpenMP it does nothing.
cdef extern from *:
    """
    static inline void scn_omp_barrier(void) {
    #ifdef _OPENMP
    #pragma omp barrier
    #endif
    }
    """
    void barrier "scn_omp_barrier" () noexcept nogil
