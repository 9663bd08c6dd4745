# Row-major GEMM on raw pointers over scipy.linalg.cython_blas (column-major BLAS).
# A row-major matrix read as column-major is its transpose, so C = A @ B (row-major) is the
# column-major product C^T = B^T A^T: swap the operands and the sizes.
from cython cimport floating
from scipy.linalg.cython_blas cimport dgemm, sgemm


cdef inline void _gemm(char ta, char tb, int m, int n, int k, floating alpha,
                       const floating* a, int lda, const floating* b, int ldb,
                       floating beta, floating* c, int ldc) noexcept nogil:
    """Column-major C(m, n) = alpha op(A) op(B) + beta C."""
    if floating is float:
        sgemm(&ta, &tb, &m, &n, &k, &alpha, <float*>a, &lda, <float*>b, &ldb, &beta, c, &ldc)
    else:
        dgemm(&ta, &tb, &m, &n, &k, &alpha, <double*>a, &lda, <double*>b, &ldb, &beta, c, &ldc)


cdef inline void _gemm_nn(int m, int n, int k, const floating* a, const floating* b,
                          floating beta, floating* c) noexcept nogil:
    """Row-major, contiguous: C(m, n) = A(m, k) @ B(k, n) + beta C."""
    _gemm(c'N', c'N', n, m, k, <floating>1, b, n, a, k, beta, c, n)


cdef inline void _gemm_nt(int m, int n, int k, const floating* a, const floating* b,
                          floating beta, floating* c) noexcept nogil:
    """Row-major, contiguous: C(m, n) = A(m, k) @ B(n, k)^T + beta C."""
    _gemm(c'T', c'N', n, m, k, <floating>1, b, k, a, k, beta, c, n)


cdef inline void _gemm_tn(int m, int n, int k, const floating* a, const floating* b,
                          floating beta, floating* c) noexcept nogil:
    """Row-major, contiguous: C(m, n) = A(k, m)^T @ B(k, n) + beta C."""
    _gemm(c'N', c'T', n, m, k, <floating>1, b, n, a, m, beta, c, n)
