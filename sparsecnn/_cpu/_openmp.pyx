"""OpenMP facts for `sparsecnn info` and the benchmarks."""

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int scn_use_openmp(void) { return 1; }
    static int scn_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int scn_use_openmp(void) { return 0; }
    static int scn_max_threads(void) { return 1; }
    #endif
    """
    int scn_use_openmp() nogil
    int scn_max_threads() nogil

USE_OPENMP = bool(scn_use_openmp())


def max_threads():
    """Threads an OpenMP parallel region would use now (1 without OpenMP)."""
    return scn_max_threads()
