# Checked scratch allocation for the kernels, with a test hook.
#
# scn_malloc / scn_calloc are malloc / calloc that never ask for 0 bytes (malloc(0) may return
# NULL) and that fail on purpose when the test hook says so: scn_fail_alloc(n) makes the n-th
# allocation from now (in this extension module) return NULL, so that a test can walk every
# allocation site of a kernel and see it raise MemoryError. Every caller checks for NULL.
cdef extern from *:
    """
    #include <stdlib.h>
    static long scn_alloc_countdown = 0;
    static inline int scn_alloc_fails(void) {
        return scn_alloc_countdown > 0
               && __atomic_sub_fetch(&scn_alloc_countdown, 1, __ATOMIC_RELAXED) == 0;
    }
    static inline void *scn_malloc(size_t n) {
        return scn_alloc_fails() ? NULL : malloc(n ? n : 1);
    }
    static inline void *scn_calloc(size_t n, size_t size) {
        return scn_alloc_fails() ? NULL : calloc(n ? n : 1, size ? size : 1);
    }
    static inline void scn_fail_alloc(long nth) { scn_alloc_countdown = nth; }
    static inline long scn_alloc_pending(void) { return scn_alloc_countdown; }
    """
    void* scn_malloc(size_t n) noexcept nogil
    void* scn_calloc(size_t n, size_t size) noexcept nogil
    void scn_fail_alloc(long nth) noexcept nogil
    long scn_alloc_pending() noexcept nogil
