"""Depthwise convolutions: one filter per channel (``groups = C`` in the dense libraries).

``DepthwiseConvolution(C, f, s)`` is the valid convolution of design.md with a diagonal
filter: ``weight`` (K, C), K = f**d in the row-major window order of the dense convolution,
``bias`` (C,). On the ground state it is exact against the dense depthwise convolution:

    y[o, c] = g_out[c] + sum over active pairs (i, k) of W[k, c] (x[i, c] - g_in[c])
    g_out = b + (sum_k W[k]) * g_in

(output sites, and the rulebook, are the convolution's). ``SubmanifoldDepthwiseConvolution``
(odd f) keeps the input sites, as the submanifold convolution does. With
``ground_state=False`` the bias applies at active outputs only and inactive inputs are 0.
A ``NetworkInNetwork`` after it makes the depthwise-separable convolution.

The sparse work is the backends' ``depthwise_forward`` / ``depthwise_backward`` kernels
(NumPy on the CPU, ``kernels/depthwise.cu`` on the GPU): deterministic on both devices.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import backend
from .autograd import Parameter, is_grad_enabled, record
from .functional import _check_param, _check_size, _check_sparse, colsum
from .nn import (
    Module,
    _check_dim_arg,
    _check_dtype,
    _check_input_dim,
    _check_int,
    _check_weight_size,
    _check_window_volume,
    _register,
    he_normal,
)
from .tensor import SparseTensor

__all__ = ["depthwise_convolution", "submanifold_depthwise_convolution",
           "DepthwiseConvolution", "SubmanifoldDepthwiseConvolution"]


# -- the op -----------------------------------------------------------------------------------
def _check_depthwise(x: SparseTensor, weight: Parameter, bias: Parameter | None,
                     filter_size: int, what: str) -> None:
    """The input, weight (f**d, C) and bias (C,) fit together."""
    _check_sparse(x, what)
    if not isinstance(weight, Parameter):
        raise TypeError(f"{what}: weight must be a Parameter, got {type(weight).__name__}")
    if len(weight.shape) != 2:
        raise ValueError(f"{what}: weight must have shape (filter_size**dim, channels), got "
                         f"{weight.shape}")
    if weight.shape[1] != x.channels:
        raise ValueError(f"{what} expects {weight.shape[1]} input channels, but the input has "
                         f"{x.channels}")
    _check_param(weight, x, "weight", (filter_size ** x.dim, x.channels), what)
    if bias is not None:
        _check_param(bias, x, "bias", (x.channels,), what)


def _depthwise(x: SparseTensor, weight: Parameter, bias: Parameter | None, rb, out_geom,
               ground_state: bool, name: str) -> SparseTensor:
    K = backend.kernels(x.device)
    xp = backend.xp(x.device)
    W = xp.ascontiguousarray(weight.data)
    C = W.shape[1]
    b = bias.data if bias is not None else xp.zeros(C, W.dtype)
    if ground_state:
        g_in = x.ground
        W_sum = W.sum(axis=0)               # maps g_in to g_out, channel by channel
        g_out = b + W_sum * g_in
        row = g_out
    else:
        g_in = xp.zeros_like(x.ground)
        W_sum = None
        g_out = xp.zeros(C, W.dtype)
        row = b
    feats = K.depthwise_forward(x.features, W, xp.ascontiguousarray(row), g_in, rb)
    out = SparseTensor._make(out_geom, feats, g_out)
    if not is_grad_enabled():
        return out

    def backward(grad):
        gy, gg = grad
        need_x = x.requires_grad
        gx, gW = K.depthwise_backward(x.features, W, g_in, xp.ascontiguousarray(gy), rb,
                                      grad_input=need_x)
        G = gg + colsum(gy) if ground_state else colsum(gy)   # d/d g_out, or d/d b
        if ground_state:
            gW = gW + g_in[None, :] * G[None, :]
        grad_x = None
        if need_x:
            g_gin = W_sum * G - colsum(gx) if ground_state else xp.zeros_like(g_in)
            grad_x = (gx, g_gin)
        return grad_x, gW, G if bias is not None else None

    return record(out, [x, weight, bias], backward, name)


def depthwise_convolution(x: SparseTensor, weight: Parameter, bias: Parameter | None,
                          filter_size: int, stride: int = 1, *,
                          ground_state: bool = True) -> SparseTensor:
    """Valid sparse depthwise convolution (the sites and pairs of ``convolution``).

    ``y[o, c] = g_out[c] + sum over active pairs (i, k) of W[k, c] (x[i, c] - g_in[c])`` with
    ``g_out = b + (sum_k W[k]) * g_in``.

    Parameters
    ----------
    x : SparseTensor with C channels, spatial size N per dim, (N - f) % s == 0
    weight : Parameter of shape (f**d, C)
    bias : Parameter of shape (C,) or None
    """
    what = f"DepthwiseConvolution(filter_size={filter_size}, stride={stride})"
    filter_size = _check_size(filter_size, "filter_size", what)
    stride = _check_size(stride, "stride", what)
    _check_depthwise(x, weight, bias, filter_size, what)
    rb, out_geom = x.geometry.conv(filter_size, stride, "DepthwiseConvolution")
    return _depthwise(x, weight, bias, rb, out_geom, ground_state, "depthwise_convolution")


def submanifold_depthwise_convolution(x: SparseTensor, weight: Parameter,
                                      bias: Parameter | None, filter_size: int, *,
                                      ground_state: bool = True) -> SparseTensor:
    """Submanifold depthwise convolution (odd f): output sites = input sites, the window
    centred on them; inactive neighbours and positions outside the grid count as the ground.

    weight : Parameter (f**d, C); bias : Parameter (C,) or None
    """
    what = f"SubmanifoldDepthwiseConvolution(filter_size={filter_size})"
    filter_size = _check_size(filter_size, "filter_size", what)
    if filter_size % 2 == 0:
        raise ValueError(f"{what}: filter_size must be odd, got {filter_size}")
    _check_depthwise(x, weight, bias, filter_size, what)
    rb = x.geometry.submanifold(filter_size)
    return _depthwise(x, weight, bias, rb, x.geometry, ground_state,
                      "submanifold_depthwise_convolution")


# -- the modules ------------------------------------------------------------------------------
class _DepthwiseBase(Module):
    """Checked sizes, He-normal weight (fan-in f**d), zero bias."""

    def _init_depthwise(self, channels: int, filter_size: int, dim: int, bias: bool,
                        dtype: Any, seed: int | None) -> None:
        self.channels = _check_int(channels, "channels")
        self.filter_size = _check_int(filter_size, "filter_size")
        self.dim = _check_dim_arg(dim)
        dtype = _check_dtype(dtype)
        K = _check_window_volume(self.filter_size, self.dim)
        _check_weight_size((K, self.channels), "(filter_size**dim, channels)")
        rng = np.random.default_rng(seed)
        self.weight = Parameter(he_normal(rng, (K, self.channels), K, dtype=dtype))
        self.bias = Parameter(np.zeros(self.channels, dtype=dtype)) if bias else None

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.filter_size ** self.dim, self.channels),
                "bias": (self.channels,)}


@_register
class DepthwiseConvolution(_DepthwiseBase):
    """Valid depthwise convolution of size ``filter_size`` and ``stride``: one filter per
    channel. ``weight``: (f**dim, C), row-major window offsets; ``bias``: (C,).

    Input SparseTensor (n, C) on an N^d grid with ``(N - f) % s == 0``; output (n', C) on the
    ``((N - f) / s + 1)^d`` grid, active where the window holds an active input."""

    def __init__(self, channels: int, filter_size: int, stride: int = 1, *, dim: int = 2,
                 bias: bool = True, dtype: Any = np.float32, seed: int | None = None) -> None:
        self.stride = _check_int(stride, "stride")
        self._init_depthwise(channels, filter_size, dim, bias, dtype, seed)

    def forward(self, x: SparseTensor) -> SparseTensor:
        _check_input_dim(self, x)
        return depthwise_convolution(x, self.weight, self.bias, self.filter_size, self.stride,
                                     ground_state=self.ground_state)

    def input_size(self, output_size: int) -> int:
        return (output_size - 1) * self.stride + self.filter_size

    def _spec_args(self) -> dict[str, Any]:
        return dict(channels=self.channels, filter_size=self.filter_size, stride=self.stride,
                    dim=self.dim, bias=self.bias is not None)


@_register
class SubmanifoldDepthwiseConvolution(_DepthwiseBase):
    """Submanifold depthwise convolution, odd ``filter_size``: output sites = input sites."""

    def __init__(self, channels: int, filter_size: int, *, dim: int = 2, bias: bool = True,
                 dtype: Any = np.float32, seed: int | None = None) -> None:
        if _check_int(filter_size, "filter_size") % 2 == 0:
            raise ValueError(f"filter_size must be odd for a submanifold depthwise "
                             f"convolution, got {filter_size}")
        self._init_depthwise(channels, filter_size, dim, bias, dtype, seed)

    def forward(self, x: SparseTensor) -> SparseTensor:
        _check_input_dim(self, x)
        return submanifold_depthwise_convolution(x, self.weight, self.bias, self.filter_size,
                                                 ground_state=self.ground_state)

    def _spec_args(self) -> dict[str, Any]:
        return dict(channels=self.channels, filter_size=self.filter_size, dim=self.dim,
                    bias=self.bias is not None)
