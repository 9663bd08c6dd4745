"""Differentiable ops on sparse tensors, one function per op.

Each op validates its arguments once, calls ``backend.kernels(device).<kernel>`` for the
sparse work (array-module code for elementwise work), and records a backward closure.
Every op propagates the ground state (the value of the inactive sites) exactly as the dense
network would treat them; see design.md. With ``ground_state=False`` an op follows the other
libraries instead: inactive sites are 0, biases apply at active sites only, max-pooling looks
at active sites only.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import backend
from .autograd import Parameter, is_grad_enabled, record
from .tensor import SparseTensor, Tensor

__all__ = [
    "convolution", "submanifold_convolution", "max_pooling", "average_pooling",
    "network_in_network", "leaky_relu", "relu", "dropout", "batch_norm", "to_dense",
    "linear", "cross_entropy", "log_softmax",
]


# -- validation helpers ---------------------------------------------------------------------
def _check_sparse(x: Any, what: str) -> None:
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{what} expects a SparseTensor input, got {type(x).__name__}")


def _check_param(p: Any, x: SparseTensor | Tensor, name: str, shape: tuple[int, ...],
                 what: str) -> None:
    """``p`` is a Parameter of ``shape`` with the input's dtype, on the input's device."""
    if not isinstance(p, Parameter):
        raise TypeError(f"{what}: {name} must be a Parameter, got {type(p).__name__}")
    if p.shape != shape:
        raise ValueError(f"{what}: {name} has shape {p.shape}, expected {shape}")
    if p.dtype != x.dtype:
        kind = "input features are" if isinstance(x, SparseTensor) else "input is"
        raise TypeError(f"{what}: {kind} {x.dtype} but {name} is {p.dtype}; cast the input "
                        f"(x.astype) or the layer (layer.astype)")
    if backend.device_of(p.data) != x.device:
        raise ValueError(f"{what}: input is on {x.device!r} but {name} is on "
                         f"{backend.device_of(p.data)!r}; move one with .to(device)")


_SIZE_MAX = 2**31 - 1


def _check_size(value: Any, name: str, what: str) -> int:
    """A filter size, pool size or stride: an int in [1, 2**31 - 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what}: {name} must be an int, got {value!r}")
    if not 1 <= value <= _SIZE_MAX:
        raise ValueError(f"{what}: {name} must be in [1, 2**31 - 1], got {value}")
    return int(value)


def _check_channels(x: SparseTensor, cin: int, what: str) -> None:
    if x.channels != cin:
        raise ValueError(f"{what} expects {cin} input channels, but the input has {x.channels}")


def colsum(a: Any) -> Any:
    """Column sums of a (n, C) array, by the backend's ``column_sums`` kernel: fixed row
    blocks summed in parallel, then the partials in block order (deterministic, and much
    faster than ``a.sum(axis=0)``, which walks a C-contiguous array one short row at a time).
    """
    K = backend.kernels(backend.device_of(a))
    return K.column_sums(backend.xp(backend.device_of(a)).ascontiguousarray(a))


# -- convolutions ---------------------------------------------------------------------------
def _conv_ground(x: SparseTensor, weight: Parameter, bias: Parameter | None,
                 ground_state: bool):
    """(g_in, W_sum, g_out, row): the input ground the kernels subtract, sum_k W_k, the
    output ground, and the row every output starts from."""
    xp = backend.xp(x.device)
    W = weight.data
    g_in = x.ground if ground_state else xp.zeros_like(x.ground)
    b = bias.data if bias is not None else xp.zeros(W.shape[2], W.dtype)
    if ground_state:
        W_sum = W.sum(axis=0)       # sum_k W_k: maps g_in to g_out
        g_out = b + g_in @ W_sum
        return g_in, W_sum, g_out, g_out
    return g_in, None, xp.zeros(W.shape[2], W.dtype), b


def _conv_grads(x: SparseTensor, weight: Parameter, bias: Parameter | None, rb, g_in, W_sum,
                ground_state: bool, grad) -> tuple:
    """Gradients (for x, weight, bias) of a convolution from those of its output."""
    K = backend.kernels(x.device)
    xp = backend.xp(x.device)
    W = weight.data
    gy, gg = grad
    need_x = x.requires_grad
    gx, gW = K.conv_backward(x.features, W, g_in, gy, rb, grad_input=need_x)
    G = gg + colsum(gy) if ground_state else colsum(gy)   # d/d g_out, or d/d b
    if ground_state:
        gW = gW + g_in[None, :, None] * G[None, None, :]
    grad_x = None
    if need_x:
        g_gin = W_sum @ G - colsum(gx) if ground_state else xp.zeros_like(g_in)
        grad_x = (gx, g_gin)
    return grad_x, gW, G if bias is not None else None


def _conv(x: SparseTensor, weight: Parameter, bias: Parameter | None, rb, out_geom,
          ground_state: bool, name: str) -> SparseTensor:
    K = backend.kernels(x.device)
    g_in, W_sum, g_out, row = _conv_ground(x, weight, bias, ground_state)
    feats = K.conv_forward(x.features, weight.data, row, g_in, rb)
    out = SparseTensor._make(out_geom, feats, g_out)
    if not is_grad_enabled():
        return out

    def backward(grad):
        return _conv_grads(x, weight, bias, rb, g_in, W_sum, ground_state, grad)

    return record(out, [x, weight, bias], backward, name)


def _check_conv(x: SparseTensor, weight: Parameter, bias: Parameter | None, filter_size: int,
                what: str) -> None:
    """A convolution's input, weight (f**d, C_in, C_out) and bias (C_out,) fit together."""
    _check_sparse(x, what)
    if not isinstance(weight, Parameter):
        raise TypeError(f"{what}: weight must be a Parameter, got {type(weight).__name__}")
    if len(weight.shape) != 3:
        raise ValueError(f"{what}: weight must have shape (filter_size**dim, C_in, C_out), "
                         f"got {weight.shape}")
    _check_channels(x, weight.shape[1], what)
    _check_param(weight, x, "weight", (filter_size ** x.dim, x.channels, weight.shape[2]), what)
    if bias is not None:
        _check_param(bias, x, "bias", (weight.shape[2],), what)


def convolution(x: SparseTensor, weight: Parameter, bias: Parameter | None, filter_size: int,
                stride: int = 1, *, ground_state: bool = True) -> SparseTensor:
    """Valid sparse convolution.

    ``y[o] = g_out + sum over active pairs (i, k) of W_k^T (x[i] - g_in)`` with
    ``g_out = b + sum_k W_k^T g_in``; output site o is active iff its window
    ``[o*s, o*s + f)^d`` holds an active input site.

    Parameters
    ----------
    x : SparseTensor with C_in channels, spatial size N per dim, (N - f) % s == 0
    weight : Parameter of shape (f**d, C_in, C_out)
    bias : Parameter of shape (C_out,) or None
    """
    what = f"Convolution(filter_size={filter_size}, stride={stride})"
    filter_size = _check_size(filter_size, "filter_size", what)
    stride = _check_size(stride, "stride", what)
    _check_conv(x, weight, bias, filter_size, what)
    rb, out_geom = x.geometry.conv(filter_size, stride, "Convolution")
    return _conv(x, weight, bias, rb, out_geom, ground_state, "convolution")


def submanifold_convolution(x: SparseTensor, weight: Parameter, bias: Parameter | None,
                            filter_size: int, *, ground_state: bool = True) -> SparseTensor:
    """Submanifold convolution (odd f): output sites = input sites, window centred on them.

    Inactive neighbours and positions outside the grid count as the input ground state.

    Parameters
    ----------
    x : SparseTensor with C_in channels
    weight : Parameter of shape (f**d, C_in, C_out); bias : Parameter (C_out,) or None
    """
    what = f"SubmanifoldConvolution(filter_size={filter_size})"
    filter_size = _check_size(filter_size, "filter_size", what)
    if filter_size % 2 == 0:
        raise ValueError(f"{what}: filter_size must be odd, got {filter_size}")
    _check_conv(x, weight, bias, filter_size, what)
    rb = x.geometry.submanifold(filter_size)
    return _conv(x, weight, bias, rb, x.geometry, ground_state, "submanifold_convolution")


# -- pooling --------------------------------------------------------------------------------
def max_pooling(x: SparseTensor, pool_size: int, stride: int | None = None, *,
                ground_state: bool = True,
                negative_slope: float | None = None) -> SparseTensor:
    """Max over each window's active sites and, if the window holds an inactive site, the
    ground state. The output ground is the input ground. Input (n, C) -> output (n_out, C).

    ``negative_slope`` (in [0, 1)) applies the (leaky) ReLU ``max(v, slope * v)`` to the
    result, features and ground, in the same pass: the values and gradients of max-pooling
    followed by ``leaky_relu`` (``relu`` for 0), without the extra pass over the features.
    """
    what = "MaxPooling"
    pool_size = _check_size(pool_size, "pool_size", what)
    s = pool_size if stride is None else _check_size(stride, "stride", what)
    _check_sparse(x, what)
    a = _check_slope(negative_slope, what)
    rb, out_geom = x.geometry.conv(pool_size, s, "MaxPooling")
    K = backend.kernels(x.device)
    g, g_out = _pool_grounds(x.ground, ground_state, a)
    feats, argmax = K.maxpool_forward(x.features, g, rb, negative_slope=a)
    out = SparseTensor._make(out_geom, feats, g_out)

    def backward(grad):
        return (_maxpool_grads(rb, x.ground, feats, argmax, ground_state, a, grad),)

    return record(out, [x], backward, "max_pooling")


def _check_slope(negative_slope: float | None, what: str) -> float | None:
    if negative_slope is not None and not (isinstance(negative_slope, (int, float))
                                           and 0 <= negative_slope < 1):
        raise ValueError(f"{what}: negative_slope must be None or a number in [0, 1), "
                         f"got {negative_slope!r}")
    return None if negative_slope is None else float(negative_slope)


def _pool_grounds(ground, ground_state: bool, a: float | None):
    """(candidate, output ground) of max-pooling an input whose ground is ``ground``: active
    sites only (ground_state=False) put -inf as the candidate, which never wins since a
    window always holds an active site."""
    xp = backend.xp(backend.device_of(ground))
    g = ground if ground_state else xp.full_like(ground, -xp.inf)
    g_out = ground if ground_state else ground * 0
    if a is not None:
        g_out = xp.maximum(g_out, g_out * ground.dtype.type(a))
    return g, g_out


def _maxpool_grads(rb, ground, feats, argmax, ground_state: bool, a: float | None, grad):
    """Gradient (features, ground) of max-pooling's input from that of its output."""
    K = backend.kernels(backend.device_of(feats))
    xp = backend.xp(backend.device_of(feats))
    gy, gg = grad
    gx, g_ground = K.maxpool_backward(gy, argmax, rb, negative_slope=a,
                                      output=feats if a is not None else None)
    if not ground_state:
        return gx, xp.zeros_like(ground)
    if a is not None:       # the output ground went through the activation too
        gg = xp.where(ground > 0, gg, gg * ground.dtype.type(a))
    return gx, g_ground + gg


def convolution_max_pooling(x: SparseTensor, weight: Parameter, bias: Parameter | None,
                            filter_size: int, stride: int, pool_size: int, *,
                            ground_state: bool = True, pool_ground_state: bool = True,
                            negative_slope: float | None = None) -> SparseTensor:
    """``max_pooling(convolution(x, ...), pool_size)`` (pool stride = pool size) in one
    kernel that never stores the convolution's output: the same values (the same argmax),
    the same gradients. ``Sequential`` uses it for a ``Convolution`` followed by such a
    ``MaxPooling``; ``negative_slope`` fuses a following activation as in max_pooling.

    Parameters
    ----------
    x : SparseTensor with C_in channels
    weight : Parameter of shape (f**d, C_in, C_out); bias : Parameter (C_out,) or None
    ground_state, pool_ground_state : those of the convolution and of the pooling
    Returns the pooled SparseTensor, (n_out, C_out), float32/float64 like x.
    """
    what = f"Convolution(filter_size={filter_size}, stride={stride})"
    filter_size = _check_size(filter_size, "filter_size", what)
    stride = _check_size(stride, "stride", what)
    pool_size = _check_size(pool_size, "pool_size", "MaxPooling")
    _check_conv(x, weight, bias, filter_size, what)
    a = _check_slope(negative_slope, "MaxPooling")
    rb, mid_geom = x.geometry.conv(filter_size, stride, "Convolution")
    prb, out_geom = mid_geom.conv(pool_size, pool_size, "MaxPooling")
    K = backend.kernels(x.device)
    if "conv_maxpool_forward" not in K.CAPABILITIES:    # this backend has the unfused pair
        return max_pooling(_conv(x, weight, bias, rb, mid_geom, ground_state, "convolution"),
                           pool_size, ground_state=pool_ground_state, negative_slope=a)
    g_in, W_sum, g_mid, row = _conv_ground(x, weight, bias, ground_state)
    g, g_out = _pool_grounds(g_mid, pool_ground_state, a)
    feats, argmax = K.conv_maxpool_forward(x.features, weight.data, row, g_in, rb, prb, g,
                                           negative_slope=a)
    out = SparseTensor._make(out_geom, feats, g_out)
    if not is_grad_enabled():
        return out

    def backward(grad):
        mid = _maxpool_grads(prb, g_mid, feats, argmax, pool_ground_state, a, grad)
        return _conv_grads(x, weight, bias, rb, g_in, W_sum, ground_state, mid)

    return record(out, [x, weight, bias], backward, "convolution_max_pooling")


def average_pooling(x: SparseTensor, pool_size: int, stride: int | None = None, *,
                    ground_state: bool = True) -> SparseTensor:
    """Mean over each whole window, inactive sites counting as the ground state."""
    what = "AveragePooling"
    pool_size = _check_size(pool_size, "pool_size", what)
    s = pool_size if stride is None else _check_size(stride, "stride", what)
    _check_sparse(x, what)
    rb, out_geom = x.geometry.conv(pool_size, s, "AveragePooling")
    K = backend.kernels(x.device)
    g = x.ground if ground_state else x.ground * 0
    feats = K.avgpool_forward(x.features, g, rb)
    out = SparseTensor._make(out_geom, feats, g)

    def backward(grad):
        gy, gg = grad
        gx, g_ground = K.avgpool_backward(gy, rb)
        return ((gx, g_ground + gg if ground_state else g * 0),)

    return record(out, [x], backward, "average_pooling")


# -- pointwise --------------------------------------------------------------------------------
def network_in_network(x: SparseTensor, weight: Parameter, bias: Parameter | None, *,
                       ground_state: bool = True) -> SparseTensor:
    """1x1 convolution: features (n, C_in) @ weight (C_in, C_out) + bias, and the ground alike."""
    what = "NetworkInNetwork"
    _check_sparse(x, what)
    if not isinstance(weight, Parameter) or len(weight.shape) != 2:
        raise TypeError(f"{what}: weight must be a Parameter of shape (C_in, C_out), got "
                        f"{weight!r}")
    _check_channels(x, weight.shape[0], what)
    _check_param(weight, x, "weight", (x.channels, weight.shape[1]), what)
    if bias is not None:
        _check_param(bias, x, "bias", (weight.shape[1],), what)
    xp = backend.xp(x.device)
    W = weight.data
    b = bias.data if bias is not None else xp.zeros(W.shape[1], W.dtype)
    feats = x.features @ W + b
    g_out = x.ground @ W + b if ground_state else xp.zeros(W.shape[1], W.dtype)
    out = SparseTensor._make(x.geometry, feats, g_out)

    def backward(grad):
        gy, gg = grad
        gx = gy @ W.T
        gW = x.features.T @ gy
        gb = colsum(gy)
        if ground_state:
            gW = gW + xp.outer(x.ground, gg)
            gb = gb + gg
            g_gin = W @ gg
        else:
            g_gin = xp.zeros_like(x.ground)
        return (gx, g_gin), gW, gb if bias is not None else None

    return record(out, [x, weight, bias], backward, "network_in_network")


def leaky_relu(x: SparseTensor, negative_slope: float = 0.01) -> SparseTensor:
    """``max(x, 0) + slope * min(x, 0)`` on the features and on the ground (0 <= slope < 1)."""
    _check_sparse(x, "LeakyReLU")
    xp = backend.xp(x.device)
    a = x.dtype.type(negative_slope)
    # for 0 <= a < 1, max(x, a x) is x where x > 0 and a x elsewhere
    out = SparseTensor._make(x.geometry, xp.maximum(x.features, x.features * a),
                             xp.maximum(x.ground, x.ground * a))

    def slope_of(v):     # 1 where v > 0, a elsewhere (arithmetic: where() branches per element)
        m = (v > 0).astype(x.dtype)
        m *= 1 - a
        m += a
        return m

    def backward(grad):
        gy, gg = grad
        return ((gy * slope_of(x.features), gg * slope_of(x.ground)),)

    return record(out, [x], backward, "leaky_relu")


def relu(x: SparseTensor) -> SparseTensor:
    """``max(x, 0)`` on the features and on the ground."""
    _check_sparse(x, "ReLU")
    xp = backend.xp(x.device)
    y, yg = xp.maximum(x.features, 0), xp.maximum(x.ground, 0)
    out = SparseTensor._make(x.geometry, y, yg)

    def backward(grad):   # holds the arrays, not `out`: no reference cycle through the node
        gy, gg = grad
        return ((gy * (y > 0), gg * (yg > 0)),)

    return record(out, [x], backward, "relu")


def dropout(x: SparseTensor, p: float, rng: np.random.Generator, *,
            channelwise: bool = False, batchwise: bool = False) -> SparseTensor:
    """Inverted dropout on the active sites' features (training mode). ``rng`` is a
    generator of the array module of ``x``'s device (numpy's, or cupy's).

    Each feature is zeroed with probability p and the rest scaled by 1/(1-p); with
    ``channelwise`` whole channels of a sample are dropped, and with ``batchwise`` too whole
    channels, with one mask for the whole batch. The ground keeps its expected value, so this
    is the one op where the sparse network differs from a dense one with the same masks.
    """
    _check_sparse(x, "Dropout")
    if p == 0:
        return x
    xp = backend.xp(x.device)
    keep = 1.0 - p
    if batchwise:
        m = xp.broadcast_to(rng.random((1, x.channels)) < keep, x.features.shape)
    elif channelwise:
        # one mask row per sample present (not per batch index: a large batch_size with few
        # sites must not cost batch_size * C random numbers); when every sample has sites
        # this is the same draw as one row per sample
        present, row = xp.unique(x.coords[:, 0], return_inverse=True)
        bm = rng.random((len(present), x.channels)) < keep
        m = bm[row.reshape(-1)]
    else:
        m = rng.random(x.features.shape) < keep
    scale = xp.asarray(m / keep, dtype=x.dtype)
    out = SparseTensor._make(x.geometry, x.features * scale, x.ground)
    return record(out, [x], lambda g: ((g[0] * scale, g[1]),), "dropout")


def _check_bn_options(eps: Any, momentum: Any) -> None:
    """BatchNorm needs eps > 0 (finite) and 0 <= momentum <= 1."""
    def real(v):
        return not isinstance(v, bool) and isinstance(v, (int, float, np.floating))
    if not real(eps) or not 0 < eps < np.inf:
        raise ValueError(f"BatchNorm: eps must be a finite number > 0, got {eps!r}")
    if not real(momentum) or not 0 <= momentum <= 1:
        raise ValueError(f"BatchNorm: momentum must be a number in [0, 1], got {momentum!r}")


def update_running_stats(running_mean: Any, running_var: Any, mean: Any, var: Any, n: int,
                         momentum: float) -> None:
    """Move BatchNorm's running statistics (in place) towards a batch's ``mean`` and biased
    ``var`` over ``n`` values, by ``momentum``; the variance as the unbiased estimate."""
    unbiased = var * (n / (n - 1)) if n > 1 else var
    running_mean *= 1 - momentum
    running_mean += momentum * mean
    running_var *= 1 - momentum
    running_var += momentum * unbiased


def batch_norm(x: SparseTensor, gamma: Parameter, beta: Parameter, running_mean, running_var,
               *, training: bool, momentum: float = 0.1, eps: float = 1e-5,
               ground_state: bool = True, sync: Any = None) -> SparseTensor:
    """Batch normalisation with statistics over the active sites.

    Training: per-channel mean and (biased) variance over the active features normalise the
    features and the ground alike; ``running_mean``/``running_var`` (arrays, updated in
    place) move towards them by ``momentum`` (the unbiased variance, as PyTorch does).
    Evaluation: the running statistics are used.

    ``sync`` (training only; a :class:`sparsecnn.distributed.BatchNormSync`): the statistics
    are those of the union of every rank's active sites: the per-channel sums and the site
    count are summed over the ranks, then the sums of squared deviations from that mean; the
    backward sums the two statistic-gradient sums likewise (weighted by each rank's share of
    the global batch, ``sync.weight``), so N ranks compute what one process with the whole
    batch computes.
    """
    _check_sparse(x, "BatchNorm")
    _check_bn_options(eps, momentum)
    _check_channels(x, gamma.shape[0] if isinstance(gamma, Parameter) else -1, "BatchNorm")
    _check_param(gamma, x, "weight", (x.channels,), "BatchNorm")
    _check_param(beta, x, "bias", (x.channels,), "BatchNorm")
    xp = backend.xp(x.device)
    n = x.n_active
    if training:
        if n == 0 and sync is None:
            raise ValueError("BatchNorm in training mode needs at least one active site")
        if sync is not None:
            s, cnt = sync.sum([colsum(x.features), n], x.dtype, x.device)
            n = int(round(float(cnt)))
            if n == 0:
                raise ValueError("BatchNorm in training mode needs at least one active site")
            mean = s / n
            var = sync.sum([colsum((x.features - mean) ** 2)], x.dtype, x.device)[0] / n
        else:
            mean = colsum(x.features) / n
            var = colsum((x.features - mean) ** 2) / n
        update_running_stats(running_mean, running_var, mean, var, n, momentum)
    else:
        mean, var = running_mean.astype(x.dtype), running_var.astype(x.dtype)
    inv = 1.0 / xp.sqrt(var + eps)
    xh = (x.features - mean) * inv
    gh = (x.ground - mean) * inv
    feats = gamma.data * xh + beta.data
    ground = gamma.data * gh + beta.data if ground_state else xp.zeros_like(x.ground)
    out = SparseTensor._make(x.geometry, feats.astype(x.dtype), ground.astype(x.dtype))

    def backward(grad):
        gy, gg = grad
        if not ground_state:
            gg = xp.zeros_like(gg)
        gy_sum, gyxh_sum = colsum(gy), colsum(gy * xh)
        g_gamma = gyxh_sum + gg * gh
        g_beta = gy_sum + gg
        if training:
            # the ground is an extra output that uses the statistics but is not part of them
            s1, s2 = gy_sum + gg, gyxh_sum + gg * gh
            if sync is not None:   # in units of this rank's loss: divided by its weight
                w = sync.weight
                s1, s2 = (v / w for v in sync.sum([s1 * w, s2 * w], x.dtype, x.device))
            s1, s2 = s1 / n, s2 / n
            gx = gamma.data * inv * (gy - s1 - xh * s2)
        else:
            gx = gamma.data * inv * gy
        g_gin = gamma.data * inv * gg
        return (gx.astype(x.dtype), g_gin.astype(x.dtype)), g_gamma, g_beta

    return record(out, [x, gamma, beta], backward, "batch_norm")


# -- dense side -------------------------------------------------------------------------------
def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 2**63


def _check_dense_size(shape: tuple[int, ...], dtype: Any) -> None:
    """Refuse a dense array larger than this machine's memory before allocating it (with
    overcommit, an allocation can succeed and the first write then kills the process)."""
    nbytes = np.dtype(dtype).itemsize
    for n in shape:
        nbytes *= int(n)
    limit = _physical_memory()
    if nbytes > limit:
        raise MemoryError(f"SparseToDense: the dense array (batch, *spatial_shape, channels) = "
                          f"{shape} of {np.dtype(dtype)} needs {nbytes / 2**30:.1f} GiB, more "
                          f"than this machine's {limit / 2**30:.1f} GiB of memory")


def to_dense(x: SparseTensor) -> Tensor:
    """(B, C, *spatial) Tensor with the features at the active sites and the ground elsewhere."""
    _check_sparse(x, "SparseToDense")
    xp = backend.xp(x.device)
    shape = (x.batch_size, *x.spatial_shape, x.channels)
    _check_dense_size(shape, x.dtype)
    dense = xp.empty(shape, dtype=x.dtype)
    dense[...] = x.ground
    idx = tuple(x.coords[:, j] for j in range(x.coords.shape[1]))
    if x.n_active:
        dense[idx] = x.features
    out = Tensor(xp.moveaxis(dense, -1, 1))

    def backward(g):
        gl = xp.moveaxis(g, 1, -1)
        gf = gl[idx] if x.n_active else xp.zeros((0, x.channels), x.dtype)
        gg = colsum(gl.reshape(-1, x.channels)) - colsum(gf)
        return ((xp.ascontiguousarray(gf), gg),)

    return record(out, [x], backward, "to_dense")


def linear(x: Tensor, weight: Parameter, bias: Parameter | None) -> Tensor:
    """x (B, C_in) @ weight (C_in, C_out) + bias (C_out,) -> (B, C_out)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"Linear expects a Tensor, got {type(x).__name__}")
    if not isinstance(weight, Parameter) or len(weight.shape) != 2:
        raise TypeError(f"Linear: weight must be a Parameter of shape (C_in, C_out), got "
                        f"{weight!r}")
    if x.ndim != 2 or x.shape[1] != weight.shape[0]:
        raise ValueError(f"Linear expects input of shape (B, {weight.shape[0]}), got {x.shape}")
    _check_param(weight, x, "weight", weight.shape, "Linear")
    if bias is not None:
        _check_param(bias, x, "bias", (weight.shape[1],), "Linear")
    W = weight.data
    y = x.data @ W
    if bias is not None:
        y = y + bias.data
    out = Tensor(y)

    def backward(g):
        return g @ W.T, x.data.T @ g, g.sum(axis=0) if bias is not None else None

    return record(out, [x, weight, bias], backward, "linear")


def log_softmax(logits: Any) -> Any:
    """Numerically stable log-softmax over the last axis of an array."""
    xp = backend.xp(backend.device_of(logits))
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))


def cross_entropy(logits: Tensor, labels: Any, *, label_smoothing: float = 0.0) -> Tensor:
    """Mean softmax cross-entropy.

    Parameters
    ----------
    logits : Tensor of shape (B, n_classes)
    labels : int array of shape (B,), values in [0, n_classes)
    label_smoothing : float in [0, 1): targets (1 - eps) one-hot + eps / n_classes
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a Tensor, got {type(logits).__name__}")
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (B, n_classes), got {logits.shape}")
    B, n_cls = logits.shape
    lab = np.asarray(backend.to_host(labels) if backend.device_of(labels) == "cuda" else labels)
    if lab.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got dtype {lab.dtype}")
    if lab.shape != (B,):
        raise ValueError(f"labels must have shape ({B},), got {lab.shape}")
    if B and (lab.min() < 0 or lab.max() >= n_cls):
        raise ValueError(f"labels must be in [0, {n_cls}), got values in "
                         f"[{lab.min()}, {lab.max()}]")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if B == 0:
        raise ValueError("cross_entropy of an empty batch is undefined")
    xp = backend.xp(logits.device)
    lab_d = backend.to_device(lab.astype(np.int64), logits.device)
    target = xp.zeros(logits.shape, dtype=logits.dtype)
    target[xp.arange(B), lab_d] = 1.0
    if label_smoothing:
        target = target * (1 - label_smoothing) + label_smoothing / n_cls
    lsm = log_softmax(logits.data)
    loss = -(target * lsm).sum() / B
    out = Tensor(xp.asarray(loss, dtype=logits.dtype).reshape(()))

    def backward(g):
        return (g * (xp.exp(lsm) - target) / B,)

    return record(out, [logits], backward, "cross_entropy")
