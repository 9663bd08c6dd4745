"""Hold BLAS at one thread while our OpenMP regions call it.

The kernels call sgemm/dgemm from inside OpenMP threads; a multithreaded BLAS would then
oversubscribe the cores (or serialise on its own thread pool). threadpoolctl finds the BLAS
libraries once; each call then costs two cheap C calls.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager
from functools import lru_cache, wraps
from typing import Any


@lru_cache(maxsize=1)
def _blas_controllers() -> tuple[Any, ...]:
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (make sure scipy's BLAS is loaded)
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return ()
    ctl = ThreadpoolController()
    return tuple(c for c in ctl.lib_controllers if c.user_api == "blas")


_lock = threading.Lock()
_depth = 0
_saved: list[int] = []


@contextmanager
def single_threaded_blas():
    """Within the block every loaded BLAS runs on one thread (re-entrant, thread-safe)."""
    global _depth, _saved
    ctls = _blas_controllers()
    with _lock:
        if _depth == 0:
            _saved = [c.num_threads for c in ctls]
            for c in ctls:
                if c.num_threads != 1:
                    c.set_num_threads(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for c, n in zip(ctls, _saved):
                    if n != 1:
                        c.set_num_threads(n)


def blas_info() -> list[dict[str, Any]]:
    """What `sparsecnn info` reports about BLAS: library, version, threads, path."""
    return [c.info() for c in _blas_controllers()]


def with_single_threaded_blas(fn: Callable) -> Callable:
    """Wrap a kernel so its BLAS calls run single-threaded; keeps the signature."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        with single_threaded_blas():
            return fn(*args, **kwargs)
    return wrapper
