"""CUDA side of the global poolings (sparsecnn/heads.py): per-sample sums and maxima.

A thin wrapper over ``kernels/global_pool.cu`` with the signature of the CPU kernel
(``sparsecnn._cpu.segment_sum_max``). Deterministic: each sample's rows are cut into
fixed chunks of :data:`CHUNK` sorted positions, summed in order, then the chunks in order (no
atomics; the order depends on the sizes only).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import backend
from ._float import _launch_flat, _sfx, xp_of

__all__ = ["segment_sum_max", "CHUNK"]

CHUNK = 256     # sorted positions per partial (global_pool.cu SCNN_GPOOL_CHUNK)


def segment_sum_max(features: Any, order: Any, seg: Any) -> tuple[Any, Any, Any]:
    """Per-sample sum, maximum and argmax of the rows of ``features``.

    features (n, C) float32/float64; order (n,) int32: the rows sorted by sample (and then by
    site); seg (B + 1,) int64: sample b owns the sorted positions [seg[b], seg[b + 1]).
    Returns sum (B, C), max (B, C) and argmax (B, C) int32: the row of the first maximal
    value in sorted order (strictly greater wins; NaN never wins unless all are NaN, then
    the first row), -1 (max -inf, sum 0) for a sample without rows."""
    xp = xp_of(features)
    n, C = (int(v) for v in features.shape)
    B = int(seg.shape[0]) - 1
    total = xp.zeros((B, C), dtype=features.dtype)
    mx = xp.full((B, C), -np.inf, dtype=features.dtype)
    arg = xp.full((B, C), -1, dtype=np.int32)
    if n == 0 or B == 0 or C == 0:
        return total, mx, arg
    counts = seg[1:] - seg[:-1]
    chunk_off = xp.zeros(B + 1, dtype=np.int64)
    chunk_off[1:] = xp.cumsum((counts + (CHUNK - 1)) // CHUNK)
    n_chunks = int(backend.to_host(chunk_off[-1:])[0])     # a size: one counted read
    chunk_seg = (xp.searchsorted(chunk_off, xp.arange(n_chunks, dtype=np.int64),
                                 side="right") - 1).astype(np.int32)
    psum = xp.empty((n_chunks, C), dtype=features.dtype)
    pmax = xp.empty((n_chunks, C), dtype=features.dtype)
    parg = xp.empty((n_chunks, C), dtype=np.int32)
    sfx = _sfx(features)
    _launch_flat("global_pool.cu", f"scnn_gpool_partial_{sfx}", features, n_chunks * C,
                 (features, order, seg, chunk_off, chunk_seg, np.int64(n_chunks), np.int32(C),
                  psum, pmax, parg))
    _launch_flat("global_pool.cu", f"scnn_gpool_final_{sfx}", features, B * C,
                 (psum, pmax, parg, chunk_off, np.int64(B), np.int32(C), total, mx, arg))
    return total, mx, arg
