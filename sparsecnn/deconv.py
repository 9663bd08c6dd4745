"""Transposed convolutions and unpooling: ``Deconvolution`` (a dense transposed convolution,
growing the grid), and the inverse modes that put features back on the sites a strided
convolution or pooling came from (``InverseConvolution``, ``UnPooling``, as U-Net decoders
need).

**Deconvolution(f, s)**: output size ``(N - 1) * s + f`` per dimension; input site i adds
``W_k^T x[i]`` to output site ``i * s + k`` (k the row-major window offset of design.md, so
``weight[k, ci, co] == torch_weight[ci, co, i0, i1]``, PyTorch's ConvTranspose layout). An
output site is active iff it lies in the window ``[i * s, i * s + f)^d`` of an active input,
and holds ``b + sum of W_k^T x[i]`` over the active inputs whose window holds it. Output rows
are numbered by first appearance in (input row, offset) order. This is the dense transposed
convolution exactly when the input's ground is 0: every inactive output then holds the bias
``b``, the output ground (0 in zero-ground mode, where inactive inputs count as 0 and the
bias goes to active outputs only). A nonzero input ground in ground-state mode is refused: the
dense result would have a background that varies with position (a site receives from a
number of windows that depends on its phase and on the border), which one ground vector
cannot hold. The input ground gets no gradient: the op is only defined where it is 0.

**InverseConvolution(f, s)** on ``(x, like)``: ``x`` lives on the sites of
``like.geometry.conv(f, s)`` (the output of a strided Convolution/pooling of ``like``, possibly
through layers that keep its sites), and the result lives on ``like``'s sites: the same rule
as Deconvolution with the output restricted to like's active sites, which reuses that
convolution's rulebook with inputs and outputs swapped. Its dense equivalent: the dense
transposed convolution of x (size ``(M - 1) * s + f = N``: like's grid), read at like's active
sites. A window holding an active site of like is an active site of x, so those values never
read x's ground: they are exact for any ground. Inactive sites of like are not the dense
values (as for SubmanifoldConvolution, by design): the output ground is ``b`` (the dense value
far from active inputs when x's ground is 0), 0 in zero-ground mode; x's ground gets no
gradient (nothing depends on it).

**UnPooling(p, s)** on ``(x, like)``: weightless; each pooled feature is copied back to every
active site of like in its window, summed where windows overlap (the transposed convolution
with identity weights, restricted to like's sites). Output ground: x's ground (what a site
covered by one inactive window receives), 0 in zero-ground mode.

All three run the convolution kernels (``conv_forward`` / ``conv_backward``) or the
average-pooling kernels on a rulebook built on the input's device with array-module ops and
cached on a geometry, so forward, backward and repeated calls reuse it; the reductions are
those kernels' (deterministic on every device).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import backend
from .autograd import Parameter, is_grad_enabled, record
from .functional import _check_conv, _check_size, _check_sparse, colsum
from .geometry import (
    INT32_MAX,
    MAX_PAIRS,
    MAX_WINDOW,
    Geometry,
    Rulebook,
    _size_name,
    check_packable,
)
from .nn import Module, _check_dim_arg, _check_input_dim, _check_int, _ConvBase, _register
from .tensor import SparseTensor

__all__ = ["deconvolution", "inverse_convolution", "unpooling", "Deconvolution",
           "InverseConvolution", "UnPooling", "deconv_output_shape"]


# -- geometry ---------------------------------------------------------------------------------
def deconv_output_shape(spatial_shape: tuple[int, ...], f: int, s: int,
                        what: str = "Deconvolution") -> tuple[int, ...]:
    """(N - 1) * s + f per dimension; ValueError where that exceeds 2**31 - 1 (coordinates
    are int32)."""
    out = tuple((int(n) - 1) * s + f for n in spatial_shape)
    for j, m in enumerate(out):
        if m > INT32_MAX:
            raise ValueError(f"{what}(filter_size={f}, stride={s}): the output size (N - 1) * "
                             f"s + f = {m} in dimension {j} exceeds 2**31 - 1 (coordinates "
                             f"are int32); use a smaller stride or filter")
    return out


def _check_deconv_window(geom: Geometry, f: int, s: int, what: str) -> None:
    """Refuse, before allocating, a window volume above MAX_WINDOW or n * K pairs above
    MAX_PAIRS (every input has all K of its pairs)."""
    d = geom.dim
    K = f ** d
    if K > MAX_WINDOW:
        raise ValueError(f"{what}: {_size_name(what)}**dim = {f}**{d} = {K} exceeds the limit "
                         f"2**24 = {MAX_WINDOW} on the window volume")
    if geom.n_active * K > MAX_PAIRS:
        raise ValueError(f"{what}(filter_size={f}, stride={s}): {geom.n_active} active sites "
                         f"times {K} window offsets give {geom.n_active * K} (input, output) "
                         f"pairs; at most 2**31 - 1 are supported")


def _window_offsets(xp: Any, f: int, d: int) -> Any:
    """(K, d) int64 offsets in row-major order on the array module's device."""
    k = xp.arange(f ** d, dtype=xp.int64)
    cols = [(k // (f ** (d - 1 - j))) % f for j in range(d)]
    return xp.stack(cols, axis=1) if d else xp.zeros((1, 0), dtype=xp.int64)


def deconv_geometry(geom: Geometry, f: int, s: int,
                    what: str = "Deconvolution") -> tuple[Rulebook, Geometry]:
    """Rulebook and output geometry of a transposed (f, s) convolution over ``geom``; built
    once and cached on ``geom``.

    Pairs: for each offset k (CSR ``offsets``), input i -> output ``i * s + k`` for every input
    row i in order. Output rows: first appearance in (input row, offset) order, numbered by the
    device's coordinate hash (whose table the output geometry keeps)."""
    key = ("deconv", f, s)
    hit = geom._cache.get(key)
    if hit is not None:
        return hit
    _check_deconv_window(geom, f, s, what)
    out_shape = deconv_output_shape(geom.spatial_shape, f, s, what)
    check_packable(out_shape, geom.batch_size)
    dev, d, n = geom.device, geom.dim, geom.n_active
    xp = backend.xp(dev)
    K = f ** d
    shape_arr = backend.to_device(np.asarray(out_shape, dtype=np.int64), dev)
    c = geom.coords.astype(xp.int64)
    spatial = c[:, None, 1:] * s + _window_offsets(xp, f, d)[None]          # (n, K, d)
    batch = xp.broadcast_to(c[:, None, :1], (n, K, 1))
    cand = xp.ascontiguousarray(xp.concatenate([batch, spatial], axis=2).reshape(n * K, 1 + d)
                                .astype(xp.int32))
    keys, vals, inverse, n_out = backend.kernels(dev).build_hash(cand, shape_arr)
    out_coords = xp.empty((n_out, 1 + d), dtype=xp.int32)
    out_coords[inverse] = cand           # repeated rows write equal values: order-free
    out = Geometry(out_coords, out_shape, geom.batch_size, dev, (keys, vals), shape_arr)
    in_idx = xp.ascontiguousarray(xp.broadcast_to(xp.arange(n, dtype=xp.int32)[None], (K, n))
                                  .reshape(-1))
    out_idx = xp.ascontiguousarray(inverse.reshape(n, K).T.reshape(-1).astype(xp.int32))
    offsets = xp.arange(K + 1, dtype=xp.int64) * n
    rb = Rulebook(in_idx, out_idx, offsets, n, int(n_out), f, s)
    hit = geom._cache[key] = (rb, out)
    return hit


def inverse_rulebook(like: Geometry, f: int, s: int, what: str) -> tuple[Rulebook, Geometry]:
    """(the transposed rulebook of ``like.geometry.conv(f, s)``: pairs (coarse o, fine i, k),
    that convolution's output geometry); cached on ``like``."""
    rb, coarse = like.conv(f, s, what)
    key = ("inverse", f, s)
    t = like._cache.get(key)
    if t is None:
        t = like._cache[key] = Rulebook(rb.out_idx, rb.in_idx, rb.offsets, rb.n_out, rb.n_in,
                                        f, s)
    return t, coarse


# -- validation ---------------------------------------------------------------------------------
def _ground_is_zero(x: SparseTensor) -> bool:
    g = backend.to_host(x.ground)        # C numbers, one counted copy on a device
    return not np.any(g != 0)


def _check_like(x: SparseTensor, like: Any, f: int, s: int, what: str) -> Geometry:
    """``like`` is a SparseTensor (or Geometry) from which ``x``'s sites came by an (f, s)
    window; returns like's geometry."""
    geom = like.geometry if isinstance(like, SparseTensor) else like
    if not isinstance(geom, Geometry):
        raise TypeError(f"{what}: like must be a SparseTensor, got {type(like).__name__}")
    if geom.device != x.device:
        raise ValueError(f"{what}: like is on {geom.device!r} but x is on {x.device!r}")
    if geom.dim != x.dim:
        raise ValueError(f"{what}: like is {geom.dim}-dimensional but x is {x.dim}-"
                         f"dimensional")
    _, coarse = geom.conv(f, s, what)
    if x.geometry is not coarse:
        raise ValueError(f"{what}: x must live on the sites of like's ({f}, {s}) window "
                         f"output (the tensor a Convolution/pooling of size {f}, stride {s} "
                         f"made from like, or one on its sites), but x has "
                         f"{x.n_active} sites on {x.spatial_shape} and that output "
                         f"{coarse.n_active} on {coarse.spatial_shape}")
    return geom


# -- ops ------------------------------------------------------------------------------------------
def _transposed(x: SparseTensor, weight: Parameter, bias: Parameter | None, rb: Rulebook,
                out_geom: Geometry, ground_state: bool, name: str) -> SparseTensor:
    """out[o] = b + sum over the pairs (i, o, k) of W_k^T x[i]; ground b (0 in zero-ground
    mode); the input ground is neither read nor given a gradient."""
    K = backend.kernels(x.device)
    xp = backend.xp(x.device)
    W = weight.data
    b = bias.data if bias is not None else xp.zeros(W.shape[2], W.dtype)
    g_in = xp.zeros_like(x.ground)
    feats = K.conv_forward(x.features, W, b, g_in, rb)
    ground = b.copy() if ground_state else xp.zeros_like(b)
    out = SparseTensor._make(out_geom, feats, ground)
    if not is_grad_enabled():
        return out

    def backward(grad):
        gy, gg = grad
        gx, gW = K.conv_backward(x.features, W, g_in, gy, rb, grad_input=x.requires_grad)
        gb = colsum(gy) + gg if ground_state else colsum(gy)
        grad_x = None if gx is None else (gx, xp.zeros_like(x.ground))
        return grad_x, gW, gb if bias is not None else None

    return record(out, [x, weight, bias], backward, name)


def deconvolution(x: SparseTensor, weight: Parameter, bias: Parameter | None,
                  filter_size: int, stride: int, *, ground_state: bool = True) -> SparseTensor:
    """Sparse transposed convolution (see the module docstring).

    Parameters
    ----------
    x : SparseTensor (n, C_in) on an N^d grid; in ground-state mode its ground must be 0
    weight : Parameter (f**d, C_in, C_out); ``weight[k]`` maps input i to output i * s + k
    bias : Parameter (C_out,) or None
    Returns a SparseTensor on the ((N - 1) * s + f)^d grid, ground ``b`` (0 with
    ``ground_state=False``).
    """
    what = f"Deconvolution(filter_size={filter_size}, stride={stride})"
    filter_size = _check_size(filter_size, "filter_size", what)
    stride = _check_size(stride, "stride", what)
    _check_conv(x, weight, bias, filter_size, what)
    if ground_state and not _ground_is_zero(x):
        raise ValueError(f"{what}: the input's ground state is nonzero; a transposed "
                         f"convolution of a nonzero background varies with position (sites "
                         f"receive from different numbers of windows), which one ground vector "
                         f"cannot hold, so the result would not be exact. Give it an input "
                         f"whose ground is 0 (e.g. after a ReLU of a negative ground), or use "
                         f"the zero-ground mode (set_ground_state(False))")
    rb, out_geom = deconv_geometry(x.geometry, filter_size, stride, what)
    return _transposed(x, weight, bias, rb, out_geom, ground_state, "deconvolution")


def inverse_convolution(x: SparseTensor, like: SparseTensor, weight: Parameter,
                        bias: Parameter | None, filter_size: int, stride: int, *,
                        ground_state: bool = True) -> SparseTensor:
    """Transposed convolution back onto the sites of ``like`` (see the module docstring).

    Parameters
    ----------
    x : SparseTensor (n_coarse, C_in) on the sites of ``like.geometry.conv(f, s)``
    like : SparseTensor whose sites the result takes
    weight : Parameter (f**d, C_in, C_out); bias : Parameter (C_out,) or None
    Returns a SparseTensor (like.n_active, C_out) on like's geometry, ground ``b`` (0 with
    ``ground_state=False``).
    """
    what = f"InverseConvolution(filter_size={filter_size}, stride={stride})"
    filter_size = _check_size(filter_size, "filter_size", what)
    stride = _check_size(stride, "stride", what)
    _check_conv(x, weight, bias, filter_size, what)
    geom = _check_like(x, like, filter_size, stride, what)
    rb, _ = inverse_rulebook(geom, filter_size, stride, what)
    return _transposed(x, weight, bias, rb, geom, ground_state, "inverse_convolution")


def unpooling(x: SparseTensor, like: SparseTensor, pool_size: int, stride: int | None = None,
              *, ground_state: bool = True) -> SparseTensor:
    """Each feature of ``x`` copied to every active site of ``like`` in its (p, s) window,
    summed where windows overlap (see the module docstring).

    Parameters
    ----------
    x : SparseTensor (n_coarse, C) on the sites of ``like.geometry.conv(p, s)``
    like : SparseTensor whose sites the result takes
    Returns a SparseTensor (like.n_active, C) on like's geometry, ground x's ground (0 with
    ``ground_state=False``).
    """
    what = "UnPooling"
    pool_size = _check_size(pool_size, "pool_size", what)
    s = pool_size if stride is None else _check_size(stride, "stride", what)
    _check_sparse(x, what)
    geom = _check_like(x, like, pool_size, s, what)
    rb, _ = geom.conv(pool_size, s, what)          # fine i -> coarse o pairs
    Kn = backend.kernels(x.device)
    xp = backend.xp(x.device)
    vol = x.dtype.type(rb.kernel_volume)
    if pool_size == s:      # disjoint windows: each fine site has one, a plain copy
        src = xp.empty(rb.n_in, dtype=xp.int32)
        src[rb.in_idx] = rb.out_idx
        feats = xp.ascontiguousarray(x.features[src])
    else:                   # average pooling's backward spreads g / K over each window
        feats, _ = Kn.avgpool_backward(x.features, rb)
        feats = feats * vol
    ground = x.ground.copy() if ground_state else xp.zeros_like(x.ground)
    out = SparseTensor._make(geom, feats, ground)
    if not is_grad_enabled():
        return out
    zero = xp.zeros_like(x.ground)

    def backward(grad):
        gy, gg = grad
        gx = Kn.avgpool_forward(xp.ascontiguousarray(gy), zero, rb) * vol   # window sums
        return ((gx, gg.copy() if ground_state else xp.zeros_like(gg)),)

    return record(out, [x], backward, "unpooling")


# -- modules ------------------------------------------------------------------------------------
def _split_pair(inp: Any, what: str) -> tuple[SparseTensor, SparseTensor]:
    if not isinstance(inp, tuple) or len(inp) != 2:
        raise TypeError(f"{what} takes a tuple (x, like): x the tensor to put back, like the "
                        f"tensor whose sites the result takes; got {type(inp).__name__}")
    x, like = inp
    _check_sparse(x, what)
    if not isinstance(like, SparseTensor):
        raise TypeError(f"{what}: like must be a SparseTensor, got {type(like).__name__}")
    return x, like


@_register
class Deconvolution(_ConvBase):
    """Sparse transposed convolution of size ``filter_size`` and ``stride``: the input's N^d
    grid becomes ((N - 1) * s + f)^d; input site i adds ``W_k^T x[i]`` to output site
    ``i * s + k``. ``weight`` (f**dim, C_in, C_out) (``weight[k, ci, co] ==
    torch_weight[ci, co, i0, i1]``, PyTorch's ConvTranspose layout), ``bias`` (C_out,).

    Exact against the dense transposed convolution when the input's ground is 0 (always in
    zero-ground mode); a nonzero input ground in ground-state mode is refused (see
    :mod:`sparsecnn.deconv`).
    """

    def __init__(self, in_channels: int, out_channels: int, filter_size: int, stride: int, *,
                 dim: int = 2, bias: bool = True, dtype: Any = np.float32,
                 seed: int | None = None) -> None:
        self.stride = _check_int(stride, "stride")
        self._init_conv(in_channels, out_channels, filter_size, dim, bias, dtype, seed)

    def forward(self, x: SparseTensor) -> SparseTensor:
        self._check_dim(x)
        return deconvolution(x, self.weight, self.bias, self.filter_size, self.stride,
                             ground_state=self.ground_state)

    def input_size(self, output_size: int) -> int:
        m = output_size - self.filter_size
        if m < 0 or m % self.stride:
            raise ValueError(f"{self!r}: no input size gives output size {output_size} "
                             f"(output sizes are (N - 1) * {self.stride} + "
                             f"{self.filter_size})")
        return m // self.stride + 1

    def _spec_args(self) -> dict[str, Any]:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    filter_size=self.filter_size, stride=self.stride, dim=self.dim,
                    bias=self.bias is not None)


@_register
class InverseConvolution(Deconvolution):
    """A transposed convolution back onto the sites of the tensor a strided (f, s)
    convolution or pooling came from: ``layer((x, like))``, x on the sites of like's (f, s)
    window output, the result on like's sites (U-Net decoders). Same weight layout as
    :class:`Deconvolution`; see :func:`sparsecnn.deconv.inverse_convolution`."""

    def forward(self, inp: tuple[SparseTensor, SparseTensor]) -> SparseTensor:
        x, like = _split_pair(inp, repr(self))
        self._check_dim(x)
        return inverse_convolution(x, like, self.weight, self.bias, self.filter_size,
                                   self.stride, ground_state=self.ground_state)


@_register
class UnPooling(Module):
    """Weightless unpooling: ``layer((x, like))`` copies each feature of x (on the sites of
    like's (pool_size, stride) window output) to every active site of like in its window,
    summed where windows overlap; the result is on like's sites."""

    def __init__(self, pool_size: int, stride: int | None = None, *, dim: int = 2) -> None:
        self.pool_size = _check_int(pool_size, "pool_size")
        self.stride = self.pool_size if stride is None else _check_int(stride, "stride")
        self.dim = _check_dim_arg(dim)

    def forward(self, inp: tuple[SparseTensor, SparseTensor]) -> SparseTensor:
        x, like = _split_pair(inp, repr(self))
        _check_input_dim(self, x)
        return unpooling(x, like, self.pool_size, self.stride, ground_state=self.ground_state)

    def input_size(self, output_size: int) -> int:
        m = output_size - self.pool_size
        if m < 0 or m % self.stride:
            raise ValueError(f"{self!r}: output size {output_size} is not (N - 1) * "
                             f"{self.stride} + {self.pool_size} for any N")
        return m // self.stride + 1

    def _spec_args(self) -> dict[str, Any]:
        return dict(pool_size=self.pool_size, stride=self.stride, dim=self.dim)
