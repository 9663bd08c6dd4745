"""Heads: global pooling of a sparse tensor to a dense (B, C) Tensor, and the dense-Tensor
forms of the activations, dropout and batch norm, so ``[FC -> ReLU]*K -> FC`` heads are
``Sequential`` s like the rest.

Global pooling (:func:`global_max_pool`, :func:`global_average_pool`, and the modules
:class:`GlobalMaxPooling`, :class:`GlobalAveragePooling`) of a SparseTensor with B samples,
C channels, on a grid of V = prod(spatial_shape) sites:

- ground-state mode (the default): the dense global pool of ``x.to_dense()``. Every inactive
  site holds the ground, so the max of sample b is ``max(its active features, ground)`` when
  the sample has an inactive site (``n_b < V``), and the mean is
  ``(sum of its active features + (V - n_b) * ground) / V``;
- zero-ground mode (``ground_state=False``, or ``layer.set_ground_state(False)``): pool the
  sample's active sites only; a sample with no active site gives 0 (for both).

Cost is linear in the active sites and never depends on V: the rows are ordered once by
(sample, row-major site position) (cached on the geometry), then reduced per sample in
fixed-size chunks (no window, no rulebook, no dense array). Deterministic on both devices (no
float atomics; the GPU kernel is ``_gpu/kernels/global_pool.cu``).

Ties in the max (and its gradient) are resolved the same way on both devices: the ground
wins a tie with an active value; among active sites the first in row-major order of the site
coordinates wins (that is the dense reference's rule too, where the ground is not involved).
NaN never wins (unless every candidate is NaN; NaN inputs need ``allow_nonfinite``).
Gradients: the max sends each (sample, channel) gradient to its winning site, or to the
input's ground when the ground won; the mean sends ``g / V`` to every active site of the
sample and ``g (V - n_b) / V`` to the ground (zero-ground mode: ``g / n_b`` to the active
sites, nothing to the ground).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import backend
from .autograd import Parameter, record
from .functional import (
    _check_bn_options,
    _check_param,
    _check_sparse,
    colsum,
    update_running_stats,
)
from .nn import Module, _register
from .tensor import SparseTensor, Tensor

__all__ = [
    "GlobalMaxPooling", "GlobalAveragePooling", "global_max_pool", "global_average_pool",
    "dense_relu", "dense_leaky_relu", "dense_dropout", "dense_batch_norm",
]


# -- per-sample segments -----------------------------------------------------------------------
def _segments(x: SparseTensor) -> tuple[Any, Any, Any]:
    """(order (n,) int32, seg (B + 1,) int64, counts (B,) int64) of ``x``'s geometry: the rows
    sorted by sample, then by row-major site position; sample b owns the sorted positions
    [seg[b], seg[b + 1]) and has counts[b] active sites. Built once per geometry."""
    geom = x.geometry
    hit = geom._cache.get(("global_pool_segments",))
    if hit is not None:
        return hit
    xp = backend.xp(x.device)
    c = geom.coords
    key = c[:, 0].astype(np.int64)
    for j, n in enumerate(geom.spatial_shape):       # fits: check_packable (< 2**62)
        key = key * n + c[:, 1 + j].astype(np.int64)
    order = xp.argsort(key).astype(np.int32)          # keys are unique: any sort gives this
    sorted_b = c[order, 0] if geom.n_active else xp.zeros(0, dtype=np.int32)
    seg = xp.searchsorted(sorted_b, xp.arange(geom.batch_size + 1, dtype=np.int32),
                          side="left").astype(np.int64)
    hit = geom._cache[("global_pool_segments",)] = (order, seg, seg[1:] - seg[:-1])
    return hit


def _volume(x: SparseTensor) -> int:
    return math.prod(x.spatial_shape)


# -- global pooling ----------------------------------------------------------------------------
def global_max_pool(x: SparseTensor, *, ground_state: bool = True) -> Tensor:
    """Max over all sites of each sample: SparseTensor (B samples, C channels) -> Tensor (B, C).

    Ground-state mode: the ground is a candidate for every sample with an inactive site (it
    wins ties); ``ground_state=False``: active sites only, 0 for a sample without any.
    """
    _check_sparse(x, "GlobalMaxPooling")
    xp = backend.xp(x.device)
    order, seg, counts = _segments(x)
    _, m, arg = backend.kernels(x.device).segment_sum_max(x.features, order, seg)
    if ground_state:
        has_gap = (counts < _volume(x))[:, None]
        ground_won = has_gap & ~(m > x.ground[None, :])
        out = xp.where(ground_won, x.ground[None, :], m)
    else:
        ground_won = xp.zeros(m.shape, dtype=bool)
        out = xp.where((counts == 0)[:, None], x.dtype.type(0), m)
    out = Tensor(xp.ascontiguousarray(out, dtype=x.dtype))
    n, C = x.features.shape

    def backward(g):
        gf = xp.zeros((n, C), dtype=x.dtype)
        to_site = ~ground_won & (arg >= 0)
        cols = xp.broadcast_to(xp.arange(C, dtype=np.int32)[None, :], arg.shape)
        gf[arg[to_site], cols[to_site]] = g[to_site]       # one (row, channel) per winner
        if ground_state:
            gg = colsum(xp.where(ground_won, g, x.dtype.type(0)))
        else:
            gg = xp.zeros(C, dtype=x.dtype)
        return ((gf, gg),)

    return record(out, [x], backward, "global_max_pool")


def global_average_pool(x: SparseTensor, *, ground_state: bool = True) -> Tensor:
    """Mean over all sites of each sample: SparseTensor (B samples, C channels) -> Tensor (B, C).

    Ground-state mode: the inactive sites count as the ground, ``V - n_b`` times (V the grid's
    sites); ``ground_state=False``: the mean of the active sites, 0 for a sample without any.
    """
    _check_sparse(x, "GlobalAveragePooling")
    xp = backend.xp(x.device)
    order, seg, counts = _segments(x)
    total, _, _ = backend.kernels(x.device).segment_sum_max(x.features, order, seg)
    t = x.dtype.type
    V = _volume(x)
    cnt = counts.astype(x.dtype)
    if ground_state:
        inactive = (t(V) - cnt)[:, None]
        out = (total + inactive * x.ground[None, :]) / t(V)
        scale = xp.full(counts.shape, t(1.0 / V), dtype=x.dtype)
    else:
        scale = t(1) / xp.maximum(cnt, t(1))
        out = total * scale[:, None]
    out = Tensor(xp.ascontiguousarray(out, dtype=x.dtype))
    b_row = x.coords[:, 0]

    def backward(g):
        gf = xp.ascontiguousarray(g[b_row] * scale[b_row][:, None], dtype=x.dtype)
        if ground_state:
            gg = colsum(xp.ascontiguousarray(g * (inactive / t(V)), dtype=x.dtype))
        else:
            gg = xp.zeros(x.channels, dtype=x.dtype)
        return ((gf, gg),)

    return record(out, [x], backward, "global_average_pool")


@_register
class GlobalMaxPooling(Module):
    """SparseTensor (B samples, C channels) -> dense Tensor (B, C): the max over every site
    of each sample (:func:`global_max_pool`; ground-state or zero-ground mode)."""

    def forward(self, x: SparseTensor) -> Tensor:
        return global_max_pool(x, ground_state=self.ground_state)

    def input_size(self, output_size: int) -> int:
        raise ValueError("GlobalMaxPooling takes any input size; its output has no spatial "
                         "size to work back from")


@_register
class GlobalAveragePooling(Module):
    """SparseTensor (B samples, C channels) -> dense Tensor (B, C): the mean over every site
    of each sample (:func:`global_average_pool`; ground-state or zero-ground mode)."""

    def forward(self, x: SparseTensor) -> Tensor:
        return global_average_pool(x, ground_state=self.ground_state)

    def input_size(self, output_size: int) -> int:
        raise ValueError("GlobalAveragePooling takes any input size; its output has no "
                         "spatial size to work back from")


# -- dense forms of the activations, dropout and batch norm ------------------------------------
def _check_dense(x: Any, what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} expects a Tensor input, got {type(x).__name__}")


def dense_relu(x: Tensor) -> Tensor:
    """``max(x, 0)`` elementwise on a dense Tensor of any shape."""
    _check_dense(x, "ReLU")
    xp = backend.xp(x.device)
    y = xp.maximum(x.data, x.dtype.type(0))
    return record(Tensor(y), [x], lambda g: (g * (y > 0),), "relu")


def dense_leaky_relu(x: Tensor, negative_slope: float = 0.01) -> Tensor:
    """``x if x > 0 else negative_slope * x`` elementwise on a dense Tensor (0 <= slope < 1)."""
    _check_dense(x, "LeakyReLU")
    xp = backend.xp(x.device)
    a = x.dtype.type(negative_slope)
    v = x.data
    out = Tensor(xp.maximum(v, v * a))

    def backward(g):
        m = (v > 0).astype(x.dtype)
        m *= 1 - a
        m += a
        return (g * m,)

    return record(out, [x], backward, "leaky_relu")


def dense_dropout(x: Tensor, p: float, rng: Any, *, channelwise: bool = False,
                  batchwise: bool = False) -> Tensor:
    """Inverted dropout of a dense Tensor (B, C, ...) in training mode: each value is zeroed
    with probability p and the rest scaled by 1 / (1 - p); ``channelwise``: one draw per
    (sample, channel); ``batchwise``: one draw per channel for the whole batch. ``rng`` is a
    generator of the array module of ``x``'s device."""
    _check_dense(x, "Dropout")
    if not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"Dropout: p must be a probability in [0, 1), got {p!r}")
    if p == 0:
        return x
    if (channelwise or batchwise) and x.ndim < 2:
        raise ValueError(f"Dropout: channel-wise dropout needs a (B, C, ...) input, got shape "
                         f"{x.shape}")
    xp = backend.xp(x.device)
    keep = 1.0 - p
    if batchwise:
        shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    elif channelwise:
        shape = x.shape[:2] + (1,) * (x.ndim - 2)
    else:
        shape = x.shape
    m = rng.random(shape) < keep
    scale = xp.asarray(xp.broadcast_to(m, x.shape) / keep, dtype=x.dtype)
    return record(Tensor(x.data * scale), [x], lambda g: (g * scale,), "dropout")


def dense_batch_norm(x: Tensor, gamma: Parameter, beta: Parameter, running_mean: Any,
                     running_var: Any, *, training: bool, momentum: float = 0.1,
                     eps: float = 1e-5) -> Tensor:
    """Batch normalisation of a dense Tensor (B, C) over the batch, with the sparse
    BatchNorm's semantics: training uses the batch mean and (biased) variance and moves
    ``running_mean``/``running_var`` (updated in place) towards the mean and the unbiased
    variance by ``momentum`` (B = 1: the variance itself); evaluation uses the running
    statistics. ``y = gamma (x - mean) / sqrt(var + eps) + beta``."""
    _check_dense(x, "BatchNorm")
    _check_bn_options(eps, momentum)
    if x.ndim != 2:
        raise ValueError(f"BatchNorm on a dense Tensor expects shape (B, C), got {x.shape}")
    C = gamma.shape[0] if isinstance(gamma, Parameter) else -1
    if x.shape[1] != C:
        raise ValueError(f"BatchNorm expects {C} input channels, but the input has "
                         f"{x.shape[1]}")
    _check_param(gamma, x, "weight", (C,), "BatchNorm")
    _check_param(beta, x, "bias", (C,), "BatchNorm")
    xp = backend.xp(x.device)
    B = x.shape[0]
    v = xp.ascontiguousarray(x.data)
    if training:
        if B == 0:
            raise ValueError("BatchNorm in training mode needs a non-empty batch")
        mean = colsum(v) / B
        var = colsum(xp.ascontiguousarray((v - mean) ** 2)) / B
        update_running_stats(running_mean, running_var, mean, var, B, momentum)
    else:
        mean, var = running_mean.astype(x.dtype), running_var.astype(x.dtype)
    inv = 1.0 / xp.sqrt(var + eps)
    xh = (v - mean) * inv
    out = Tensor((gamma.data * xh + beta.data).astype(x.dtype))

    def backward(g):
        g = xp.ascontiguousarray(g)
        g_sum, gxh_sum = colsum(g), colsum(xp.ascontiguousarray(g * xh))
        if training:
            gx = gamma.data * inv * (g - g_sum / B - xh * (gxh_sum / B))
        else:
            gx = gamma.data * inv * g
        return gx.astype(x.dtype), gxh_sum.astype(x.dtype), g_sum.astype(x.dtype)

    return record(out, [x, gamma, beta], backward, "batch_norm")
