"""CUDA backend (CuPy RawModule kernels).

Not part of this version yet: the kernels, with the same names and signatures as
``sparsecnn._cpu``, are the subject of the GPU issue. Importing this package never needs CuPy;
:func:`status` tells why the backend cannot be used.
"""
from __future__ import annotations


def has_cupy() -> bool:
    """Whether CuPy imports."""
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def status() -> tuple[bool, str]:
    """(available, reason)."""
    if not has_cupy():
        return False, ("CuPy is not installed; install it with `pip install sparsecnn[cuda12]` "
                       "or `pip install sparsecnn[cuda13]` (matching your CUDA driver)")
    return False, "the CUDA kernels are not implemented in this version of sparsecnn"
