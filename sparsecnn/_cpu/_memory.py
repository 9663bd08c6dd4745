"""Keep freed memory in the process between training steps (glibc malloc tuning).

A training step allocates and frees the same few dozen multi-megabyte arrays every time.
With glibc's defaults, freed memory at the top of the heap is handed back to the kernel and
the next step faults it in again, page by page (zeroed): on DeepCNet(5, 32) that is about a
third of the step time. Raising the mmap threshold to its maximum (32 MiB) and the trim
threshold to 256 MiB keeps that memory for reuse. The cost: up to 256 MiB of freed memory
stays with the process instead of going back to the system.

Applied once, on the first use of the CPU kernels, and only with glibc. Opt out with the
environment variable SPARSECNN_MALLOC_TUNING=0 (or tune glibc yourself: GLIBC_TUNABLES).
"""
from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20     # glibc's upper limit on 64-bit
TRIM_THRESHOLD = 256 * 2**20

_state = {"done": False, "active": False, "reason": "not applied yet"}


def tune_malloc() -> bool:
    """Apply the tuning once (idempotent); returns whether it is active."""
    if _state["done"]:
        return _state["active"]
    _state["done"] = True
    if os.environ.get("SPARSECNN_MALLOC_TUNING", "1") == "0":
        _state["reason"] = "disabled by SPARSECNN_MALLOC_TUNING=0"
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _state["reason"] = "not glibc"
        return False
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        _state["reason"] = "GLIBC_TUNABLES already sets malloc"
        return False
    try:
        libc = ctypes.CDLL(None)
        ok = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
              and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    except (OSError, AttributeError):  # pragma: no cover - exotic platforms
        ok = False
    _state["active"] = ok
    _state["reason"] = ("mmap threshold 32 MiB, trim threshold 256 MiB" if ok
                        else "mallopt failed")
    return ok


def malloc_tuning_status() -> tuple[bool, str]:
    """(active, description) for `sparsecnn info`."""
    return _state["active"], _state["reason"]
