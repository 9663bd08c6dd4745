# Row operations on contiguous float/double rows, restrict-qualified so that gcc vectorises
# them without run-time aliasing checks (the callers never pass overlapping rows).
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
