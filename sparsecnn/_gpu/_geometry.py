"""Coordinate hash and rulebooks on the device: the CPU kernels' signatures and results.

``build_hash``, ``build_conv_rulebook`` and ``build_submanifold_rulebook`` take and return
device arrays (CuPy arrays on a GPU, :class:`~sparsecnn._gpu._arrays.SimArray` under the CUDA
simulation) and give exactly what ``sparsecnn._cpu`` gives for the same input: the same
shapes and dtypes, the same output sites and pairs in the same order, and for ``build_hash``
the same table slot by slot (``vals`` of empty slots is -1 here, unset on the CPU). The
kernels are ``kernels/hash.cu`` (the dedupe pass, used unchanged) and ``kernels/rulebook.cu``
(which describes the method). Every result is independent of the thread and block schedule.

Sizes are read back from the device only where an output's size must be known, one small
copy per call (``n_unique``; ``n_out`` and the pair count; the pair count): :data:`host_reads`
counts those copies. The same copy brings the largest batch index and the spatial shape, so
that a grid whose packed keys would overflow int64 is refused (``ValueError``) as
``sparsecnn.geometry.check_packable`` refuses it, after the launches and at no extra copy.
"""
from __future__ import annotations

import numpy as np

from ..geometry import check_packable
from ._arrays import SimArray, sim_xp
from ._launch import load_module

__all__ = ["build_hash", "build_conv_rulebook", "build_submanifold_rulebook", "host_reads",
           "xp_of"]

#: device-to-host copies made by this module (tests read it; reset it as they like)
host_reads = 0

BLOCK = 256
_FREE = np.iinfo(np.int32).max
_MAX_GENERATORS = 2**30   # candidate (input, window position) pairs: int32 numbering, cap < 2**31


def xp_of(a):
    """The array module of a device array: ``cupy``, or ``sim_xp`` for a SimArray."""
    if isinstance(a, SimArray):
        return sim_xp
    if isinstance(a, np.ndarray):
        raise TypeError("the CUDA geometry kernels take device arrays (cupy, or SimArray "
                        "under the simulation), got a host numpy.ndarray")
    import cupy
    if not isinstance(a, cupy.ndarray):
        raise TypeError(f"the CUDA geometry kernels take device arrays, got {type(a).__name__}")
    return cupy


def _module(name, xp):
    return load_module(name, simulate=xp is sim_xp)


def _launch(fn, n_threads, args):
    if n_threads > 0:
        fn(((n_threads + BLOCK - 1) // BLOCK,), BLOCK, args)


def _read(a) -> np.ndarray:
    """One counted device-to-host copy."""
    global host_reads
    host_reads += 1
    from .. import backend
    return backend.to_host(a)


def _log2_capacity(n: int) -> int:
    """The CPU's table size: log2 of the power of two >= 2n, at least 16 slots."""
    bits = 4
    while (1 << bits) < 2 * n:
        bits += 1
    return bits


def _sizes_and_check(xp, coords, spatial_shape, *counts) -> list[int]:
    """``counts`` (device scalars) on the host in one copy, with the packing check."""
    parts = [c.astype(xp.int64) for c in counts]          # 1-element device arrays
    parts.append(coords[:, 0].max(keepdims=True).astype(xp.int64))
    parts.append(spatial_shape.astype(xp.int64, copy=False).reshape(-1))
    host = _read(xp.concatenate(parts)).tolist()
    k = len(counts)
    check_packable(tuple(host[k + 1:]), host[k] + 1)
    return host[:k]


def _check_inputs(coords, spatial_shape):
    xp = xp_of(coords)
    if xp_of(spatial_shape) is not xp:
        raise TypeError("coords and spatial_shape must be on the same device")
    if coords.dtype != np.int32 or coords.ndim != 2 or not coords.flags.c_contiguous:
        raise TypeError("coords must be a C-contiguous (n, 1 + d) int32 array")
    d = coords.shape[1] - 1
    if spatial_shape.dtype != np.int64 or spatial_shape.shape != (d,):
        raise TypeError(f"spatial_shape must be a ({d},) int64 array")
    if not 1 <= d <= 8:
        raise ValueError(f"1 to 8 spatial dimensions are supported, got {d}")
    return xp, d, xp.ascontiguousarray(spatial_shape)


def _column_scan(xp, has_pair):
    """Exclusive column-wise prefix sums of an (n, K) 0/1 matrix and the CSR offsets (K + 1)."""
    before = xp.cumsum(has_pair, axis=0, dtype=xp.int32)
    counts = before[-1].astype(xp.int64)
    before -= has_pair
    offsets = xp.concatenate([xp.zeros(1, dtype=xp.int64), xp.cumsum(counts)])
    return before, offsets


def build_hash(coords, spatial_shape):
    """Hash the sites of a coordinate list; duplicates map to their first occurrence.

    coords : (n, 1 + d) int32; spatial_shape : (d,) int64 (device arrays).
    Returns table_keys (cap,) int64, table_vals (cap,) int32, inverse (n,) int32 (device
    arrays) and n_unique (int), as ``sparsecnn._cpu.build_hash``.
    """
    xp, d, shape = _check_inputs(coords, spatial_shape)
    n = coords.shape[0]
    bits = _log2_capacity(n)
    cap, shift = 1 << bits, 64 - bits
    keys = xp.full(cap, -1, dtype=xp.int64)
    vals = xp.full(cap, -1, dtype=xp.int32)
    inverse = xp.empty(n, dtype=xp.int32)
    if n == 0:
        return keys, vals, inverse, 0
    hmod, rmod = _module("hash.cu", xp), _module("rulebook.cu", xp)
    n32 = np.int32(n)
    # pass 1 (hash.cu): dedupe in a scratch table; first occurrence, rank and inverse
    skeys = xp.full(cap, -1, dtype=xp.int64)
    first = xp.full(cap, _FREE, dtype=xp.int32)
    slot_of = xp.empty(n, dtype=xp.int32)
    full = xp.zeros(1, dtype=xp.int32)
    _launch(hmod.get_function("scnn_hash_insert"), n,
            (coords, n32, np.int32(d), shape, skeys, np.int64(cap), np.int32(shift), first,
             slot_of, full))
    flag = xp.empty(n, dtype=xp.int32)
    _launch(hmod.get_function("scnn_hash_first_flags"), n, (slot_of, first, n32, flag))
    incl = xp.cumsum(flag, dtype=xp.int32)
    rank = incl - flag
    n_unique_dev = incl[-1:]
    svals = xp.empty(cap, dtype=xp.int32)
    _launch(hmod.get_function("scnn_hash_number"), n,
            (slot_of, first, rank, n32, inverse, svals))
    # pass 2 (rulebook.cu): the CPU's table, by ordered insertion of the distinct keys
    ukeys = xp.empty(n, dtype=xp.int64)
    _launch(rmod.get_function("scnn_rb_hash_unique_keys"), n,
            (coords, n32, np.int32(d), shape, flag, rank, ukeys))
    occ = xp.full(cap, _FREE, dtype=xp.int32)
    _launch(rmod.get_function("scnn_rb_hash_place"), n,
            (ukeys, flag, rank, n32, np.int64(cap), np.int32(shift), occ))
    _launch(rmod.get_function("scnn_rb_hash_fill"), cap, (occ, ukeys, np.int64(cap), keys, vals))
    (n_unique,) = _sizes_and_check(xp, coords, shape, n_unique_dev)
    return keys, vals, inverse, int(n_unique)


def build_conv_rulebook(coords, spatial_shape, filter_size, stride):
    """The kernel boundary's rulebook of a valid (f, s) window (as ``sparsecnn._cpu``'s):
    out_coords, in_idx, out_idx, offsets and the backend's cache for the rulebook, here the
    window table filled in the same pass (``cache["gpu_window"]``, what the float kernels
    use)."""
    oc, in_idx, out_idx, offsets, win = conv_rulebook(coords, spatial_shape, filter_size,
                                                      stride, window="auto")
    return oc, in_idx, out_idx, offsets, {} if win is None else {"gpu_window": win}


def conv_rulebook(coords, spatial_shape, filter_size, stride, *, window=False):
    """Rulebook of a valid convolution / pooling window (f, s) over unique sites
    (``window``: True, False, or "auto": the table unless far larger than the pairs, then
    None in its place).

    coords : (n, 1 + d) int32 unique sites; spatial_shape : (d,) int64 with (N - f) % s == 0.
    Returns out_coords (n_out, 1 + d) int32, in_idx, out_idx (P,) int32, offsets (K + 1,)
    int64 and with ``window`` the (n_out, K) int32 window table, as
    ``sparsecnn._cpu.build_conv_rulebook``: outputs by sample, then by first appearance while
    scanning the sample's inputs (each input's window positions in row-major order); pairs by
    offset, then by sample, then by input.
    """
    xp, d, shape = _check_inputs(coords, spatial_shape)
    f, s = int(filter_size), int(stride)
    if f < 1 or s < 1:
        raise ValueError(f"filter_size and stride must be >= 1, got {f}, {s}")
    n = coords.shape[0]
    K, span = f ** d, (f + s - 1) // s
    per_in = span ** d
    n_gen = n * per_in
    if n_gen >= _MAX_GENERATORS:
        raise ValueError(f"{n} sites x {per_in} window positions each is too many for the GPU "
                         f"rulebook ({_MAX_GENERATORS} at most)")

    five = window is not False          # the caller wants the table (or None) back

    def result(n_out, P):
        nonlocal window
        if window == "auto":       # the table unless it is far larger than the pairs
            from ._float import window_fits
            window = window_fits(n_out, K, P)
        res = (xp.empty((n_out, 1 + d), dtype=xp.int32), xp.empty(P, dtype=xp.int32),
               xp.empty(P, dtype=xp.int32))
        return res, (xp.full((n_out, K), -1, dtype=xp.int32) if window else None)

    if n == 0:
        (oc, i, o), win = result(0, 0)
        res = (oc, i, o, xp.zeros(K + 1, dtype=xp.int64))
        return res + (win,) if five else res
    mod = _module("rulebook.cu", xp)
    # rows in stable order by sample (the identity when they are grouped already)
    batch = coords[:, 0].astype(xp.int64)
    perm = xp.argsort(batch * n + xp.arange(n, dtype=xp.int64))
    bits = _log2_capacity(n_gen)
    cap, shift = 1 << bits, 64 - bits
    keys = xp.full(cap, -1, dtype=xp.int64)
    gmin = xp.full(cap, _FREE, dtype=xp.int32)
    slot_of = xp.empty(n_gen, dtype=xp.int32)
    has_pair = xp.zeros((n, K), dtype=xp.int32)
    geo = (coords, perm, np.int32(n), np.int32(d), shape, np.int32(f), np.int32(s),
           np.int32(span), np.int32(per_in), np.int32(K))
    _launch(mod.get_function("scnn_rb_conv_insert"), n_gen,
            geo + (keys, np.int64(cap), np.int32(shift), gmin, slot_of, has_pair))
    flag = xp.empty(n_gen, dtype=xp.int32)
    _launch(mod.get_function("scnn_rb_conv_flags"), n_gen,
            (slot_of, gmin, np.int64(n_gen), flag))
    incl = xp.cumsum(flag, dtype=xp.int32)
    rank = incl - flag
    n_out_dev = incl[-1:]
    before, offsets = _column_scan(xp, has_pair)
    n_out, P = _sizes_and_check(xp, coords, shape, n_out_dev, offsets[K:])
    (out_coords, in_idx, out_idx), win = result(n_out, P)
    _launch(mod.get_function("scnn_rb_conv_emit"), n_gen if P else 0,
            geo + (slot_of, gmin, rank, offsets, before, out_coords, in_idx, out_idx,
                   np.int32(bool(window)),
                   win if window else xp.empty(1, dtype=xp.int32)))
    res = (out_coords, in_idx, out_idx, offsets)
    return res + (win,) if five else res


def build_submanifold_rulebook(coords, spatial_shape, table_keys, table_vals, filter_size):
    """The kernel boundary's submanifold rulebook: in_idx, out_idx, offsets and an empty cache
    (as ``sparsecnn._cpu``'s)."""
    return (*submanifold_rulebook(coords, spatial_shape, table_keys, table_vals, filter_size),
            {})


def submanifold_rulebook(coords, spatial_shape, table_keys, table_vals, filter_size):
    """Rulebook of a submanifold convolution (f odd): outputs are the input sites.

    coords : (n, 1 + d) int32 unique sites; table_keys / table_vals: their hash (any table
    of the CPU's layout rules, e.g. from :func:`build_hash`). Returns in_idx, out_idx (P,)
    int32 and offsets (K + 1,) int64, as ``sparsecnn._cpu.build_submanifold_rulebook``: pairs
    of an offset ordered by output row.
    """
    xp, d, shape = _check_inputs(coords, spatial_shape)
    if xp_of(table_keys) is not xp or xp_of(table_vals) is not xp:
        raise TypeError("the hash table must be on the device of coords")
    f = int(filter_size)
    n = coords.shape[0]
    K = f ** d
    if n * K >= 2**31:
        raise ValueError(f"{n} sites x {K} offsets is too many for the GPU rulebook")
    if n == 0:
        return (xp.empty(0, dtype=xp.int32), xp.empty(0, dtype=xp.int32),
                xp.zeros(K + 1, dtype=xp.int64))
    cap = table_keys.shape[0]
    shift = 64 - (int(cap).bit_length() - 1)
    mod = _module("rulebook.cu", xp)
    nbr = xp.empty((n, K), dtype=xp.int32)
    has_pair = xp.empty((n, K), dtype=xp.int32)
    _launch(mod.get_function("scnn_rb_sub_lookup"), n * K,
            (coords, np.int32(n), np.int32(d), shape, np.int32(f), np.int32(K),
             xp.ascontiguousarray(table_keys), xp.ascontiguousarray(table_vals),
             np.int64(cap), np.int32(shift), nbr, has_pair))
    before, offsets = _column_scan(xp, has_pair)
    (P,) = _sizes_and_check(xp, coords, shape, offsets[K:])
    in_idx = xp.empty(P, dtype=xp.int32)
    out_idx = xp.empty(P, dtype=xp.int32)
    _launch(mod.get_function("scnn_rb_sub_emit"), n * K if P else 0,
            (nbr, before, offsets, np.int32(n), np.int32(K), in_idx, out_idx))
    return in_idx, out_idx, offsets
