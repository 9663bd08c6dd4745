"""Site sets and their rulebooks.

A :class:`Geometry` is one set of active sites: coordinates, spatial shape, batch size, the
coordinate hash, and a cache of rulebooks keyed by ``(kind, f, s)``. Layers share geometry
objects: a submanifold convolution's output has its input's geometry, and a strided
convolution's output geometry is created once per (input geometry, f, s) and cached, so a
network applied twice to the same input, and every backward pass, reuse every rulebook.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import backend

_KEY_LIMIT = 2**62
INT32_MAX = 2**31 - 1
# Window volume f**d of a rulebook: its offsets array has f**d + 1 entries (int64) and the
# kernels index offsets with int32, so f**d is bounded well below 2**31: 2**24 offsets are
# 128 MiB. (MaxPooling(4096) on a 4096 x 4096 grid is the largest global pooling in 2-D.)
MAX_WINDOW = 2**24
# (input, output) pairs of one rulebook: in_idx / out_idx and the output rows are int32
MAX_PAIRS = 2**31 - 1
@dataclass(frozen=True)
class Rulebook:
    """Pairs (in_idx[p], out_idx[p]) for offsets[k] <= p < offsets[k + 1], k < K = f**d."""

    in_idx: Any
    out_idx: Any
    offsets: Any
    n_in: int
    n_out: int
    filter_size: int
    stride: int
    #: what the backend derived from the pairs and keeps with them (window tables, plans)
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_pairs(self) -> int:
        return int(self.in_idx.shape[0])

    @property
    def kernel_volume(self) -> int:
        return int(self.offsets.shape[0]) - 1


def check_packable(spatial_shape: tuple[int, ...], batch_size: int) -> None:
    """Raise if (batch, *coords) cannot be packed into one int64 key."""
    total = max(batch_size, 1)
    for n in spatial_shape:
        total *= int(n)
    if total >= _KEY_LIMIT:
        raise ValueError(
            f"batch_size * prod(spatial_shape) = {total} is too large for the coordinate hash "
            f"(packed int64 keys hold at most 2**62 sites); use a smaller grid or batch")


def _size_name(what: str) -> str:
    return "pool_size" if "Pooling" in what else "filter_size"


def check_window(spatial_shape: tuple[int, ...], n_sites: int, f: int, s: int,
                 what: str = "Convolution") -> None:
    """Refuse, before any work, a window whose rulebook the kernels cannot hold: f, s not
    positive ints or s beyond int32 (coordinates are int32), a volume f**d above MAX_WINDOW,
    or more than MAX_PAIRS (input, output) pairs (n_sites times the windows a site can lie
    in)."""
    name = _size_name(what)
    for arg, v in ((name, f), ("stride", s)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise TypeError(f"{what}: {arg} must be an int, got {v!r}")
        if v < 1:
            raise ValueError(f"{what}: {arg} must be >= 1, got {v}")
        if v > INT32_MAX:
            raise ValueError(f"{what}: {arg} = {v} exceeds 2**31 - 1 (coordinates are int32)")
    f, s, d = int(f), int(s), len(spatial_shape)
    K = f ** d
    if K > MAX_WINDOW:
        raise ValueError(f"{what}: {name}**dim = {f}**{d} = {K} exceeds the limit 2**24 = "
                         f"{MAX_WINDOW} on the window volume (a rulebook keeps one offset per "
                         f"window position); use a smaller window, or pool in stages")
    per_site = 1
    for n in spatial_shape:
        per_site *= min(-(-f // s), max((int(n) - f) // s + 1, 1))
    if n_sites * per_site > MAX_PAIRS:
        raise ValueError(f"{what}({name}={f}, stride={s}): {n_sites} active sites, each in up "
                         f"to {per_site} windows, give up to {n_sites * per_site} (input, "
                         f"output) pairs; at most 2**31 - 1 are supported (use a larger stride "
                         f"or fewer sites)")


def conv_output_shape(spatial_shape: tuple[int, ...], f: int, s: int,
                      what: str = "Convolution") -> tuple[int, ...]:
    """(N - f) / s + 1 per dimension; ValueError (naming sizes that fit) otherwise."""
    out = []
    for j, n in enumerate(spatial_shape):
        if n < f or (n - f) % s:
            lo = f + ((n - f) // s) * s if n >= f else f
            fits = f"{lo} or {lo + s}" if n > f else f"{lo}"
            raise ValueError(
                f"{what}(filter_size={f}, stride={s}) needs (N - {f}) % {s} == 0 and N >= {f} "
                f"in every dimension, but spatial_shape[{j}] = {n}; an input size of {fits} "
                f"would fit")
        out.append((n - f) // s + 1)
    return tuple(out)


class Geometry:
    """A set of unique active sites on a (batch_size, *spatial_shape) grid.

    Parameters
    ----------
    coords : ndarray of shape (n, 1 + d), dtype=int32
        Unique site coordinates (batch, c_0, ..., c_{d-1}), already validated.
    spatial_shape : tuple of d ints
    batch_size : int
    device : "cpu" or "cuda"
    table : (keys, vals), optional
        The coordinate hash if the caller already has it.
    """

    def __init__(self, coords, spatial_shape: tuple[int, ...], batch_size: int,
                 device: str = "cpu", table: tuple[Any, Any] | None = None,
                 shape_array: Any = None) -> None:
        self.coords = coords
        self.spatial_shape = tuple(int(n) for n in spatial_shape)
        self.batch_size = int(batch_size)
        self.device = device
        self._table = table
        self._cache: dict[tuple, Any] = {}
        self._shape_arr = (np.asarray(self.spatial_shape, dtype=np.int64) if shape_array is None
                           else shape_array)

    @property
    def n_active(self) -> int:
        return int(self.coords.shape[0])

    @property
    def dim(self) -> int:
        return len(self.spatial_shape)

    @property
    def kernels(self):
        return backend.kernels(self.device)

    def shape_array(self):
        """spatial_shape as an int64 array on this geometry's device (copied there once)."""
        if backend.device_of(self._shape_arr) != self.device:
            self._shape_arr = backend.to_device(self._shape_arr, self.device)
        return self._shape_arr

    @property
    def table(self) -> tuple[Any, Any]:
        """Open-addressing hash (keys int64, vals int32) of the sites, built on first use."""
        if self._table is None:
            keys, vals, _, _ = self.kernels.build_hash(self.coords, self.shape_array())
            self._table = (keys, vals)
        return self._table

    def conv(self, f: int, s: int, what: str = "Convolution") -> tuple[Rulebook, Geometry]:
        """Rulebook and output geometry of a valid (f, s) window; cached."""
        key = ("conv", f, s)
        hit = self._cache.get(key)
        if hit is None:
            check_window(self.spatial_shape, self.n_active, f, s, what)
            out_shape = conv_output_shape(self.spatial_shape, f, s, what)
            oc, in_idx, out_idx, offsets, cache = self.kernels.build_conv_rulebook(
                self.coords, self.shape_array(), int(f), int(s))
            out = Geometry(oc, out_shape, self.batch_size, self.device)
            rb = Rulebook(in_idx, out_idx, offsets, self.n_active, out.n_active, f, s, cache)
            hit = self._cache[key] = (rb, out)
        return hit

    def submanifold(self, f: int) -> Rulebook:
        """Rulebook of a submanifold convolution of odd size f (outputs = these sites); cached."""
        key = ("sub", f, 1)
        rb = self._cache.get(key)
        if rb is None:
            check_window(self.spatial_shape, 0, f, 1, "SubmanifoldConvolution")
            keys, vals = self.table
            in_idx, out_idx, offsets, cache = self.kernels.build_submanifold_rulebook(
                self.coords, self.shape_array(), keys, vals, int(f))
            rb = self._cache[key] = Rulebook(in_idx, out_idx, offsets, self.n_active,
                                             self.n_active, f, 1, cache)
        return rb

    def to(self, device: str) -> Geometry:
        """The same sites on another device (rulebooks are rebuilt there on demand)."""
        if device == self.device:
            return self
        key = ("device", device)
        g = self._cache.get(key)
        if g is None:
            g = self._cache[key] = Geometry(backend.to_device(self.coords, device),
                                            self.spatial_shape, self.batch_size, device)
        return g

    def __repr__(self) -> str:
        return (f"Geometry(n_active={self.n_active}, spatial_shape={self.spatial_shape}, "
                f"batch_size={self.batch_size}, device={self.device!r})")
