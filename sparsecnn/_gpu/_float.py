"""Floating-point kernels of the CUDA backend: convolution, pooling, column sums, windows.

Thin wrappers over ``kernels/conv.cu``, ``pool.cu``, ``window.cu`` and ``column_sums.cu``,
with the semantics of ``sparsecnn._cpu`` (``_conv.pyx``, ``_pool.pyx``) and the kernel
boundary of issue 10: each kernel gets the rulebook (``sparsecnn.geometry.Rulebook`` with its
arrays on the device) and the data, and chooses its strategy itself. What it derives from the
pairs is kept in ``rb.cache``:

- ``"gpu_window"``: (n_out, K) int32, window[o, k] = input row or -1 (built on first use);
- ``"gpu_input_window"``: (n_in, K) int32, the pairs grouped by input;
- ``"gpu_count"``: (n_out,) int32, active sites per window.

Everything is deterministic: no float atomics, every sum in an order that depends on the sizes
only, so results are bitwise identical run to run (and between the simulation's forward and
reversed schedules). fp32 and fp64. Convolution forward, its input gradient and the fused
convolution + max-pooling use the window-driven tiled kernels; ``*_simple`` functions run the
one-thread-per-value reference kernels (the same order of operations: bitwise equal results
in the CPU simulation).

Arrays are CuPy arrays on a GPU, :class:`~sparsecnn._gpu._arrays.SimArray` under the CUDA
simulation (then the kernels run on the CPU: slow, for tests and debugging). Like
``sparsecnn._cpu``, the kernels do not validate user input; the launcher refuses wrong
dtypes, non-contiguous or host arrays.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import SimArray, is_sim_array, sim_xp
from ._launch import load_module

__all__ = ["build_window", "column_sums", "conv_forward", "conv_backward",
           "conv_maxpool_forward", "maxpool_forward", "maxpool_backward", "avgpool_forward",
           "avgpool_backward", "conv_forward_simple", "conv_backward_simple",
           "conv_maxpool_forward_simple"]

BLOCK = 256                 # threads per block of the one-value-per-thread kernels
MAX_BLOCKS = 8192           # grid-stride kernels: at most this many blocks
COLSUM_CHUNK = 256          # rows per column-sum chunk (the CPU's, so sums are bitwise equal)
POOL_CHUNK = 256            # outputs per ground-gradient partial (pool.cu SCNN_POOL_CHUNK)
TILE_M, TILE_N = 64, 32     # conv.cu SCNN_TBM, SCNN_TBN
TILE_BLOCK = (16, 16)
WGRAD_CHUNK = 256           # pairs per weight-gradient partial, on average
WGRAD_MAX_SPLIT = 32        # partials per offset, at most


# -- plumbing --------------------------------------------------------------------------------
def xp_of(a: Any):
    """The array module of a device array: ``sim_xp`` for SimArrays, else CuPy's."""
    if is_sim_array(a):
        return sim_xp
    import cupy
    return cupy.get_array_module(a)


def _run(filename: str, name: str, like: Any, grid, block, args: tuple) -> None:
    """Launch kernel ``name`` of ``filename`` on the device of ``like`` (simulated for a
    SimArray). A host ndarray among the arguments is refused on the simulation too, as CuPy's
    launcher refuses it on a GPU."""
    sim = is_sim_array(like)
    if sim:
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray) and not isinstance(a, SimArray):
                raise TypeError(f"{name}: argument {i} is a host numpy.ndarray {a.shape}; the "
                                f"kernels take arrays on the (simulated) device 'cuda'")
    load_module(filename, simulate=sim).get_function(name)(grid, block, args)


def _sfx(a: Any) -> str:
    if a.dtype == np.float32:
        return "f32"
    if a.dtype == np.float64:
        return "f64"
    raise TypeError(f"float kernels take float32 or float64 arrays, got {a.dtype}")


def _grid(total: int) -> tuple[int]:
    return (max(1, min(MAX_BLOCKS, -(-total // BLOCK))),)


def _launch_flat(filename: str, name: str, like: Any, total: int, args: tuple) -> None:
    """A grid-stride kernel over ``total`` values (skipped when there are none)."""
    if total > 0:
        _run(filename, name, like, _grid(total), BLOCK, args)


# A (rows, K) window table is built only while it is not far larger than the pairs (the CPU
# backend's rule): the kernels here work from window tables only, so a large window over few
# sites is refused with a clear error before anything is allocated, not a memory bomb.
WINDOW_SLACK, WINDOW_FLOOR = 16, 2**20


def window_fits(n_rows: int, K: int, n_pairs: int) -> bool:
    return int(n_rows) * int(K) <= max(WINDOW_SLACK * int(n_pairs), WINDOW_FLOOR)


def _check_fits(rb, n_rows: int) -> None:
    if not window_fits(n_rows, rb.kernel_volume, rb.n_pairs):
        raise MemoryError(
            f"the GPU backend works from (rows, K) window tables, and this window "
            f"(filter/pool size {rb.filter_size}, K = {rb.kernel_volume}) over {n_rows} rows "
            f"and {rb.n_pairs} pairs would need {n_rows * rb.kernel_volume} entries, far more "
            f"than its pairs; run this layer on the CPU (which works from the pair lists)")


def _window(rb) -> Any:
    w = rb.cache.get("gpu_window")
    if w is None:
        _check_fits(rb, rb.n_out)
        w = rb.cache["gpu_window"] = build_window(rb.in_idx, rb.out_idx, rb.offsets, rb.n_out)
    return w


def _input_window(rb) -> Any:
    w = rb.cache.get("gpu_input_window")
    if w is None:
        _check_fits(rb, rb.n_in)
        w = rb.cache["gpu_input_window"] = build_window(rb.out_idx, rb.in_idx, rb.offsets,
                                                        rb.n_in)
    return w


def _count(rb) -> Any:
    c = rb.cache.get("gpu_count")
    if c is None:
        win = _window(rb)
        n, K = win.shape
        c = xp_of(win).empty(n, dtype=np.int32)
        _launch_flat("window.cu", "scnn_window_count", win, n,
                     (win, np.int64(n), np.int32(K), c))
        rb.cache["gpu_count"] = c
    return c


def _act(negative_slope, dtype) -> tuple[np.int32, Any]:
    t = np.dtype(dtype).type
    if negative_slope is None:
        return np.int32(0), t(0)
    return np.int32(1), t(negative_slope)


def _ordered_colsum(partial: Any, C: int) -> Any:
    """Sum of the rows of ``partial`` (n_chunks, C) in row order (column_sums.cu, pass 2)."""
    xp = xp_of(partial)
    out = xp.zeros(C, dtype=partial.dtype)
    if partial.shape[0] and C:
        _run("column_sums.cu", f"scnn_column_sums_final_{_sfx(partial)}", partial,
             (-(-C // 256),), 256, (partial, np.int32(partial.shape[0]), np.int32(C), out))
    return out


# -- windows, column sums --------------------------------------------------------------------
def build_window(in_idx: Any, out_idx: Any, offsets: Any, n_out: int) -> Any:
    """The rulebook grouped by output: (n_rows, K) int32, window[o, k] = the input row paired
    with o at offset k, or -1 (as sparsecnn._cpu.build_window). With in_idx and out_idx
    swapped (and n_in rows) it groups the pairs by input."""
    xp = xp_of(in_idx)
    K = int(offsets.shape[0]) - 1
    n_rows = int(n_out)
    win = xp.empty((n_rows, K), dtype=np.int32)
    if n_rows == 0 or K == 0:
        return win
    _launch_flat("window.cu", "scnn_window_fill", win, n_rows * K,
                 (win, np.int64(n_rows * K)))
    P = int(in_idx.shape[0])
    _launch_flat("window.cu", "scnn_window_scatter", win, P,
                 (in_idx, out_idx, offsets, np.int32(K), np.int64(P), win))
    return win


def column_sums(a: Any) -> Any:
    """Column sums of a C-contiguous (n, C) array, bitwise equal to sparsecnn._cpu's (fixed
    chunks of 256 rows, then the chunks in order)."""
    xp = xp_of(a)
    n, C = a.shape
    out = xp.zeros(C, dtype=a.dtype)
    if n == 0 or C == 0:
        return out
    sfx = _sfx(a)
    n_chunks = -(-n // COLSUM_CHUNK)
    partial = xp.empty((n_chunks, C), dtype=a.dtype)
    _run("column_sums.cu", f"scnn_column_sums_partial_{sfx}", a, (n_chunks, -(-C // 32)), 128,
         (a, np.int64(n), np.int32(C), np.int32(COLSUM_CHUNK), partial))
    return _ordered_colsum(partial, C)


# -- convolution -----------------------------------------------------------------------------
def _conv_fwd(features, weight, row, g_in, rb, kind: str) -> Any:
    xp = xp_of(features)
    K, cin, cout = (int(v) for v in weight.shape)
    n_out = int(rb.n_out)
    out = xp.empty((n_out, cout), dtype=features.dtype)
    if n_out == 0 or cout == 0:
        return out
    win = _window(rb)
    args = (features, weight, row, g_in, win, np.int64(n_out), np.int32(K), np.int32(cin),
            np.int32(cout), out)
    name = f"scnn_conv_fwd_{kind}_{_sfx(features)}"
    if kind == "tiled":
        _run("conv.cu", name, features, (-(-n_out // TILE_M), -(-cout // TILE_N)), TILE_BLOCK,
             args)
    else:
        _launch_flat("conv.cu", name, features, n_out * cout, args)
    return out


def conv_forward(features: Any, weight: Any, row: Any, g_in: Any, rb) -> Any:
    """out[o] = row + sum over pairs (i, o) of offset k of weight[k]^T (features[i] - g_in).

    features (n_in, C_in); weight (K, C_in, C_out); row (C_out,): what every output starts
    from (the output ground, or the bias in zero-ground mode); g_in (C_in,): the input
    ground, subtracted from every gathered input. Returns out (n_out, C_out)."""
    return _conv_fwd(features, weight, row, g_in, rb, "tiled")


def conv_forward_simple(features: Any, weight: Any, row: Any, g_in: Any, rb) -> Any:
    """conv_forward through the one-thread-per-value reference kernel."""
    return _conv_fwd(features, weight, row, g_in, rb, "simple")


def _wgrad(features, weight, g_in, grad_out, rb) -> Any:
    xp = xp_of(features)
    K, cin, cout = (int(v) for v in weight.shape)
    E = cin * cout
    gw = xp.zeros((K, cin, cout), dtype=features.dtype)
    P = int(rb.in_idx.shape[0])
    if P == 0 or E == 0:
        return gw
    # S partials per offset, from the sizes only (no read of the pair counts): about
    # WGRAD_CHUNK pairs each on average
    S = int(min(WGRAD_MAX_SPLIT, max(1, -(-P // (K * WGRAD_CHUNK)))))
    partial = xp.empty((K, S, cin, cout), dtype=features.dtype)
    sfx = _sfx(features)
    _launch_flat("conv.cu", f"scnn_conv_wgrad_partial_{sfx}", features, K * S * E,
                 (features, g_in, grad_out, rb.in_idx, rb.out_idx, rb.offsets, np.int32(K),
                  np.int32(S), np.int32(cin), np.int32(cout), partial))
    _launch_flat("conv.cu", f"scnn_conv_wgrad_reduce_{sfx}", features, K * E,
                 (partial, np.int32(K), np.int32(S), np.int64(E), gw))
    return gw


def _conv_bwd(features, weight, g_in, grad_out, rb, grad_input: bool, kind: str):
    xp = xp_of(features)
    K, cin, cout = (int(v) for v in weight.shape)
    gx = None
    if grad_input:
        n_in = int(features.shape[0])
        gx = xp.empty((n_in, cin), dtype=features.dtype)
        if n_in and cin:
            iwin = _input_window(rb)
            args = (grad_out, weight, iwin, np.int64(n_in), np.int32(K), np.int32(cin),
                    np.int32(cout), gx)
            name = f"scnn_conv_dgrad_{kind}_{_sfx(features)}"
            if kind == "tiled":
                _run("conv.cu", name, features, (-(-n_in // TILE_M), -(-cin // TILE_N)),
                     TILE_BLOCK, args)
            else:
                _launch_flat("conv.cu", name, features, n_in * cin, args)
    return gx, _wgrad(features, weight, g_in, grad_out, rb)


def conv_backward(features: Any, weight: Any, g_in: Any, grad_out: Any, rb, *,
                  grad_input: bool = True):
    """Gradients of conv_forward's pair sum (as sparsecnn._cpu.conv_backward):

    grad_features[i] = sum over pairs (i, o, k) of weight[k] grad_out[o]
    grad_weight[k] = sum over pairs (i, o) of offset k of (features[i] - g_in) grad_out[o]^T
    Returns (grad_features (n_in, C_in), or None with grad_input=False; grad_weight
    (K, C_in, C_out)). The ground term g_in (x) G of the weight gradient, the bias and ground
    gradients are left to the caller (functional.py), as on the CPU.
    Weight gradient: S fixed chunks of each offset's pairs, summed in pair order into
    partials, then the partials in order. Input gradient: the tiled kernel over the input
    window with the weight transposed."""
    return _conv_bwd(features, weight, g_in, grad_out, rb, grad_input, "tiled")


def conv_backward_simple(features: Any, weight: Any, g_in: Any, grad_out: Any, rb, *,
                         grad_input: bool = True):
    """conv_backward with the one-thread-per-value input-gradient kernel."""
    return _conv_bwd(features, weight, g_in, grad_out, rb, grad_input, "simple")


def _conv_maxpool(features, weight, row, g_in, conv_rb, pool_rb, pool_ground, negative_slope,
                  kind: str):
    xp = xp_of(features)
    K, cin, cout = (int(v) for v in weight.shape)
    n_out = int(pool_rb.n_out)
    out = xp.empty((n_out, cout), dtype=features.dtype)
    arg = xp.empty((n_out, cout), dtype=np.int32)
    if n_out == 0 or cout == 0:
        return out, arg
    win = _window(conv_rb)
    pwin = _window(pool_rb)
    K2 = int(pwin.shape[1])
    act, a = _act(negative_slope, features.dtype)
    sfx = _sfx(features)
    args = (features, weight, row, g_in, win, pwin, pool_ground, np.int64(n_out), np.int32(K),
            np.int32(K2), np.int32(cin), np.int32(cout), act, a, out, arg)
    if kind == "tiled" and K2 <= TILE_M:
        per = TILE_M // K2
        _run("conv.cu", f"scnn_conv_maxpool_tiled_{sfx}", features,
             (-(-n_out // per), -(-cout // TILE_N)), TILE_BLOCK, args)
    else:   # pool windows larger than a tile: the simple kernel
        _launch_flat("conv.cu", f"scnn_conv_maxpool_simple_{sfx}", features, n_out * cout,
                     args)
    return out, arg


def conv_maxpool_forward(features: Any, weight: Any, row: Any, g_in: Any, conv_rb, pool_rb,
                         pool_ground: Any, *, negative_slope: float | None = None):
    """maxpool_forward(conv_forward(features, weight, row, g_in, conv_rb), pool_ground,
    pool_rb, negative_slope) without storing the convolution's output.

    pool_rb: the pooling rulebook over the convolution's outputs; pool_ground (C_out,): the
    pooling's ground candidate (the convolution's output ground, or -inf for active sites
    only). Returns out (n_out, C_out) and argmax (n_out, C_out) int32: the convolution output
    row that won, -1 for the ground. Any pool windows (also overlapping ones: a row shared by
    two windows is computed twice)."""
    return _conv_maxpool(features, weight, row, g_in, conv_rb, pool_rb, pool_ground,
                         negative_slope, "tiled")


def conv_maxpool_forward_simple(features: Any, weight: Any, row: Any, g_in: Any, conv_rb,
                                pool_rb, pool_ground: Any, *,
                                negative_slope: float | None = None):
    """conv_maxpool_forward through the one-thread-per-value reference kernel."""
    return _conv_maxpool(features, weight, row, g_in, conv_rb, pool_rb, pool_ground,
                         negative_slope, "simple")


# -- pooling ---------------------------------------------------------------------------------
def maxpool_forward(features: Any, ground: Any, rb, *, negative_slope: float | None = None):
    """out[o, c] = max(features[i, c] over active i in o's window; ground[c] if any site of
    the window is inactive), then the (leaky) ReLU max(v, slope v) if negative_slope is not
    None. Returns out (n_out, C) and argmax (n_out, C) int32: the input row that won, -1 for
    the ground. Ties go to the earliest candidate: the ground, then offsets in order."""
    xp = xp_of(features)
    C = int(features.shape[1])
    n_out = int(rb.n_out)
    out = xp.empty((n_out, C), dtype=features.dtype)
    arg = xp.empty((n_out, C), dtype=np.int32)
    if n_out == 0 or C == 0:
        return out, arg
    win = _window(rb)
    act, a = _act(negative_slope, features.dtype)
    _launch_flat("pool.cu", f"scnn_maxpool_fwd_{_sfx(features)}", features, n_out * C,
                 (features, ground, win, np.int64(n_out), np.int32(win.shape[1]),
                  np.int32(C), act, a, out, arg))
    return out, arg


def maxpool_backward(grad_out: Any, argmax: Any, rb, *, negative_slope: float | None = None,
                     output: Any = None):
    """grad_features[i, c] = sum of d[o, c] over the windows o that i won in channel c, where
    d = grad_out, or with negative_slope (the fused activation; output: the forward's output)
    grad_out where output > 0 and slope * grad_out elsewhere.
    Returns grad_features (n_in, C) and grad_ground (C,): the sum of d over the (output,
    channel) pairs the ground won (argmax -1 in a window with an inactive site)."""
    xp = xp_of(grad_out)
    n_out, C = (int(v) for v in grad_out.shape)
    n_in = int(rb.n_in)
    gx = xp.empty((n_in, C), dtype=grad_out.dtype)
    if C == 0:
        return gx, xp.zeros(0, dtype=grad_out.dtype)
    act, a = _act(negative_slope, grad_out.dtype)
    y = output if negative_slope is not None else grad_out
    sfx = _sfx(grad_out)
    K = int(rb.offsets.shape[0]) - 1
    if n_in:
        iwin = _input_window(rb)
        _launch_flat("pool.cu", f"scnn_maxpool_bwd_{sfx}", grad_out, n_in * C,
                     (grad_out, y, argmax, iwin, np.int64(n_in), np.int32(K), np.int32(C),
                      act, a, gx))
    if n_out == 0:
        return gx, xp.zeros(C, dtype=grad_out.dtype)
    n_chunks = -(-n_out // POOL_CHUNK)
    partial = xp.empty((n_chunks, C), dtype=grad_out.dtype)
    _launch_flat("pool.cu", f"scnn_maxpool_ground_partial_{sfx}", grad_out, n_chunks * C,
                 (grad_out, y, argmax, _count(rb), np.int64(n_out), np.int32(K), np.int32(C),
                  act, a, partial))
    return gx, _ordered_colsum(partial, C)


def avgpool_forward(features: Any, ground: Any, rb) -> Any:
    """out[o] = ground + sum over active i in o's window of (features[i] - ground) / K (the
    mean over all K window sites, inactive ones counting as ground). Returns (n_out, C)."""
    xp = xp_of(features)
    C = int(features.shape[1])
    n_out = int(rb.n_out)
    out = xp.empty((n_out, C), dtype=features.dtype)
    if n_out == 0 or C == 0:
        return out
    win = _window(rb)
    K = int(win.shape[1])
    inv = np.dtype(features.dtype).type(1.0 / K)
    _launch_flat("pool.cu", f"scnn_avgpool_fwd_{_sfx(features)}", features, n_out * C,
                 (features, ground, win, np.int64(n_out), np.int32(K), np.int32(C), inv, out))
    return out


def avgpool_backward(grad_out: Any, rb):
    """grad_features[i] = sum over windows o holding i of grad_out[o] / K; grad_ground = sum
    over o of grad_out[o] (K - active_o) / K. Returns (grad_features (n_in, C), grad_ground
    (C,))."""
    xp = xp_of(grad_out)
    n_out, C = (int(v) for v in grad_out.shape)
    n_in = int(rb.n_in)
    K = int(rb.offsets.shape[0]) - 1
    gx = xp.empty((n_in, C), dtype=grad_out.dtype)
    if C == 0:
        return gx, xp.zeros(0, dtype=grad_out.dtype)
    sfx = _sfx(grad_out)
    inv = np.dtype(grad_out.dtype).type(1.0 / K)
    if n_in:
        _launch_flat("pool.cu", f"scnn_avgpool_bwd_{sfx}", grad_out, n_in * C,
                     (grad_out, _input_window(rb), np.int64(n_in), np.int32(K), np.int32(C),
                      inv, gx))
    if n_out == 0:
        return gx, xp.zeros(C, dtype=grad_out.dtype)
    n_chunks = -(-n_out // POOL_CHUNK)
    partial = xp.empty((n_chunks, C), dtype=grad_out.dtype)
    _launch_flat("pool.cu", f"scnn_avgpool_ground_partial_{sfx}", grad_out, n_chunks * C,
                 (grad_out, _count(rb), np.int64(n_out), np.int32(K), np.int32(C), partial))
    return gx, _ordered_colsum(partial, C)
