"""The CPU backend's side of the kernel boundary: the device-neutral kernels of
``KERNEL_NAMES`` (the GPU backend has the same names and signatures).

``sparsecnn.functional`` hands each kernel the rulebook and the data, nothing else. What is
CPU tuning lives here: which rulebooks carry window tables and when they are worth building,
when the weight gradient goes output by output (few input channels), when the backward goes
by chunks of inputs (nearly full input windows), and when max-pooling's backward may write
each input row once (windows that partition the inputs). The Cython kernels themselves
(``_conv``, ``_pool``, ``_rulebook``, ``_reduce``) take those choices as arguments.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import _conv, _pool, _rulebook
from ._threads import with_single_threaded_blas

#: below this many input channels the convolution's weight gradient goes output by output
#: (over the window), and the forward is an im2col GEMM
SMALL_CIN = 4
#: conv_backward goes by chunks of inputs, all offsets side by side, when at least this share
#: of (input, offset) slots have a pair (stride-1 convolutions: nearly all); the empty slots
#: are multiplied as zeros, so below it the per-offset path is faster
INPUT_SIDE_FILL = 0.9

#: optional fused kernels this backend has (the op layer falls back to the unfused pair
#: for any that a backend lacks)
CAPABILITIES = frozenset({"conv_maxpool_forward"})

_conv_forward = with_single_threaded_blas(_conv.conv_forward)
_conv_backward = with_single_threaded_blas(_conv.conv_backward)
_conv_maxpool_forward = with_single_threaded_blas(_conv.conv_maxpool_forward)


# -- what the CPU derives from a rulebook, kept in its cache ------------------------------------
def window_of(rb: Any) -> Any:
    """The pairs grouped by output: (n_out, K) int32, [o, k] = input row or -1; None when that
    table would be far larger than the pairs (a large window over few sites: the kernels then
    work from the pair lists). Filled by the rulebook kernel where it can, else built on
    first use; kept in ``rb.cache`` so forward and backward of every layer share it."""
    if "window" not in rb.cache:
        fits = _rulebook.window_fits(rb.n_out, rb.kernel_volume, rb.n_pairs)
        rb.cache["window"] = (_rulebook.build_window(rb.in_idx, rb.out_idx, rb.offsets,
                                                     rb.n_out) if fits else None)
    return rb.cache["window"]


def input_window_of(rb: Any) -> Any:
    """The pairs grouped by input: (n_in, K) int32, [i, k] = output row or -1 (an input has
    at most one pair per offset); None when far larger than the pairs. Built on first use
    (convolution backward) and kept in ``rb.cache``."""
    if "input_window" not in rb.cache:
        fits = _rulebook.window_fits(rb.n_in, rb.kernel_volume, rb.n_pairs)
        rb.cache["input_window"] = (_rulebook.build_window(rb.out_idx, rb.in_idx, rb.offsets,
                                                           rb.n_in) if fits else None)
    return rb.cache["input_window"]


def input_fill(rb: Any) -> float:
    """Pairs per (input, offset): 1.0 when every input is in all K of its windows."""
    return rb.n_pairs / max(rb.n_in * rb.kernel_volume, 1)


# -- geometry -----------------------------------------------------------------------------------
def build_conv_rulebook(coords: Any, spatial_shape: Any, filter_size: int,
                        stride: int) -> tuple[Any, Any, Any, Any, dict]:
    """Output sites and pairs of a valid (f, s) window over ``coords``.

    Returns out_coords (n_out, 1 + d) int32, in_idx (P,) int32, out_idx (P,) int32, offsets
    (K + 1,) int64 and the backend's cache for the rulebook (here: the window table, filled in
    the same pass, since pooling and convolutions all go output by output)."""
    oc, in_idx, out_idx, offsets, win = _rulebook.build_conv_rulebook(
        coords, spatial_shape, filter_size, stride, window=True)
    return oc, in_idx, out_idx, offsets, {"window": win}


def build_submanifold_rulebook(coords: Any, spatial_shape: Any, table_keys: Any,
                               table_vals: Any, filter_size: int) -> tuple[Any, Any, Any, dict]:
    """Pairs of a submanifold convolution of odd size f: in_idx, out_idx, offsets, cache."""
    in_idx, out_idx, offsets = _rulebook.build_submanifold_rulebook(
        coords, spatial_shape, table_keys, table_vals, filter_size)
    return in_idx, out_idx, offsets, {}


# -- convolution --------------------------------------------------------------------------------
def conv_forward(features: Any, weight: Any, row: Any, g_in: Any, rb: Any) -> Any:
    """``out[o] = row + sum over the pairs (i, k) of o of W_k^T (x[i] - g_in)``: (n_out, C_out).

    features (n_in, C_in); weight (K, C_in, C_out); row, g_in (C_out,), (C_in,)."""
    return _conv_forward(features, weight, row, g_in, rb.in_idx, rb.out_idx, rb.offsets,
                         rb.n_out, window=window_of(rb))


def conv_backward(features: Any, weight: Any, g_in: Any, grad_out: Any, rb: Any, *,
                  grad_input: bool = True) -> tuple[Any, Any]:
    """(grad_features (n_in, C_in) or None, grad_weight (K, C_in, C_out)) of conv_forward
    (the weight gradient without the ground term g_in (x) sum(grad_out), which the op adds)."""
    few = weight.shape[1] < SMALL_CIN
    by_inputs = not few and input_fill(rb) >= INPUT_SIDE_FILL
    return _conv_backward(features, weight, g_in, grad_out, rb.in_idx, rb.out_idx, rb.offsets,
                          grad_input=grad_input, window=window_of(rb) if few else None,
                          input_window=input_window_of(rb) if by_inputs else None)


def conv_maxpool_forward(features: Any, weight: Any, row: Any, g_in: Any, conv_rb: Any,
                         pool_rb: Any, pool_ground: Any, *,
                         negative_slope: float | None = None) -> tuple[Any, Any]:
    """``maxpool_forward(conv_forward(...), pool_ground, pool_rb, negative_slope)`` without
    storing the convolution's output: (out (n_pool, C_out), argmax (n_pool, C_out) int32
    rows of the convolution's output, or -1 where the ground won). ``pool_rb`` must have
    windows that partition the convolution's output (pool size == stride)."""
    win, pwin = window_of(conv_rb), window_of(pool_rb)
    if win is None or pwin is None:        # tables far larger than the pairs: unfused
        mid = conv_forward(features, weight, row, g_in, conv_rb)
        return maxpool_forward(mid, pool_ground, pool_rb, negative_slope=negative_slope)
    return _conv_maxpool_forward(features, weight, row, g_in, win, pwin, pool_ground,
                                 negative_slope=negative_slope)


# -- depthwise convolution ----------------------------------------------------------------------
# NumPy, offset by offset: within one offset every output (and every input) has at most one
# pair, so a fancy-indexed += writes each row once (no np.add.at needed), and each output's sum
# runs over the offsets in ascending order, as on the GPU.
def depthwise_forward(features: Any, weight: Any, row: Any, g_in: Any, rb: Any) -> Any:
    """``out[o, c] = row[c] + sum over the pairs (i, o, k) of W[k, c] (x[i, c] - g_in[c])``:
    (n_out, C). features (n_in, C); weight (K, C); row, g_in (C,)."""
    C = weight.shape[1]
    out = np.empty((rb.n_out, C), dtype=features.dtype)
    out[...] = row
    off = rb.offsets.tolist()
    for k in range(len(off) - 1):
        lo, hi = off[k], off[k + 1]
        if lo < hi:
            out[rb.out_idx[lo:hi]] += weight[k] * (features[rb.in_idx[lo:hi]] - g_in)
    return out


def depthwise_backward(features: Any, weight: Any, g_in: Any, grad_out: Any, rb: Any, *,
                       grad_input: bool = True) -> tuple[Any, Any]:
    """(grad_features (n_in, C) or None, grad_weight (K, C)) of depthwise_forward (the weight
    gradient without the ground term g_in * sum(grad_out), which the op adds)."""
    K, C = weight.shape
    gx = np.zeros((features.shape[0], C), dtype=features.dtype) if grad_input else None
    gw = np.zeros((K, C), dtype=features.dtype)
    off = rb.offsets.tolist()
    for k in range(K):
        lo, hi = off[k], off[k + 1]
        if lo == hi:
            continue
        i, o = rb.in_idx[lo:hi], rb.out_idx[lo:hi]
        gy = grad_out[o]
        gw[k] = ((features[i] - g_in) * gy).sum(axis=0)
        if grad_input:
            gx[i] += weight[k] * gy
    return gx, gw


# -- pooling ------------------------------------------------------------------------------------
def maxpool_forward(features: Any, ground: Any, rb: Any, *,
                    negative_slope: float | None = None) -> tuple[Any, Any]:
    """Max over each window's inputs and ``ground`` (the candidate of windows with an
    inactive site), then ``max(v, slope * v)`` if ``negative_slope`` is given: (out, argmax)."""
    return _pool.maxpool_forward(features, ground, rb.in_idx, rb.out_idx, rb.offsets, rb.n_out,
                                 window=window_of(rb), negative_slope=negative_slope)


def maxpool_backward(grad_out: Any, argmax: Any, rb: Any, *,
                     negative_slope: float | None = None,
                     output: Any = None) -> tuple[Any, Any]:
    """(grad_features (n_in, C), grad_ground (C,)) of maxpool_forward; with
    ``negative_slope`` the forward's ``output`` gives the activation's slope."""
    # windows that partition the inputs let backward write each input row once
    partition = window_of(rb) if rb.filter_size == rb.stride else None
    return _pool.maxpool_backward(grad_out, argmax, rb.in_idx, rb.out_idx, rb.offsets, rb.n_in,
                                  window=partition, negative_slope=negative_slope,
                                  output=output)


def avgpool_forward(features: Any, ground: Any, rb: Any) -> Any:
    """Mean over each whole window, inactive sites counting as ``ground``: (n_out, C)."""
    return _pool.avgpool_forward(features, ground, rb.in_idx, rb.out_idx, rb.offsets, rb.n_out)


def avgpool_backward(grad_out: Any, rb: Any) -> tuple[Any, Any]:
    """(grad_features (n_in, C), grad_ground (C,)) of avgpool_forward."""
    return _pool.avgpool_backward(grad_out, rb.in_idx, rb.out_idx, rb.offsets, rb.n_in)


# -- global pooling ---------------------------------------------------------------------------
def segment_sum_max(features: Any, order: Any, seg: Any) -> tuple[Any, Any, Any]:
    """Per-sample sum, maximum and argmax of the rows of ``features`` (the global poolings).

    features (n, C) float32/float64; order (n,) int32: the rows sorted by sample (then by
    site); seg (B + 1,) int64: sample b owns the sorted positions [seg[b], seg[b + 1]).
    Returns sum (B, C), max (B, C) and argmax (B, C) int32: the row of the first maximal value
    in sorted order (NaN never wins unless all are NaN, then the first row); -1 (max -inf,
    sum 0) for a sample without rows. NumPy segment reductions (reduceat)."""
    n, C = features.shape
    B = seg.shape[0] - 1
    total = np.zeros((B, C), dtype=features.dtype)
    mx = np.full((B, C), -np.inf, dtype=features.dtype)
    arg = np.full((B, C), -1, dtype=np.int32)
    if n == 0 or B == 0 or C == 0:
        return total, mx, arg
    counts = seg[1:] - seg[:-1]
    present = counts > 0
    starts = seg[:-1][present]
    fs = features[order]                                   # (n, C), sorted
    total[present] = np.add.reduceat(fs, starts, axis=0)
    m = np.fmax.reduceat(fs, starts, axis=0)               # fmax: NaN loses to numbers
    row_seg = np.repeat(np.arange(starts.shape[0]), counts[present])
    pos = np.where(fs == m[row_seg], np.arange(n)[:, None], n)
    first = np.minimum.reduceat(pos, starts, axis=0)       # first maximal sorted position
    first = np.where(first == n, starts[:, None], first)   # all NaN: the first row
    mx[present] = m
    arg[present] = order[first]
    return total, mx, arg
