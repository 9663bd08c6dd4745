# Row operations on contiguous float/double rows, restrict-qualified so that gcc vectorises
# them without run-time aliasing checks (the callers never pass overlapping rows).
from cython cimport floating
from libc.math cimport INFINITY
from libc.stdint cimport int32_t


cdef extern from *:
    """
    #define SCN_ROW_OPS(T)                                                                \
    static inline void scn_axpy_##T(T a, const T *__restrict__ x, T *__restrict__ y,       \
                                    Py_ssize_t n) {                                       \
        for (Py_ssize_t j = 0; j < n; j++) y[j] += a * x[j];                              \
    }                                                                                     \
    static inline void scn_add_##T(const T *__restrict__ x, T *__restrict__ y,             \
                                   Py_ssize_t n) {                                        \
        for (Py_ssize_t j = 0; j < n; j++) y[j] += x[j];                                  \
    }                                                                                     \
    static inline void scn_sub_##T(const T *__restrict__ x, const T *__restrict__ g,       \
                                   T *__restrict__ y, Py_ssize_t n) {                     \
        for (Py_ssize_t j = 0; j < n; j++) y[j] = x[j] - g[j];                            \
    }
    SCN_ROW_OPS(float)
    SCN_ROW_OPS(double)
    """
    void scn_axpy_float(float a, const float* x, float* y, Py_ssize_t n) noexcept nogil
    void scn_axpy_double(double a, const double* x, double* y, Py_ssize_t n) noexcept nogil
    void scn_add_float(const float* x, float* y, Py_ssize_t n) noexcept nogil
    void scn_add_double(const double* x, double* y, Py_ssize_t n) noexcept nogil
    void scn_sub_float(const float* x, const float* g, float* y, Py_ssize_t n) noexcept nogil
    void scn_sub_double(const double* x, const double* g, double* y,
                        Py_ssize_t n) noexcept nogil


# Pooling rows: max with argmax, gradient routing, (leaky) ReLU and its gradient.
cdef extern from *:
    """
    /* out = max(out, x), arg = i where x won: branch-free, restrict-qualified so gcc
       vectorises it without a run-time aliasing check. */
    #define SCN_MAX_ROW(T)                                                               \
    static inline void scn_max_row_##T(const T *__restrict__ x, T *__restrict__ out,     \
                                       int32_t *__restrict__ arg, int32_t i, Py_ssize_t C) { \
        for (Py_ssize_t c = 0; c < C; c++) {                                             \
            T v = x[c], cur = out[c];                                                    \
            int32_t m = -(int32_t)(v > cur), a = arg[c];                                 \
            out[c] = v > cur ? v : cur;                                                  \
            arg[c] = (a & ~m) | (i & m);                                                 \
        }                                                                                \
    }                                                                                    \
    static inline void scn_route_row_##T(const T *__restrict__ gy,                       \
                                         const int32_t *__restrict__ arg,                \
                                         T *__restrict__ gx, int32_t i, Py_ssize_t C) {  \
        for (Py_ssize_t c = 0; c < C; c++)                                               \
            gx[c] = arg[c] == i ? gy[c] : (T)0;                                          \
    }                                                                                    \
    static inline void scn_leaky_row_##T(T *__restrict__ y, T a, Py_ssize_t C) {         \
        for (Py_ssize_t c = 0; c < C; c++)                                               \
            y[c] = y[c] > a * y[c] ? y[c] : a * y[c];                                    \
    }                                                                                    \
    /* gd = gy * (1 where y > 0, a elsewhere): the (leaky) ReLU's backward from its output */ \
    static inline void scn_leaky_grad_row_##T(const T *__restrict__ gy,                  \
                                              const T *__restrict__ y, T a,              \
                                              T *__restrict__ gd, Py_ssize_t C) {        \
        for (Py_ssize_t c = 0; c < C; c++)                                               \
            gd[c] = y[c] > 0 ? gy[c] : gy[c] * a;                                        \
    }                                                                                    \
    static inline void scn_max_row_backward_##T(const T *__restrict__ gy,                \
                                                const int32_t *__restrict__ arg,         \
                                                T *__restrict__ gx, int32_t i,           \
                                                Py_ssize_t C) {                          \
        for (Py_ssize_t c = 0; c < C; c++)                                               \
            gx[c] += gy[c] * (T)(arg[c] == i);                                           \
    }
    SCN_MAX_ROW(float)
    SCN_MAX_ROW(double)
    """
    void scn_max_row_float(const float* x, float* out, int32_t* arg, int32_t i,
                           Py_ssize_t C) noexcept nogil
    void scn_max_row_double(const double* x, double* out, int32_t* arg, int32_t i,
                            Py_ssize_t C) noexcept nogil
    void scn_max_row_backward_float(const float* gy, const int32_t* arg, float* gx, int32_t i,
                                    Py_ssize_t C) noexcept nogil
    void scn_route_row_float(const float* gy, const int32_t* arg, float* gx, int32_t i,
                             Py_ssize_t C) noexcept nogil
    void scn_leaky_row_float(float* y, float a, Py_ssize_t C) noexcept nogil
    void scn_leaky_row_double(double* y, double a, Py_ssize_t C) noexcept nogil
    void scn_leaky_grad_row_float(const float* gy, const float* y, float a, float* gd,
                                  Py_ssize_t C) noexcept nogil
    void scn_leaky_grad_row_double(const double* gy, const double* y, double a, double* gd,
                                   Py_ssize_t C) noexcept nogil
    void scn_route_row_double(const double* gy, const int32_t* arg, double* gx, int32_t i,
                              Py_ssize_t C) noexcept nogil
    void scn_max_row_backward_double(const double* gy, const int32_t* arg, double* gx,
                                     int32_t i, Py_ssize_t C) noexcept nogil


cdef inline void max_row(const floating* x, floating* out, int32_t* arg, int32_t i,
                         Py_ssize_t C) noexcept nogil:
    """out = max(out, x); arg = i where x won (ties keep the earlier candidate)"""
    if floating is float:
        scn_max_row_float(x, out, arg, i, C)
    else:
        scn_max_row_double(x, out, arg, i, C)


cdef inline void leaky_row(floating* y, floating a, Py_ssize_t C) noexcept nogil:
    """y = max(y, a y)"""
    if floating is float:
        scn_leaky_row_float(y, a, C)
    else:
        scn_leaky_row_double(y, a, C)


cdef inline void pool_row(const int32_t* cand, int K, const floating* rows, Py_ssize_t C,
                          const int32_t* label, const floating* ground, floating* out,
                          int32_t* arg, bint act, floating a) noexcept nogil:
    """One max-pooling output (C channels): the max over the candidates rows[cand[k]] (rows
    of C values; cand[k] < 0: that window position is inactive), and the ground if any is
    inactive, else -inf; arg = the winner's label (label[cand[k]], or cand[k] itself if label
    is NULL), -1 for the ground; then the (leaky) ReLU if act. Ties keep the earlier
    candidate: the ground, then k ascending."""
    cdef bint gap = False
    cdef int k
    cdef Py_ssize_t c
    cdef int32_t i
    for k in range(K):
        gap = gap or cand[k] < 0
    for c in range(C):
        out[c] = ground[c] if gap else -INFINITY
        arg[c] = -1
    for k in range(K):
        i = cand[k]
        if i >= 0:
            max_row(rows + <Py_ssize_t>i * C, out, arg, i if label == NULL else label[i], C)
    if act:
        leaky_row(out, a, C)
