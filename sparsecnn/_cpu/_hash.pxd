# Open-addressing hash table on packed int64 coordinate keys (linear probing).
#
# A table is two arrays of the same power-of-two capacity: keys (int64, -1 = empty) and
# vals (int32, the row of the site).  Keys pack (batch, c_0, ..., c_{d-1}) in row-major order
# over (batch_size, *spatial_shape); the Python side checks that this cannot overflow.
from libc.stdint cimport int32_t, int64_t, uint64_t


cdef inline Py_ssize_t _slot(int64_t key, int shift) noexcept nogil:
    """Fibonacci hashing: the top bits of key * 2^64/phi."""
    return <Py_ssize_t>((<uint64_t>key * <uint64_t>0x9E3779B97F4A7C15ULL) >> shift)


cdef inline int32_t _lookup(const int64_t* keys, const int32_t* vals, Py_ssize_t mask,
                            int shift, int64_t key) noexcept nogil:
    """Row stored under key, or -1."""
    cdef Py_ssize_t h = _slot(key, shift)
    while True:
        if keys[h] == key:
            return vals[h]
        if keys[h] == -1:
            return -1
        h = (h + 1) & mask


cdef inline int32_t _get_or_insert(int64_t* keys, int32_t* vals, Py_ssize_t mask, int shift,
                                   int64_t key, int32_t val) noexcept nogil:
    """Row stored under key; if absent, store val and return -1 - val (< 0 means inserted)."""
    cdef Py_ssize_t h = _slot(key, shift)
    while True:
        if keys[h] == key:
            return vals[h]
        if keys[h] == -1:
            keys[h] = key
            vals[h] = val
            return -1 - val
        h = (h + 1) & mask


cdef inline int64_t _pack(const int32_t* row, const int64_t* shape, int d) noexcept nogil:
    """Key of a coordinate row (batch, c_0, ..., c_{d-1})."""
    cdef int64_t key = row[0]
    cdef int j
    for j in range(d):
        key = key * shape[j] + row[1 + j]
    return key
