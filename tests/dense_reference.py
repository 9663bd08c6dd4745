"""Dense NumPy reference implementation (test oracle) for ``sparsecnn``.

Plain, slow-but-not-silly NumPy: forward and hand-written backward of every
layer in *dense* form.  Nothing here imports ``sparsecnn``; the sparse library
is compared against these functions.

Conventions
-----------
* Dense feature arrays have shape ``(B, C, *spatial)`` with ``d = len(spatial)``
  spatial dimensions (any ``d >= 1``).
* Masks of active sites have shape ``(B, *spatial)`` (bool).
* Convolution weights have shape ``(K, C_in, C_out)`` with ``K = f**d``; the
  window offset ``(i0, ..., i_{d-1})`` (relative to the window origin) has
  row-major index ``k = ((i0*f + i1)*f + i2)...``.  Hence
  ``weight[k, ci, co] == torch_weight[co, ci, i0, i1, ...]``.
* All arithmetic is done in float64; every result is cast back to the dtype of
  the input it belongs to (forward outputs: dtype of ``x``; gradients: dtype of
  the corresponding input).  Non-floating inputs give float64 results.
* Every ``*_backward`` takes the forward's inputs plus the upstream gradient
  and returns the gradients of the inputs (a tuple, in the documented order,
  or a single array where the layer has a single input).
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = [
    "window_offsets",
    "pooled_shape",
    "weight_to_torch_layout",
    "weight_from_torch_layout",
    "conv_forward",
    "conv_backward",
    "submanifold_forward",
    "submanifold_backward",
    "fold_ground_grad",
    "maxpool_forward",
    "maxpool_backward",
    "avgpool_forward",
    "avgpool_backward",
    "nin_forward",
    "nin_backward",
    "relu_forward",
    "relu_backward",
    "leaky_relu_forward",
    "leaky_relu_backward",
    "batchnorm_forward",
    "batchnorm_backward",
    "linear_forward",
    "linear_backward",
    "cross_entropy_forward",
    "cross_entropy_backward",
    "to_dense",
    "active_mask",
    "gather_sites",
    "sequential_forward",
    "sequential_backward",
    "deepcnet_input_size",
    "deepcnet_layers",
    "deepcnin_layers",
    "deepcnet_param_shapes",
    "deepcnin_param_shapes",
    "deepcnet_forward",
    "deepcnet_backward",
    "deepcnin_forward",
    "deepcnin_backward",
    "zero_inactive",
    "window_mask",
    "conv_zero_forward",
    "conv_zero_backward",
    "submanifold_zero_forward",
    "submanifold_zero_backward",
    "maxpool_zero_forward",
    "maxpool_zero_backward",
    "avgpool_zero_forward",
    "avgpool_zero_backward",
    "nin_zero_forward",
    "nin_zero_backward",
    "batchnorm_zero_forward",
    "batchnorm_zero_backward",
    "net_forward",
    "net_backward",
    "net_branch_margin",
]


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def _dtype_of(a) -> np.dtype:
    """Result dtype for an input: its own dtype if floating, else float64."""
    dt = np.asarray(a).dtype
    return dt if np.issubdtype(dt, np.floating) else np.dtype(np.float64)


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _cast(a, like) -> np.ndarray:
    return np.asarray(a, dtype=_dtype_of(like))


def _chan(v: np.ndarray, d: int) -> np.ndarray:
    """Reshape a per-channel vector (C,) to broadcast against (B, C, *spatial)."""
    return v.reshape((1, -1) + (1,) * d)


def _not_channel_axes(ndim: int) -> tuple:
    return (0,) + tuple(range(2, ndim))


def _sum_outer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum over batch and spatial positions of a[b,i,p] * b[b,o,p] -> (I, O)."""
    axes = _not_channel_axes(a.ndim)
    return np.tensordot(a, b, axes=(axes, axes))


def _check_features(x: np.ndarray, name: str = "x") -> int:
    if x.ndim < 3:
        raise ValueError(f"{name} must have shape (B, C, *spatial) with d >= 1, got {x.shape}")
    return x.ndim - 2


def window_offsets(f: int, d: int) -> list:
    """All window offsets (i0, ..., i_{d-1}) in [0, f)^d, in row-major order (index k)."""
    return list(itertools.product(range(f), repeat=d))


def pooled_shape(spatial, f: int, s: int) -> tuple:
    """Per-dim output size (N - f)//s + 1 of a valid window op.

    Raises ValueError unless f <= N and (N - f) % s == 0 in every dim.
    """
    if f < 1 or s < 1:
        raise ValueError(f"filter size and stride must be >= 1, got f={f}, s={s}")
    out = []
    for n in spatial:
        if n < f:
            raise ValueError(f"spatial size {n} smaller than filter size {f}")
        if (n - f) % s != 0:
            raise ValueError(f"(N - f) % s != 0 for N={n}, f={f}, s={s}")
        out.append((n - f) // s + 1)
    return tuple(out)


def _window(offset, out_shape, s) -> tuple:
    """Index selecting x[:, :, o*s + offset] for all output positions o (shape (B, C, *out_shape)).
    """
    return (slice(None), slice(None)) + tuple(
        slice(i, i + s * (n - 1) + 1, s) for i, n in zip(offset, out_shape, strict=True)
    )


def weight_to_torch_layout(w, f: int, d: int) -> np.ndarray:
    """(K, C_in, C_out) library layout -> (C_out, C_in, f, ..., f) torch layout."""
    w = np.asarray(w)
    if w.ndim != 3 or w.shape[0] != f**d:
        raise ValueError(f"weight shape {w.shape} incompatible with f={f}, d={d}")
    k, cin, cout = w.shape
    return np.ascontiguousarray(np.transpose(w, (2, 1, 0)).reshape((cout, cin) + (f,) * d))


def weight_from_torch_layout(tw) -> np.ndarray:
    """(C_out, C_in, f, ..., f) torch layout -> (K, C_in, C_out) library layout, K = f**d."""
    tw = np.asarray(tw)
    if tw.ndim < 3:
        raise ValueError(f"torch weight must have shape (C_out, C_in, f, ...), got {tw.shape}")
    cout, cin = tw.shape[:2]
    return np.ascontiguousarray(np.transpose(tw.reshape(cout, cin, -1), (2, 1, 0)))


# --------------------------------------------------------------------------
# valid convolution
# --------------------------------------------------------------------------


def _check_conv_weight(w, b, cin, f, d):
    if w.ndim != 3 or w.shape[0] != f**d or w.shape[1] != cin:
        raise ValueError(f"weight shape {w.shape} != (f**d={f**d}, C_in={cin}, C_out)")
    if b.shape != (w.shape[2],):
        raise ValueError(f"bias shape {b.shape} != (C_out={w.shape[2]},)")


def _conv_fwd64(x, w, b, f, s):
    d = x.ndim - 2
    out_sp = pooled_shape(x.shape[2:], f, s)
    y = np.broadcast_to(_chan(b, d), (x.shape[0], w.shape[2]) + out_sp).copy()
    for k, off in enumerate(window_offsets(f, d)):
        y += np.einsum("bi...,io->bo...", x[_window(off, out_sp, s)], w[k])
    return y


def _conv_bwd64(x, w, f, s, gy):
    d = x.ndim - 2
    out_sp = pooled_shape(x.shape[2:], f, s)
    gx = np.zeros_like(x)
    gw = np.zeros_like(w)
    for k, off in enumerate(window_offsets(f, d)):
        sl = _window(off, out_sp, s)
        gx[sl] += np.einsum("bo...,io->bi...", gy, w[k])
        gw[k] = _sum_outer(x[sl], gy)
    gb = gy.sum(axis=_not_channel_axes(gy.ndim))
    return gx, gw, gb


def conv_forward(x, weight, bias, f: int, s: int) -> np.ndarray:
    """y[b,co,o] = bias[co] + sum_{k,ci} weight[k,ci,co] x[b,ci,o*s+i_k]; x (B,Ci,*N), weight
    (f**d,Ci,Co) -> y (B,Co,*((N-f)//s+1)).
    """
    x64, w64, b64 = _f64(x), _f64(weight), _f64(bias)
    d = _check_features(x64)
    _check_conv_weight(w64, b64, x64.shape[1], f, d)
    return _cast(_conv_fwd64(x64, w64, b64, f, s), x)


def conv_backward(x, weight, bias, f: int, s: int, grad_y):
    """(dL/dx (B,Ci,*N), dL/dweight (K,Ci,Co), dL/dbias (Co,)) of conv_forward given grad_y = dL/dy.
    """
    x64, w64, b64, gy = _f64(x), _f64(weight), _f64(bias), _f64(grad_y)
    d = _check_features(x64)
    _check_conv_weight(w64, b64, x64.shape[1], f, d)
    expected = (x64.shape[0], w64.shape[2]) + pooled_shape(x64.shape[2:], f, s)
    if gy.shape != expected:
        raise ValueError(f"grad_y shape {gy.shape} != output shape {expected}")
    gx, gw, gb = _conv_bwd64(x64, w64, f, s, gy)
    return _cast(gx, x), _cast(gw, weight), _cast(gb, bias)


# --------------------------------------------------------------------------
# submanifold convolution
# --------------------------------------------------------------------------


def _check_submanifold(x64, mask, g64, w64, b64, f):
    d = _check_features(x64)
    if f % 2 != 1:
        raise ValueError(f"submanifold convolution needs an odd filter size, got f={f}")
    if mask.shape != (x64.shape[0],) + x64.shape[2:]:
        expected = (x64.shape[0],) + x64.shape[2:]
        raise ValueError(f"mask shape {mask.shape} != (B, *spatial) = {expected}")
    if g64.shape != (x64.shape[1],):
        raise ValueError(f"ground shape {g64.shape} != (C_in={x64.shape[1]},)")
    _check_conv_weight(w64, b64, x64.shape[1], f, d)
    return d


def _pad_with_ground(x64, g64, p):
    d = x64.ndim - 2
    shape = x64.shape[:2] + tuple(n + 2 * p for n in x64.shape[2:])
    xp = np.empty(shape)
    xp[...] = _chan(g64, d)
    interior = (slice(None), slice(None)) + tuple(slice(p, p + n) for n in x64.shape[2:])
    xp[interior] = x64
    return xp, interior


def submanifold_forward(x, mask, ground, weight, bias, f: int) -> np.ndarray:
    """y[b,:,p] = bias + sum_k W_k^T x[b,:,p - f//2 + i_k] (out-of-grid = ground) at active p, else
    bias + sum_k W_k^T ground; x (B,Ci,*N), mask (B,*N) -> y (B,Co,*N).
    """
    x64, g64, w64, b64 = _f64(x), _f64(ground), _f64(weight), _f64(bias)
    mask = np.asarray(mask, dtype=bool)
    d = _check_submanifold(x64, mask, g64, w64, b64, f)
    xp, _ = _pad_with_ground(x64, g64, f // 2)
    y_conv = _conv_fwd64(xp, w64, b64, f, 1)
    g_out = b64 + g64 @ w64.sum(axis=0)
    y = np.where(mask[:, None], y_conv, _chan(g_out, d))
    return _cast(y, x)


def submanifold_backward(x, mask, ground, weight, bias, f: int, grad_y):
    """(grad_x (B,Ci,*N) w.r.t. every entry of x, grad_ground (Ci,) direct (padding + inactive
    outputs), grad_weight (K,Ci,Co), grad_bias (Co,)) of submanifold_forward.
    """
    x64, g64, w64, b64, gy = _f64(x), _f64(ground), _f64(weight), _f64(bias), _f64(grad_y)
    mask = np.asarray(mask, dtype=bool)
    _check_submanifold(x64, mask, g64, w64, b64, f)
    expected = (x64.shape[0], w64.shape[2]) + x64.shape[2:]
    if gy.shape != expected:
        raise ValueError(f"grad_y shape {gy.shape} != output shape {expected}")
    m = mask[:, None]
    gy_active = np.where(m, gy, 0.0)
    gy_inactive = np.where(m, 0.0, gy)

    # active outputs: ordinary stride-1 valid conv of the ground-padded input
    xp, interior = _pad_with_ground(x64, g64, f // 2)
    gxp, gw, _ = _conv_bwd64(xp, w64, f, 1, gy_active)
    gx = gxp[interior].copy()
    gxp[interior] = 0.0
    g_ground = gxp.sum(axis=_not_channel_axes(gxp.ndim))  # through out-of-grid padding

    # inactive outputs: g_out = bias + sum_k W_k^T ground
    G = gy_inactive.sum(axis=_not_channel_axes(gy.ndim))  # (Co,)
    g_ground = g_ground + w64.sum(axis=0) @ G
    gw = gw + np.outer(g64, G)[None, :, :]
    gb = gy.sum(axis=_not_channel_axes(gy.ndim))
    return _cast(gx, x), _cast(g_ground, ground), _cast(gw, weight), _cast(gb, bias)


def fold_ground_grad(grad_x, mask):
    """Split grad_x (B,C,*N) into (grad_x at active sites, zeros elsewhere (B,C,*N); sum over
    inactive sites (C,)).
    """
    grad_x = np.asarray(grad_x)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (grad_x.shape[0],) + grad_x.shape[2:]:
        raise ValueError(f"mask shape {mask.shape} incompatible with grad_x shape {grad_x.shape}")
    m = mask[:, None]
    g64 = _f64(grad_x)
    active = np.where(m, g64, 0.0)
    inactive_sum = np.where(m, 0.0, g64).sum(axis=_not_channel_axes(g64.ndim))
    return _cast(active, grad_x), _cast(inactive_sum, grad_x)


# --------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------


def _maxpool_argmax(x64, f, s):
    d = x64.ndim - 2
    out_sp = pooled_shape(x64.shape[2:], f, s)
    best = None
    arg = None
    for k, off in enumerate(window_offsets(f, d)):
        v = x64[_window(off, out_sp, s)]
        if best is None:
            best = v.copy()
            arg = np.zeros(v.shape, dtype=np.int64)
        else:
            upd = v > best  # strict: ties keep the first (row-major) maximum
            best = np.where(upd, v, best)
            arg[upd] = k
    return best, arg, out_sp


def maxpool_forward(x, f: int, s: int) -> np.ndarray:
    """y[b,c,o] = max_{i in [0,f)^d} x[b,c,o*s+i]; x (B,C,*N) -> y (B,C,*((N-f)//s+1))."""
    x64 = _f64(x)
    _check_features(x64)
    best, _, _ = _maxpool_argmax(x64, f, s)
    return _cast(best, x)


def maxpool_backward(x, f: int, s: int, grad_y) -> np.ndarray:
    """dL/dx (B,C,*N): grad_y[o] routed to the first (row-major window order) maximal position of
    window o.
    """
    x64, gy = _f64(x), _f64(grad_y)
    d = _check_features(x64)
    _, arg, out_sp = _maxpool_argmax(x64, f, s)
    if gy.shape != x64.shape[:2] + out_sp:
        raise ValueError(f"grad_y shape {gy.shape} != output shape {x64.shape[:2] + out_sp}")
    gx = np.zeros_like(x64)
    for k, off in enumerate(window_offsets(f, d)):
        gx[_window(off, out_sp, s)] += np.where(arg == k, gy, 0.0)
    return _cast(gx, x)


def avgpool_forward(x, f: int, s: int) -> np.ndarray:
    """y[b,c,o] = f**-d sum_{i in [0,f)^d} x[b,c,o*s+i]; x (B,C,*N) -> y (B,C,*((N-f)//s+1))."""
    x64 = _f64(x)
    d = _check_features(x64)
    out_sp = pooled_shape(x64.shape[2:], f, s)
    y = np.zeros(x64.shape[:2] + out_sp)
    for off in window_offsets(f, d):
        y += x64[_window(off, out_sp, s)]
    return _cast(y / f**d, x)


def avgpool_backward(x, f: int, s: int, grad_y) -> np.ndarray:
    """dL/dx (B,C,*N) = sum over windows o containing the position of grad_y[o] / f**d."""
    x64, gy = _f64(x), _f64(grad_y)
    d = _check_features(x64)
    out_sp = pooled_shape(x64.shape[2:], f, s)
    if gy.shape != x64.shape[:2] + out_sp:
        raise ValueError(f"grad_y shape {gy.shape} != output shape {x64.shape[:2] + out_sp}")
    gx = np.zeros_like(x64)
    for off in window_offsets(f, d):
        gx[_window(off, out_sp, s)] += gy / f**d
    return _cast(gx, x)


# --------------------------------------------------------------------------
# network-in-network (1x1 conv), activations, linear
# --------------------------------------------------------------------------


def nin_forward(x, weight, bias) -> np.ndarray:
    """y[b,co,p] = bias[co] + sum_ci weight[ci,co] x[b,ci,p]; x (B,Ci,*N), weight (Ci,Co) -> y
    (B,Co,*N).
    """
    x64, w64, b64 = _f64(x), _f64(weight), _f64(bias)
    d = _check_features(x64)
    if w64.ndim != 2 or w64.shape[0] != x64.shape[1] or b64.shape != (w64.shape[1],):
        raise ValueError(f"bad NiN shapes: x {x64.shape}, weight {w64.shape}, bias {b64.shape}")
    return _cast(np.einsum("bi...,io->bo...", x64, w64) + _chan(b64, d), x)


def nin_backward(x, weight, bias, grad_y):
    """(dL/dx (B,Ci,*N) = W grad_y, dL/dweight (Ci,Co) = sum x grad_y^T, dL/dbias (Co,) = sum
    grad_y) of nin_forward.
    """
    x64, w64, gy = _f64(x), _f64(weight), _f64(grad_y)
    _check_features(x64)
    if gy.shape != (x64.shape[0], w64.shape[1]) + x64.shape[2:]:
        raise ValueError(f"grad_y shape {gy.shape} does not match the NiN output")
    gx = np.einsum("bo...,io->bi...", gy, w64)
    gw = _sum_outer(x64, gy)
    gb = gy.sum(axis=_not_channel_axes(gy.ndim))
    return _cast(gx, x), _cast(gw, weight), _cast(gb, bias)


def relu_forward(x) -> np.ndarray:
    """y = max(x, 0) elementwise (any shape)."""
    x64 = _f64(x)
    return _cast(np.where(x64 > 0, x64, 0.0), x)


def relu_backward(x, grad_y) -> np.ndarray:
    """dL/dx = grad_y * [x > 0] elementwise (gradient 0 at x == 0)."""
    x64, gy = _f64(x), _f64(grad_y)
    return _cast(np.where(x64 > 0, gy, 0.0), x)


def leaky_relu_forward(x, slope) -> np.ndarray:
    """y = x if x > 0 else slope*x, elementwise (any shape)."""
    x64 = _f64(x)
    return _cast(np.where(x64 > 0, x64, slope * x64), x)


def leaky_relu_backward(x, slope, grad_y) -> np.ndarray:
    """dL/dx = grad_y * (1 if x > 0 else slope) elementwise (slope side at x == 0)."""
    x64, gy = _f64(x), _f64(grad_y)
    return _cast(np.where(x64 > 0, gy, slope * gy), x)


def linear_forward(x, weight, bias) -> np.ndarray:
    """y = x @ weight + bias; x (B,C), weight (C,n_out), bias (n_out,) -> y (B,n_out)."""
    x64, w64, b64 = _f64(x), _f64(weight), _f64(bias)
    if (
        x64.ndim != 2
        or w64.ndim != 2
        or w64.shape[0] != x64.shape[1]
        or b64.shape != (w64.shape[1],)
    ):
        raise ValueError(f"bad linear shapes: x {x64.shape}, weight {w64.shape}, bias {b64.shape}")
    return _cast(x64 @ w64 + b64, x)


def linear_backward(x, weight, bias, grad_y):
    """(dL/dx = grad_y @ W^T (B,C), dL/dW = x^T @ grad_y (C,n_out), dL/db = sum_b grad_y (n_out,)).
    """
    x64, w64, gy = _f64(x), _f64(weight), _f64(grad_y)
    if gy.shape != (x64.shape[0], w64.shape[1]):
        raise ValueError(f"grad_y shape {gy.shape} != {(x64.shape[0], w64.shape[1])}")
    return _cast(gy @ w64.T, x), _cast(x64.T @ gy, weight), _cast(gy.sum(axis=0), bias)


# --------------------------------------------------------------------------
# batch normalisation (statistics over active sites only)
# --------------------------------------------------------------------------


def _bn_stats(x64, mask, d, train, running_mean, running_var):
    if train:
        m = mask[:, None].astype(np.float64)  # (B,1,*N)
        n = mask.sum()
        if n == 0:
            raise ValueError("batchnorm in train mode needs at least one active site")
        axes = _not_channel_axes(x64.ndim)
        mean = (x64 * m).sum(axis=axes) / n
        var = (m * (x64 - _chan(mean, d)) ** 2).sum(axis=axes) / n
        return mean, var, n
    if running_mean is None or running_var is None:
        raise ValueError("eval-mode batchnorm needs running_mean and running_var")
    return _f64(running_mean), _f64(running_var), None


def _check_bn(x64, mask, gamma, beta):
    d = _check_features(x64)
    if mask.shape != (x64.shape[0],) + x64.shape[2:]:
        expected = (x64.shape[0],) + x64.shape[2:]
        raise ValueError(f"mask shape {mask.shape} != (B, *spatial) = {expected}")
    c = x64.shape[1]
    if gamma.shape != (c,) or beta.shape != (c,):
        raise ValueError(f"gamma/beta shapes {gamma.shape}, {beta.shape} != (C={c},)")
    return d


def batchnorm_forward(x, mask, gamma, beta, eps, *, train, running_mean=None, running_var=None):
    """y = gamma (x - mean)/sqrt(var + eps) + beta at ALL positions; train: biased mean/var (C,)
    over active sites (mask (B,*N)), returns (y, mean, var); eval: running stats, returns y.
    """
    x64, g64, be64 = _f64(x), _f64(gamma), _f64(beta)
    mask = np.asarray(mask, dtype=bool)
    d = _check_bn(x64, mask, g64, be64)
    mean, var, _ = _bn_stats(x64, mask, d, train, running_mean, running_var)
    xhat = (x64 - _chan(mean, d)) / _chan(np.sqrt(var + eps), d)
    y = _cast(_chan(g64, d) * xhat + _chan(be64, d), x)
    if train:
        return y, _cast(mean, x), _cast(var, x)
    return y


def batchnorm_backward(
    x, mask, gamma, beta, eps, grad_y, *, train, running_mean=None, running_var=None
):
    """(grad_x (B,C,*N), grad_gamma (C,), grad_beta (C,)) of batchnorm_forward; in train mode the
    stats depend on active entries of x only.
    """
    x64, g64, be64, gy = _f64(x), _f64(gamma), _f64(beta), _f64(grad_y)
    mask = np.asarray(mask, dtype=bool)
    d = _check_bn(x64, mask, g64, be64)
    if gy.shape != x64.shape:
        raise ValueError(f"grad_y shape {gy.shape} != x shape {x64.shape}")
    mean, var, n = _bn_stats(x64, mask, d, train, running_mean, running_var)
    axes = _not_channel_axes(x64.ndim)
    inv = 1.0 / np.sqrt(var + eps)  # (C,)
    xc = x64 - _chan(mean, d)
    xhat = xc * _chan(inv, d)
    grad_gamma = (gy * xhat).sum(axis=axes)
    grad_beta = gy.sum(axis=axes)
    dxhat = gy * _chan(g64, d)
    gx = dxhat * _chan(inv, d)  # direct term, every position
    if train:
        # L depends on mean and var through xhat at every position.
        # dL/dmean = -inv * sum_all dxhat  (+ dL/dvar * dvar/dmean, which is 0
        #            because sum_active (x - mean) = 0)
        # dL/dvar  = -1/2 (var+eps)^{-3/2} sum_all dxhat * (x - mean)
        # mean, var are functions of active entries only:
        #   dmean/dx_j = m_j / n,   dvar/dx_j = 2 m_j (x_j - mean) / n
        d_mean = -inv * dxhat.sum(axis=axes)
        d_var = -0.5 * inv**3 * (dxhat * xc).sum(axis=axes)
        m = mask[:, None].astype(np.float64)
        gx = gx + m * (_chan(d_mean, d) / n + _chan(d_var, d) * 2.0 * xc / n)
    return _cast(gx, x), _cast(grad_gamma, gamma), _cast(grad_beta, beta)


# --------------------------------------------------------------------------
# zero-ground semantics (ground_state=False)
# --------------------------------------------------------------------------
#
# The modern libraries' semantics (SparseConvNet, spconv): inactive sites hold 0, whatever
# ground the input tensor carries; a layer reads only its active inputs, writes only its
# active outputs (bias included) and leaves 0 everywhere else. Active outputs: those of the
# ground-state version (window ops: a window holding an active input; the others: the
# input's sites). Max pooling looks at active inputs only; average pooling takes the mean
# over the whole window (f**d sites), the inactive ones counting as 0. Gradients: no
# gradient reaches an inactive input position (it is not read).


def _mask64(mask, x64) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    expected = (x64.shape[0],) + x64.shape[2:]
    if mask.shape != expected:
        raise ValueError(f"mask shape {mask.shape} != (B, *spatial) = {expected}")
    return mask


def zero_inactive(x, mask) -> np.ndarray:
    """x (B,C,*N) with 0 at the inactive positions of mask (B,*N)."""
    x64 = _f64(x)
    _check_features(x64)
    return _cast(np.where(_mask64(mask, x64)[:, None], x64, 0.0), x)


def window_mask(mask, f: int, s: int) -> np.ndarray:
    """Output mask (B,*((N-f)//s+1)) of a valid window op: True where the window
    [o*s, o*s + f)^d holds an active input of mask (B,*N)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim < 2:
        raise ValueError(f"mask must have shape (B, *spatial) with d >= 1, got {mask.shape}")
    d = mask.ndim - 1
    out_sp = pooled_shape(mask.shape[1:], f, s)
    out = np.zeros((mask.shape[0],) + out_sp, dtype=bool)
    for off in window_offsets(f, d):
        out |= mask[(slice(None),) + tuple(slice(i, i + s * (n - 1) + 1, s)
                                           for i, n in zip(off, out_sp, strict=True))]
    return out


def conv_zero_forward(x, mask, weight, bias, f: int, s: int) -> np.ndarray:
    """Zero-ground valid convolution: y[o] = bias + sum over active i in o's window of
    W_k^T x[i] at active outputs o (window_mask), 0 elsewhere. x (B,Ci,*N), mask (B,*N)."""
    x64 = _f64(x)
    m = _mask64(mask, x64)
    y = conv_forward(np.where(m[:, None], x64, 0.0), weight, bias, f, s)
    return _cast(np.where(window_mask(m, f, s)[:, None], _f64(y), 0.0), x)


def conv_zero_backward(x, mask, weight, bias, f: int, s: int, grad_y):
    """(grad_x (0 at inactive positions), grad_weight, grad_bias) of conv_zero_forward."""
    x64, gy = _f64(x), _f64(grad_y)
    m = _mask64(mask, x64)
    out_m = window_mask(m, f, s)
    gx, gw, gb = conv_backward(np.where(m[:, None], x64, 0.0), weight, bias, f, s,
                               np.where(out_m[:, None], gy, 0.0))
    return _cast(np.where(m[:, None], _f64(gx), 0.0), x), gw, gb


def submanifold_zero_forward(x, mask, weight, bias, f: int) -> np.ndarray:
    """Zero-ground submanifold convolution: at active p, bias + sum_k W_k^T x[p - f//2 + i_k]
    over the active neighbours (outside the grid: nothing); 0 at inactive p."""
    x64 = _f64(x)
    m = _mask64(mask, x64)
    c_in = x64.shape[1]
    y = submanifold_forward(np.where(m[:, None], x64, 0.0), m, np.zeros(c_in), weight, bias, f)
    return _cast(np.where(m[:, None], _f64(y), 0.0), x)


def submanifold_zero_backward(x, mask, weight, bias, f: int, grad_y):
    """(grad_x (0 at inactive positions), grad_weight, grad_bias) of submanifold_zero_forward."""
    x64, gy = _f64(x), _f64(grad_y)
    m = _mask64(mask, x64)
    c_in = x64.shape[1]
    gx, _, gw, gb = submanifold_backward(np.where(m[:, None], x64, 0.0), m, np.zeros(c_in),
                                         weight, bias, f, np.where(m[:, None], gy, 0.0))
    return _cast(np.where(m[:, None], _f64(gx), 0.0), x), gw, gb


def maxpool_zero_forward(x, mask, f: int, s: int) -> np.ndarray:
    """Zero-ground max pooling: y[o] = max of x over the active positions of o's window at
    active outputs (the max may be negative: inactive sites are not candidates), 0 elsewhere."""
    x64 = _f64(x)
    m = _mask64(mask, x64)
    best, _, _ = _maxpool_argmax(np.where(m[:, None], x64, -np.inf), f, s)
    return _cast(np.where(window_mask(m, f, s)[:, None], best, 0.0), x)


def maxpool_zero_backward(x, mask, f: int, s: int, grad_y) -> np.ndarray:
    """grad_y[o] of each active output routed to the first (row-major window order) maximal
    active position of window o; inactive outputs pass nothing back."""
    x64, gy = _f64(x), _f64(grad_y)
    d = _check_features(x64)
    m = _mask64(mask, x64)
    _, arg, out_sp = _maxpool_argmax(np.where(m[:, None], x64, -np.inf), f, s)
    if gy.shape != x64.shape[:2] + out_sp:
        raise ValueError(f"grad_y shape {gy.shape} != output shape {x64.shape[:2] + out_sp}")
    gy = np.where(window_mask(m, f, s)[:, None], gy, 0.0)
    gx = np.zeros_like(x64)
    for k, off in enumerate(window_offsets(f, d)):
        gx[_window(off, out_sp, s)] += np.where(arg == k, gy, 0.0)
    return _cast(np.where(m[:, None], gx, 0.0), x)


def avgpool_zero_forward(x, mask, f: int, s: int) -> np.ndarray:
    """Zero-ground average pooling: y[o] = f**-d sum of x over the active positions of o's
    window (the whole window's mean, inactive sites counting as 0) at active outputs, 0
    elsewhere."""
    x64 = _f64(x)
    m = _mask64(mask, x64)
    y = _f64(avgpool_forward(np.where(m[:, None], x64, 0.0), f, s))
    return _cast(np.where(window_mask(m, f, s)[:, None], y, 0.0), x)


def avgpool_zero_backward(x, mask, f: int, s: int, grad_y) -> np.ndarray:
    """dL/dx at active positions = sum over active windows o holding it of grad_y[o] / f**d;
    0 at inactive positions."""
    x64, gy = _f64(x), _f64(grad_y)
    m = _mask64(mask, x64)
    gx = avgpool_backward(x64, f, s, np.where(window_mask(m, f, s)[:, None], gy, 0.0))
    return _cast(np.where(m[:, None], _f64(gx), 0.0), x)


def nin_zero_forward(x, mask, weight, bias) -> np.ndarray:
    """Zero-ground 1x1 convolution: x W + bias at active positions, 0 elsewhere."""
    x64 = _f64(x)
    m = _mask64(mask, x64)
    y = _f64(nin_forward(x64, weight, bias))
    return _cast(np.where(m[:, None], y, 0.0), x)


def nin_zero_backward(x, mask, weight, bias, grad_y):
    """(grad_x (0 at inactive positions), grad_weight, grad_bias) of nin_zero_forward."""
    x64, gy = _f64(x), _f64(grad_y)
    m = _mask64(mask, x64)
    gx, gw, gb = nin_backward(np.where(m[:, None], x64, 0.0), weight, bias,
                              np.where(m[:, None], gy, 0.0))
    return _cast(np.where(m[:, None], _f64(gx), 0.0), x), gw, gb


def batchnorm_zero_forward(x, mask, gamma, beta, eps, *, train, running_mean=None,
                           running_var=None):
    """Zero-ground batch norm: batchnorm_forward at active positions (statistics over the
    active sites in training), 0 elsewhere. Same return values as batchnorm_forward."""
    x64 = _f64(x)
    m = _mask64(mask, x64)
    out = batchnorm_forward(np.where(m[:, None], x64, 0.0), m, gamma, beta, eps, train=train,
                            running_mean=running_mean, running_var=running_var)
    y = out[0] if train else out
    y = _cast(np.where(m[:, None], _f64(y), 0.0), x)
    return (y, out[1], out[2]) if train else y


def batchnorm_zero_backward(x, mask, gamma, beta, eps, grad_y, *, train, running_mean=None,
                            running_var=None):
    """(grad_x (0 at inactive positions), grad_gamma, grad_beta) of batchnorm_zero_forward."""
    x64, gy = _f64(x), _f64(grad_y)
    m = _mask64(mask, x64)
    gx, gg, gb = batchnorm_backward(np.where(m[:, None], x64, 0.0), m, gamma, beta, eps,
                                    np.where(m[:, None], gy, 0.0), train=train,
                                    running_mean=running_mean, running_var=running_var)
    return _cast(np.where(m[:, None], _f64(gx), 0.0), x), gg, gb


# --------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------


def _ce_targets(logits64, labels, label_smoothing):
    labels = np.asarray(labels)
    if logits64.ndim != 2 or labels.shape != (logits64.shape[0],):
        raise ValueError(
            f"logits must be (B, n_classes) and labels (B,), got {logits64.shape}, {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError("labels must be integers")
    b, n = logits64.shape
    if labels.size and (labels.min() < 0 or labels.max() >= n):
        raise ValueError("label out of range")
    t = np.full((b, n), label_smoothing / n)
    t[np.arange(b), labels] += 1.0 - label_smoothing
    return t


def _log_softmax(z):
    zs = z - z.max(axis=1, keepdims=True)
    return zs - np.log(np.exp(zs).sum(axis=1, keepdims=True))


def cross_entropy_forward(logits, labels, label_smoothing: float = 0.0):
    """L = mean_b -sum_c t[b,c] log softmax(logits)[b,c], t = (1-eps) onehot(labels) + eps/n; logits
    (B,n), labels (B,) -> scalar.
    """
    z = _f64(logits)
    t = _ce_targets(z, labels, label_smoothing)
    loss = -(t * _log_softmax(z)).sum() / z.shape[0]
    return _dtype_of(logits).type(loss)


def cross_entropy_backward(logits, labels, label_smoothing: float = 0.0) -> np.ndarray:
    """dL/dlogits (B,n) = (softmax(logits) - t) / B for upstream gradient 1."""
    z = _f64(logits)
    t = _ce_targets(z, labels, label_smoothing)
    p = np.exp(_log_softmax(z))
    return _cast((p - t) / z.shape[0], logits)


# --------------------------------------------------------------------------
# sparse <-> dense
# --------------------------------------------------------------------------


def _check_coords(coords, spatial_shape, batch_size):
    coords = np.asarray(coords)
    spatial_shape = tuple(int(n) for n in spatial_shape)
    d = len(spatial_shape)
    if coords.ndim != 2 or coords.shape[1] != 1 + d:
        raise ValueError(f"coords must have shape (n, 1+d={1 + d}), got {coords.shape}")
    if coords.size and not np.issubdtype(coords.dtype, np.integer):
        raise ValueError("coords must be integers")
    coords = coords.astype(np.int64)
    upper = np.array((batch_size,) + spatial_shape)
    if coords.size and ((coords < 0).any() or (coords >= upper).any()):
        raise ValueError("coordinate out of range")
    if len(np.unique(coords, axis=0)) != len(coords):
        raise ValueError("duplicate coordinates")
    return coords, spatial_shape


def active_mask(coords, spatial_shape, batch_size) -> np.ndarray:
    """Bool (B,*spatial), True exactly at the sites listed in coords (n, 1+d) = (batch, *position).
    """
    coords, spatial_shape = _check_coords(coords, spatial_shape, batch_size)
    mask = np.zeros((batch_size,) + spatial_shape, dtype=bool)
    mask[tuple(coords.T)] = True
    return mask


def to_dense(coords, features, spatial_shape, batch_size, ground=None) -> np.ndarray:
    """Dense (B,C,*spatial): features[i] (n,C) at coords[i] = (batch, *pos), ground (C,) (or scalar;
    None = 0) elsewhere.
    """
    coords, spatial_shape = _check_coords(coords, spatial_shape, batch_size)
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] != coords.shape[0]:
        raise ValueError(f"features must have shape (n={coords.shape[0]}, C), got {features.shape}")
    c = features.shape[1]
    if ground is None:
        ground = 0.0
    g = np.broadcast_to(np.asarray(ground, dtype=np.float64), (c,))
    out = np.empty((batch_size,) + spatial_shape + (c,), dtype=_dtype_of(features))
    out[...] = g
    out[tuple(coords.T)] = features
    return np.ascontiguousarray(np.moveaxis(out, -1, 1))


def gather_sites(dense, coords) -> np.ndarray:
    """(n, C) rows dense[coords[i,0], :, *coords[i,1:]] from dense (B,C,*spatial)."""
    dense = np.asarray(dense)
    coords = np.asarray(coords, dtype=np.int64)
    if coords.ndim != 2 or coords.shape[1] != dense.ndim - 1:
        raise ValueError(f"coords shape {coords.shape} incompatible with dense shape {dense.shape}")
    return np.moveaxis(dense, 1, -1)[tuple(coords.T)].copy()


# --------------------------------------------------------------------------
# sequential networks
# --------------------------------------------------------------------------
#
# Layer specs:
#   ("conv", f, s)     valid conv, consumes params W (f**d, Ci, Co), b (Co,)
#   ("nin",)           1x1 conv,   consumes params W (Ci, Co), b (Co,)
#   ("maxpool", f, s)
#   ("avgpool", f, s)
#   ("act", slope)     ReLU if slope == 0 else leaky ReLU
#   ("linear",)        flattens (B, C, *sp) -> (B, C*prod(sp)) (C order), then
#                      x @ W + b; consumes W (C*prod(sp), n_out), b (n_out,)

_N_PARAMS = {"conv": 2, "nin": 2, "linear": 2, "maxpool": 0, "avgpool": 0, "act": 0}


def _act_fwd(x, slope):
    return relu_forward(x) if slope == 0 else leaky_relu_forward(x, slope)


def _act_bwd(x, slope, gy):
    return relu_backward(x, gy) if slope == 0 else leaky_relu_backward(x, slope, gy)


def _layer_forward(spec, x, p):
    kind = spec[0]
    if kind == "conv":
        return conv_forward(x, p[0], p[1], spec[1], spec[2])
    if kind == "nin":
        return nin_forward(x, p[0], p[1])
    if kind == "maxpool":
        return maxpool_forward(x, spec[1], spec[2])
    if kind == "avgpool":
        return avgpool_forward(x, spec[1], spec[2])
    if kind == "act":
        return _act_fwd(x, spec[1])
    if kind == "linear":
        return linear_forward(x.reshape(x.shape[0], -1), p[0], p[1])
    raise ValueError(f"unknown layer spec {spec!r}")


def _layer_backward(spec, x, p, gy):
    """Returns (grad_x, [grads of this layer's params])."""
    kind = spec[0]
    if kind == "conv":
        gx, gw, gb = conv_backward(x, p[0], p[1], spec[1], spec[2], gy)
        return gx, [gw, gb]
    if kind == "nin":
        gx, gw, gb = nin_backward(x, p[0], p[1], gy)
        return gx, [gw, gb]
    if kind == "maxpool":
        return maxpool_backward(x, spec[1], spec[2], gy), []
    if kind == "avgpool":
        return avgpool_backward(x, spec[1], spec[2], gy), []
    if kind == "act":
        return _act_bwd(x, spec[1], gy), []
    if kind == "linear":
        gx, gw, gb = linear_backward(x.reshape(x.shape[0], -1), p[0], p[1], gy)
        return gx.reshape(x.shape), [gw, gb]
    raise ValueError(f"unknown layer spec {spec!r}")


def _split_params(layers, params):
    params = list(params)
    need = sum(_N_PARAMS.get(spec[0], 0) for spec in layers)
    if len(params) != need:
        raise ValueError(f"layers need {need} parameter arrays, got {len(params)}")
    out, i = [], 0
    for spec in layers:
        if spec[0] not in _N_PARAMS:
            raise ValueError(f"unknown layer spec {spec!r}")
        k = _N_PARAMS[spec[0]]
        out.append([_f64(a) for a in params[i : i + k]])
        i += k
    return out


def _sequential_run(x, layers, params):
    per_layer = _split_params(layers, params)
    inputs = []
    h = _f64(x)
    for spec, p in zip(layers, per_layer, strict=True):
        inputs.append(h)
        h = _layer_forward(spec, h, p)
    return h, inputs, per_layer


def sequential_forward(x, layers, params) -> np.ndarray:
    """Compose the layer specs (see module comment) left to right; params are consumed in layer
    order.
    """
    y, _, _ = _sequential_run(x, layers, params)
    return _cast(y, x)


def sequential_backward(x, layers, params, grad_y):
    """(grad_x, [grad of each param, same order as params]) of sequential_forward given grad_y."""
    y, inputs, per_layer = _sequential_run(x, layers, params)
    g = _f64(grad_y)
    if g.shape != y.shape:
        raise ValueError(f"grad_y shape {g.shape} != output shape {y.shape}")
    grads_rev = []
    for spec, h, p in zip(reversed(layers), reversed(inputs), reversed(per_layer), strict=True):
        g, gp = _layer_backward(spec, h, p, g)
        grads_rev.append(gp)
    grad_params = [gp for layer_grads in reversed(grads_rev) for gp in layer_grads]
    grad_params = [_cast(gp, p) for gp, p in zip(grad_params, params, strict=True)]
    return _cast(g, x), grad_params


# --------------------------------------------------------------------------
# DeepCNet(l, k) and DeepCNiN(l, k)
# --------------------------------------------------------------------------


def deepcnet_input_size(l: int) -> int:
    """Spatial input size 3 * 2**l of DeepCNet(l, k) / DeepCNiN(l, k) (output is 1x...x1)."""
    return 3 * 2**l


def deepcnet_layers(l: int, activation_slope: float = 0.0) -> list:
    """Layer specs of DeepCNet(l, .): conv3-act, then l x (maxpool2/2, conv2-act), then linear."""
    if l < 0:
        raise ValueError("l must be >= 0")
    act = ("act", activation_slope)
    layers = [("conv", 3, 1), act]
    for _ in range(l):
        layers += [("maxpool", 2, 2), ("conv", 2, 1), act]
    return layers + [("linear",)]


def deepcnin_layers(l: int, activation_slope: float = 0.0) -> list:
    """Layer specs of DeepCNiN(l, .): conv-act, [maxpool, nin-act, conv-act] x l, nin-act, linear.
    """
    if l < 0:
        raise ValueError("l must be >= 0")
    act = ("act", activation_slope)
    layers = [("conv", 3, 1), act]
    for _ in range(l):
        layers += [("maxpool", 2, 2), ("nin",), act, ("conv", 2, 1), act]
    return layers + [("nin",), act, ("linear",)]


def deepcnet_param_shapes(l: int, k: int, d: int, in_channels: int, num_classes: int) -> list:
    """Shapes [W1, b1, ..., W_{l+1}, b_{l+1}, W_cls, b_cls]; conv n (1-based) maps (n-1)k
    (in_channels for n=1) -> n*k.
    """
    shapes = []
    cin = in_channels
    for n in range(1, l + 2):
        f = 3 if n == 1 else 2
        shapes += [(f**d, cin, n * k), (n * k,)]
        cin = n * k
    return shapes + [(cin, num_classes), (num_classes,)]


def deepcnin_param_shapes(l: int, k: int, d: int, in_channels: int, num_classes: int) -> list:
    """Shapes in definition order: conv1, nin1, conv2, nin2, ..., conv_{l+1}, nin_{l+1}, classifier
    (each W then b).
    """
    shapes = []
    cin = in_channels
    for n in range(1, l + 2):
        f = 3 if n == 1 else 2
        shapes += [(f**d, cin, n * k), (n * k,), (n * k, n * k), (n * k,)]
        cin = n * k
    return shapes + [(cin, num_classes), (num_classes,)]


def _check_deepcnet_input(x, l):
    x = np.asarray(x)
    _check_features(x)
    n = deepcnet_input_size(l)
    if any(size != n for size in x.shape[2:]):
        raise ValueError(f"DeepCNet(l={l}) needs spatial size {n} in every dim, got {x.shape[2:]}")


def deepcnet_forward(x, params, l: int, activation_slope: float = 0.0) -> np.ndarray:
    """Logits (B, n_classes) of DeepCNet(l, k) on dense x (B, C, 3*2**l, ...); params as in
    deepcnet_param_shapes.
    """
    _check_deepcnet_input(x, l)
    return sequential_forward(x, deepcnet_layers(l, activation_slope), params)


def deepcnet_backward(x, params, l: int, activation_slope: float, grad_y):
    """(grad_x, [grads of params in the same order]) of deepcnet_forward given grad_y (B,
    n_classes).
    """
    _check_deepcnet_input(x, l)
    return sequential_backward(x, deepcnet_layers(l, activation_slope), params, grad_y)


def deepcnin_forward(x, params, l: int, activation_slope: float = 0.0) -> np.ndarray:
    """Logits (B, n_classes) of DeepCNiN(l, k) on dense x (B, C, 3*2**l, ...); params as in
    deepcnin_param_shapes.
    """
    _check_deepcnet_input(x, l)
    return sequential_forward(x, deepcnin_layers(l, activation_slope), params)


def deepcnin_backward(x, params, l: int, activation_slope: float, grad_y):
    """(grad_x, [grads of params in the same order]) of deepcnin_forward given grad_y (B,
    n_classes).
    """
    _check_deepcnet_input(x, l)
    return sequential_backward(x, deepcnin_layers(l, activation_slope), params, grad_y)


# --------------------------------------------------------------------------
# sparse networks in both ground-state modes (the oracle of the fuzz tests)
# --------------------------------------------------------------------------
#
# The dense twin of a sparse network, which carries the active mask and the ground state
# along. The ground travels as one extra sample appended to the batch, all of whose sites are
# inactive and hold the ground: every layer maps it as the dense network maps a constant
# field, so after each layer it holds that layer's output ground (0 after a zero-ground
# layer); a ground-state submanifold convolution reads its input ground (the value outside
# the grid) from it. The input's inactive entries are the ground (tied to it), so the
# gradient w.r.t. the input ground is the sum over every position that holds it.
#
# Layer specs (gs: True = ground-state semantics, False = zero-ground semantics):
#   ("conv", f, s, gs)         valid conv; params W (f**d, Ci, Co), b (Co,) or None
#   ("subm", f, gs)            submanifold conv (odd f); params W, b or None
#   ("maxpool", f, s, gs)
#   ("avgpool", f, s, gs)
#   ("nin", gs)                1x1 conv; params W (Ci, Co), b (Co,) or None
#   ("act", slope)             ReLU (slope 0) or leaky ReLU; applies to the ground too
#   ("bn", gs, eps, running_mean, running_var)   params gamma, beta (C,); running_mean None:
#                              training mode (batch statistics over the active sites)
#   ("linear",)                last layer only: flatten (C order) and x @ W + b -> (B, n_out)

_NET_PARAMS = {"conv": 2, "subm": 2, "nin": 2, "bn": 2, "linear": 2,
               "maxpool": 0, "avgpool": 0, "act": 0}


def _net_split(layers, params):
    params = list(params)
    need = sum(_NET_PARAMS.get(spec[0], 0) for spec in layers)
    if len(params) != need:
        raise ValueError(f"layers need {need} parameter arrays, got {len(params)}")
    out, i = [], 0
    for j, spec in enumerate(layers):
        if spec[0] not in _NET_PARAMS:
            raise ValueError(f"unknown layer spec {spec!r}")
        if spec[0] == "linear" and j != len(layers) - 1:
            raise ValueError("('linear',) must be the last layer")
        k = _NET_PARAMS[spec[0]]
        out.append([None if a is None else _f64(a) for a in params[i:i + k]])
        i += k
    return out


def _bias(b, n):
    return np.zeros(n) if b is None else b


def _corner(h):
    """The ground: the extra (last) sample's first site, (C,)."""
    return h[(-1, slice(None)) + (0,) * (h.ndim - 2)].copy()


def _net_layer_forward(spec, h, m, p):
    """(output, output mask) of one layer on the augmented batch."""
    kind = spec[0]
    if kind == "conv":
        f, s, gs = spec[1:]
        b = _bias(p[1], p[0].shape[2])
        fwd = conv_forward if gs else (lambda h, w, b, f, s: conv_zero_forward(h, m, w, b, f, s))
        return _f64(fwd(h, p[0], b, f, s)), window_mask(m, f, s)
    if kind == "subm":
        f, gs = spec[1:]
        b = _bias(p[1], p[0].shape[2])
        if gs:
            return _f64(submanifold_forward(h, m, _corner(h), p[0], b, f)), m
        return _f64(submanifold_zero_forward(h, m, p[0], b, f)), m
    if kind in ("maxpool", "avgpool"):
        f, s, gs = spec[1:]
        if gs:
            fwd = maxpool_forward if kind == "maxpool" else avgpool_forward
            return _f64(fwd(h, f, s)), window_mask(m, f, s)
        fwd = maxpool_zero_forward if kind == "maxpool" else avgpool_zero_forward
        return _f64(fwd(h, m, f, s)), window_mask(m, f, s)
    if kind == "nin":
        b = _bias(p[1], p[0].shape[1])
        y = nin_forward(h, p[0], b) if spec[1] else nin_zero_forward(h, m, p[0], b)
        return _f64(y), m
    if kind == "act":
        return _f64(_act_fwd(h, spec[1])), m
    if kind == "bn":
        gs, eps, rm, rv = spec[1:]
        train = rm is None
        fwd = batchnorm_forward if gs else batchnorm_zero_forward
        out = fwd(h, m, p[0], p[1], eps, train=train, running_mean=rm, running_var=rv)
        return _f64(out[0] if train else out), m
    # linear
    b = _bias(p[1], p[0].shape[1])
    return _f64(linear_forward(h.reshape(h.shape[0], -1), p[0], b)), None


def _net_layer_backward(spec, h, m, p, gy):
    """(grad of the layer input, [grads of its params]) on the augmented batch."""
    kind = spec[0]
    if kind in ("conv", "subm", "nin", "linear"):
        no_bias = p[1] is None
        b = _bias(p[1], p[0].shape[-1])
    if kind == "conv":
        f, s, gs = spec[1:]
        if gs:
            gx, gw, gb = conv_backward(h, p[0], b, f, s, gy)
        else:
            gx, gw, gb = conv_zero_backward(h, m, p[0], b, f, s, gy)
    elif kind == "subm":
        f, gs = spec[1:]
        if gs:
            gx, g_ground, gw, gb = submanifold_backward(h, m, _corner(h), p[0], b, f, gy)
            gx = _f64(gx)
            gx[(-1, slice(None)) + (0,) * (h.ndim - 2)] += g_ground
        else:
            gx, gw, gb = submanifold_zero_backward(h, m, p[0], b, f, gy)
    elif kind in ("maxpool", "avgpool"):
        f, s, gs = spec[1:]
        if gs:
            bwd = maxpool_backward if kind == "maxpool" else avgpool_backward
            return _f64(bwd(h, f, s, gy)), []
        bwd = maxpool_zero_backward if kind == "maxpool" else avgpool_zero_backward
        return _f64(bwd(h, m, f, s, gy)), []
    elif kind == "nin":
        bwd = nin_backward if spec[1] else (lambda h, w, b, g: nin_zero_backward(h, m, w, b, g))
        gx, gw, gb = bwd(h, p[0], b, gy)
    elif kind == "act":
        return _f64(_act_bwd(h, spec[1], gy)), []
    elif kind == "bn":
        gs, eps, rm, rv = spec[1:]
        bwd = batchnorm_backward if gs else batchnorm_zero_backward
        gx, gg, gb = bwd(h, m, p[0], p[1], eps, gy, train=rm is None, running_mean=rm,
                         running_var=rv)
        return _f64(gx), [_f64(gg), _f64(gb)]
    else:  # linear
        gx, gw, gb = linear_backward(h.reshape(h.shape[0], -1), p[0], b, gy)
        gx = _f64(gx).reshape(h.shape)
    return _f64(gx), [_f64(gw), None if no_bias else _f64(gb)]


def _net_run(x, mask, ground, layers, params):
    x64 = _f64(x)
    _check_features(x64)
    m = _mask64(mask, x64)
    g = _f64(ground)
    if g.shape != (x64.shape[1],):
        raise ValueError(f"ground shape {g.shape} != (C={x64.shape[1]},)")
    per_layer = _net_split(layers, params)
    d = x64.ndim - 2
    extra = np.broadcast_to(_chan(g, d), (1,) + x64.shape[1:])
    h = np.concatenate([np.where(m[:, None], x64, _chan(g, d)), extra])
    m = np.concatenate([m, np.zeros((1,) + m.shape[1:], bool)])
    trace = []
    for spec, p in zip(layers, per_layer, strict=True):
        trace.append((h, m))
        h, m = _net_layer_forward(spec, h, m, p)
    return h, m, trace, per_layer


def net_forward(x, mask, ground, layers, params):
    """Forward of a sparse network (layer specs above) on the input whose active sites are
    mask (B,*N), with features x there (x's other entries are ignored) and ground (C,)
    elsewhere.

    Returns (y, y_mask, y_ground): the output (B, C', *N') at every site (inactive = its
    ground), its active mask (B, *N') and its ground (C',); with a final ("linear",) layer
    (logits (B, n_out), None, None). Results are float64.
    """
    h, m, _, _ = _net_run(x, mask, ground, layers, params)
    if m is None:
        return h[:-1], None, None
    return h[:-1], m[:-1], _corner(h)


def net_backward(x, mask, ground, layers, params, grad_y):
    """(grad_x (B,C,*N): the gradient at active sites, 0 elsewhere; grad_ground (C,): the
    total gradient w.r.t. the input ground; [grad of each param, None for None]) of the loss
    sum(grad_y * y), y = net_forward(...)[0]."""
    h, m, trace, per_layer = _net_run(x, mask, ground, layers, params)
    gy = _f64(grad_y)
    if gy.shape != h[:-1].shape:
        raise ValueError(f"grad_y shape {gy.shape} != output shape {h[:-1].shape}")
    g = np.concatenate([gy, np.zeros((1,) + gy.shape[1:])])
    grads_rev = []
    for spec, (hi, mi), p in zip(reversed(layers), reversed(trace), reversed(per_layer),
                                 strict=True):
        g, gp = _net_layer_backward(spec, hi, mi, p, g)
        grads_rev.append(gp)
    grad_params = [gp for layer in reversed(grads_rev) for gp in layer]
    m_in = trace[0][1] if trace else np.concatenate(
        [np.asarray(mask, bool), np.zeros((1,) + np.shape(mask)[1:], bool)])
    inactive = ~m_in[:, None]
    g_ground = np.where(inactive, g, 0.0).sum(axis=_not_channel_axes(g.ndim))
    return np.where(inactive[:-1], 0.0, g[:-1]), g_ground, grad_params


def net_branch_margin(x, mask, ground, layers, params) -> float:
    """How close the network's forward comes to a branch point whose side decides a gradient:
    the smallest relative distance (distance / (1 + max |layer input|)) of an activation's
    nonzero input to 0, and of a max-pooling window's maximum to its nearest lower candidate
    (exact ties count as no branch: equal values from one structural source; but an active
    value equal to the ground in a ground-mode window is a branch point). inf if none.

    Below a dtype's rounding error, a sparse implementation may take the other branch and
    give another, equally valid, subgradient."""
    _, _, trace, _ = _net_run(x, mask, ground, layers, params)
    best = np.inf
    for spec, (h, m) in zip(layers, trace, strict=True):
        scale = 1.0 + (np.abs(h).max() if h.size else 0.0)
        if spec[0] == "act":
            nz = np.abs(h[h != 0])
            if nz.size:
                best = min(best, nz.min() / scale)
        elif spec[0] == "maxpool":
            f, s, gs = spec[1:]
            d = h.ndim - 2
            out_sp = pooled_shape(h.shape[2:], f, s)
            v = h if gs else np.where(m[:, None], h, -np.inf)
            cand = np.stack([v[_window(off, out_sp, s)] for off in window_offsets(f, d)])
            top = cand.max(axis=0)
            below = np.where(cand < top, cand, -np.inf).max(axis=0)
            both = np.isfinite(top) & np.isfinite(below)
            gap = top[both] - below[both]
            if gap.size:
                best = min(best, gap.min() / scale)
            if gs:
                # an active site's value equal to the ground of a window with an inactive
                # site: two sources, and which of them takes the gradient is a convention
                # (the sparse kernels give it to the ground, this oracle to the first
                # position): a branch point
                act = np.where(m[:, None], h, -np.inf)
                ina = np.where(m[:, None], -np.inf, h)
                top_a = np.stack([act[_window(o, out_sp, s)] for o in window_offsets(f, d)])
                top_i = np.stack([ina[_window(o, out_sp, s)] for o in window_offsets(f, d)])
                top_a, top_i = top_a.max(axis=0), top_i.max(axis=0)
                if np.any(np.isfinite(top_a) & (top_a == top_i) & (top_a == top)):
                    best = 0.0
    return float(best)


def net_batchnorm_stats(x, mask, ground, layers, params) -> list:
    """[(n, var (C,), gamma (C,))] for each training-mode batch norm of the network, in
    order: its number of active input sites and their per-channel (biased) variance.

    A variance far below eps (n >= 2 copies of one value) makes the layer amplify its input's
    rounding error by up to |gamma| / sqrt(eps): a caller sets its tolerance from this."""
    _, _, trace, per_layer = _net_run(x, mask, ground, layers, params)
    out = []
    for spec, (h, m), p in zip(layers, trace, per_layer, strict=True):
        if spec[0] == "bn" and spec[3] is None:
            _, var, n = _bn_stats(h, m, h.ndim - 2, True, None, None)
            out.append((int(n), var, p[0]))
    return out


# --------------------------------------------------------------------------
# global pooling and (B, C) batch norm (the heads)
# --------------------------------------------------------------------------
#
# Global pools reduce every spatial position of each sample: x (B, C, *N) -> (B, C). The
# max's gradient goes to the first maximal position in row-major order. Zero-ground forms
# take a mask (B, *N) and pool the active positions only (a sample without any gives 0).


def _flat_spatial(x64) -> np.ndarray:
    _check_features(x64)
    return x64.reshape(x64.shape[0], x64.shape[1], -1)


def global_maxpool_forward(x) -> np.ndarray:
    """y[b, c] = max over all positions p of x[b, c, p]; x (B, C, *N) -> (B, C)."""
    return _cast(_flat_spatial(_f64(x)).max(axis=2), x)


def global_maxpool_backward(x, grad_y) -> np.ndarray:
    """dL/dx (B, C, *N): grad_y[b, c] at the first (row-major) maximal position of x[b, c]."""
    x64, gy = _f64(x), _f64(grad_y)
    flat = _flat_spatial(x64)
    if gy.shape != flat.shape[:2]:
        raise ValueError(f"grad_y shape {gy.shape} != {flat.shape[:2]}")
    gx = np.zeros_like(flat)
    arg = flat.argmax(axis=2)  # numpy: the first maximum
    b, c = np.indices(arg.shape)
    gx[b, c, arg] = gy
    return _cast(gx.reshape(x64.shape), x)


def global_avgpool_forward(x) -> np.ndarray:
    """y[b, c] = mean over all positions of x[b, c]; x (B, C, *N) -> (B, C)."""
    return _cast(_flat_spatial(_f64(x)).mean(axis=2), x)


def global_avgpool_backward(x, grad_y) -> np.ndarray:
    """dL/dx (B, C, *N) = grad_y[b, c] / prod(N) at every position."""
    x64, gy = _f64(x), _f64(grad_y)
    flat = _flat_spatial(x64)
    if gy.shape != flat.shape[:2]:
        raise ValueError(f"grad_y shape {gy.shape} != {flat.shape[:2]}")
    gx = np.broadcast_to(gy[:, :, None] / flat.shape[2], flat.shape)
    return _cast(gx.reshape(x64.shape), x)


def _flat_mask(mask, x64) -> np.ndarray:
    m = _mask64(mask, x64)
    return m.reshape(m.shape[0], -1).astype(bool)


def global_maxpool_zero_forward(x, mask) -> np.ndarray:
    """Max over the active positions of each sample (0 for a sample without any)."""
    x64 = _f64(x)
    flat, m = _flat_spatial(x64), _flat_mask(mask, x64)
    v = np.where(m[:, None], flat, -np.inf).max(axis=2)
    return _cast(np.where(m.any(axis=1)[:, None], v, 0.0), x)


def global_maxpool_zero_backward(x, mask, grad_y) -> np.ndarray:
    """grad_y[b, c] to the first (row-major) maximal active position; none to inactive ones."""
    x64, gy = _f64(x), _f64(grad_y)
    flat, m = _flat_spatial(x64), _flat_mask(mask, x64)
    arg = np.where(m[:, None], flat, -np.inf).argmax(axis=2)
    gx = np.zeros_like(flat)
    b, c = np.indices(arg.shape)
    gx[b, c, arg] = gy * m.any(axis=1)[:, None]
    return _cast(gx.reshape(x64.shape), x)


def global_avgpool_zero_forward(x, mask) -> np.ndarray:
    """Mean over the active positions of each sample (0 for a sample without any)."""
    x64 = _f64(x)
    flat, m = _flat_spatial(x64), _flat_mask(mask, x64)
    n = m.sum(axis=1)[:, None]
    return _cast((flat * m[:, None]).sum(axis=2) / np.maximum(n, 1), x)


def global_avgpool_zero_backward(x, mask, grad_y) -> np.ndarray:
    """grad_y[b, c] / n_b at each active position of sample b; 0 at inactive ones."""
    x64, gy = _f64(x), _f64(grad_y)
    _flat_spatial(x64)
    m = _flat_mask(mask, x64)
    n = m.sum(axis=1)[:, None]
    gx = (gy / np.maximum(n, 1))[:, :, None] * m[:, None]
    return _cast(gx.reshape(x64.shape), x)


def batchnorm_bc_forward(x, gamma, beta, eps, *, train, running_mean=None, running_var=None):
    """batchnorm_forward for a dense (B, C) input: statistics over the batch."""
    x = np.asarray(x)
    out = batchnorm_forward(x[:, :, None], np.ones((x.shape[0], 1), bool), gamma, beta, eps,
                            train=train, running_mean=running_mean, running_var=running_var)
    return (out[0][:, :, 0],) + tuple(out[1:]) if train else out[:, :, 0]


def batchnorm_bc_backward(x, gamma, beta, eps, grad_y, *, train, running_mean=None,
                          running_var=None):
    """(grad_x (B, C), grad_gamma, grad_beta) of batchnorm_bc_forward."""
    x = np.asarray(x)
    gx, gg, gb = batchnorm_backward(x[:, :, None], np.ones((x.shape[0], 1), bool), gamma, beta,
                                    eps, np.asarray(grad_y)[:, :, None], train=train,
                                    running_mean=running_mean, running_var=running_var)
    return gx[:, :, 0], gg, gb


# combining tensors on one grid (add, concat)
# --------------------------------------------------------------------------
#
# On dense tensors the sum and the concatenation are the plain ones: the sparse ops are
# exact when each tensor's inactive sites hold its ground (ground-state semantics), and the
# result's active set is the union of the inputs'. In the zero-ground mode an input's
# inactive sites count as 0 (and get no gradient).

__all__ += [
    "union_mask",
    "add_forward",
    "add_backward",
    "concat_forward",
    "concat_backward",
    "add_zero_forward",
    "add_zero_backward",
    "concat_zero_forward",
    "concat_zero_backward",
]


def union_mask(*masks) -> np.ndarray:
    """Active mask (B,*N) of a sum or concatenation: True where any input is active."""
    if not masks:
        raise ValueError("union_mask needs at least one mask")
    out = np.zeros(np.shape(masks[0]), dtype=bool)
    for m in masks:
        m = np.asarray(m, dtype=bool)
        if m.shape != out.shape:
            raise ValueError(f"mask shapes differ: {m.shape} vs {out.shape}")
        out |= m
    return out


def _check_same_grid(xs) -> None:
    shapes = {np.shape(x)[:1] + np.shape(x)[2:] for x in xs}
    if len(shapes) != 1:
        raise ValueError(f"inputs are on different grids: {sorted(shapes)}")
    for x in xs:
        _check_features(_f64(x))


def add_forward(a, b) -> np.ndarray:
    """a + b, both (B,C,*N)."""
    _check_same_grid([a, b])
    if np.shape(a) != np.shape(b):
        raise ValueError(f"add: shapes differ: {np.shape(a)} vs {np.shape(b)}")
    return _cast(_f64(a) + _f64(b), a)


def add_backward(a, b, grad_y):
    """(grad_a, grad_b) of add_forward: grad_y to both."""
    gy = _f64(grad_y)
    return _cast(gy, a), _cast(gy, b)


def concat_forward(xs) -> np.ndarray:
    """Concatenation of xs[i] (B,C_i,*N) on the channel axis: (B, sum C_i, *N)."""
    xs = list(xs)
    _check_same_grid(xs)
    return _cast(np.concatenate([_f64(x) for x in xs], axis=1), xs[0])


def concat_backward(xs, grad_y) -> tuple:
    """Gradients of concat_forward: grad_y split on the channel axis, one per input."""
    xs = list(xs)
    gy = _f64(grad_y)
    bounds = np.cumsum([0] + [np.shape(x)[1] for x in xs])
    return tuple(_cast(gy[:, lo:hi], x) for x, lo, hi in zip(xs, bounds[:-1], bounds[1:],
                                                              strict=True))


def add_zero_forward(a, mask_a, b, mask_b) -> np.ndarray:
    """Zero-ground sum: each input is 0 at its inactive sites."""
    return add_forward(zero_inactive(a, mask_a), zero_inactive(b, mask_b))


def add_zero_backward(a, mask_a, b, mask_b, grad_y):
    """(grad_a, grad_b) of add_zero_forward: grad_y at each input's active sites, else 0."""
    return _cast(zero_inactive(grad_y, mask_a), a), _cast(zero_inactive(grad_y, mask_b), b)


def concat_zero_forward(xs, masks) -> np.ndarray:
    """Zero-ground concatenation: each input is 0 at its inactive sites."""
    return concat_forward([zero_inactive(x, m) for x, m in zip(xs, masks, strict=True)])


def concat_zero_backward(xs, masks, grad_y) -> tuple:
    """Gradients of concat_zero_forward: each input's slice of grad_y at its active sites."""
    return tuple(_cast(zero_inactive(g, m), x) for g, x, m in zip(
        concat_backward(xs, grad_y), xs, masks, strict=True))


# --------------------------------------------------------------------------
# depthwise convolution (groups = C: one filter per channel)
# --------------------------------------------------------------------------

__all__ += [
    "depthwise_forward",
    "depthwise_backward",
    "depthwise_zero_forward",
    "depthwise_zero_backward",
    "submanifold_depthwise_forward",
    "submanifold_depthwise_backward",
    "submanifold_depthwise_zero_forward",
    "submanifold_depthwise_zero_backward",
]


def _check_dw_weight(w, b, c, f, d):
    if w.ndim != 2 or w.shape != (f**d, c):
        raise ValueError(f"depthwise weight shape {w.shape} != (f**d={f**d}, C={c})")
    if b.shape != (c,):
        raise ValueError(f"bias shape {b.shape} != (C={c},)")


def _dw_fwd64(x, w, b, f, s):
    d = x.ndim - 2
    out_sp = pooled_shape(x.shape[2:], f, s)
    y = np.broadcast_to(_chan(b, d), x.shape[:2] + out_sp).copy()
    for k, off in enumerate(window_offsets(f, d)):
        y += _chan(w[k], d) * x[_window(off, out_sp, s)]
    return y


def _dw_bwd64(x, w, f, s, gy):
    d = x.ndim - 2
    out_sp = pooled_shape(x.shape[2:], f, s)
    gx = np.zeros_like(x)
    gw = np.zeros_like(w)
    axes = _not_channel_axes(x.ndim)
    for k, off in enumerate(window_offsets(f, d)):
        sl = _window(off, out_sp, s)
        gx[sl] += _chan(w[k], d) * gy
        gw[k] = (x[sl] * gy).sum(axis=axes)
    return gx, gw, gy.sum(axis=axes)


def depthwise_forward(x, weight, bias, f: int, s: int) -> np.ndarray:
    """y[b,c,o] = bias[c] + sum_k weight[k,c] x[b,c,o*s+i_k]; x (B,C,*N), weight (f**d,C)
    -> y (B,C,*((N-f)//s+1)) (the dense convolution with groups = C)."""
    x64, w64, b64 = _f64(x), _f64(weight), _f64(bias)
    d = _check_features(x64)
    _check_dw_weight(w64, b64, x64.shape[1], f, d)
    return _cast(_dw_fwd64(x64, w64, b64, f, s), x)


def depthwise_backward(x, weight, bias, f: int, s: int, grad_y):
    """(dL/dx (B,C,*N), dL/dweight (K,C), dL/dbias (C,)) of depthwise_forward."""
    x64, w64, b64, gy = _f64(x), _f64(weight), _f64(bias), _f64(grad_y)
    d = _check_features(x64)
    _check_dw_weight(w64, b64, x64.shape[1], f, d)
    expected = x64.shape[:2] + pooled_shape(x64.shape[2:], f, s)
    if gy.shape != expected:
        raise ValueError(f"grad_y shape {gy.shape} != output shape {expected}")
    gx, gw, gb = _dw_bwd64(x64, w64, f, s, gy)
    return _cast(gx, x), _cast(gw, weight), _cast(gb, bias)


def depthwise_zero_forward(x, mask, weight, bias, f: int, s: int) -> np.ndarray:
    """Zero-ground depthwise convolution: bias + sum over the active inputs of o's window at
    active outputs o (window_mask), 0 elsewhere."""
    x64 = _f64(x)
    m = _mask64(mask, x64)
    y = depthwise_forward(np.where(m[:, None], x64, 0.0), weight, bias, f, s)
    return _cast(np.where(window_mask(m, f, s)[:, None], _f64(y), 0.0), x)


def depthwise_zero_backward(x, mask, weight, bias, f: int, s: int, grad_y):
    """(grad_x (0 at inactive positions), grad_weight, grad_bias) of depthwise_zero_forward."""
    x64, gy = _f64(x), _f64(grad_y)
    m = _mask64(mask, x64)
    gx, gw, gb = depthwise_backward(np.where(m[:, None], x64, 0.0), weight, bias, f, s,
                                    np.where(window_mask(m, f, s)[:, None], gy, 0.0))
    return _cast(np.where(m[:, None], _f64(gx), 0.0), x), gw, gb


def _check_subm_dw(x64, mask, g64, w64, b64, f):
    d = _check_features(x64)
    if f % 2 != 1:
        raise ValueError(f"submanifold convolution needs an odd filter size, got f={f}")
    if mask.shape != (x64.shape[0],) + x64.shape[2:]:
        raise ValueError(f"mask shape {mask.shape} != (B, *spatial)")
    if g64.shape != (x64.shape[1],):
        raise ValueError(f"ground shape {g64.shape} != (C={x64.shape[1]},)")
    _check_dw_weight(w64, b64, x64.shape[1], f, d)
    return d


def submanifold_depthwise_forward(x, mask, ground, weight, bias, f: int) -> np.ndarray:
    """At active p: bias + sum_k W[k] * x[p - f//2 + i_k] (out-of-grid = ground); at inactive
    p: g_out = bias + (sum_k W[k]) * ground. x (B,C,*N), mask (B,*N) -> y (B,C,*N)."""
    x64, g64, w64, b64 = _f64(x), _f64(ground), _f64(weight), _f64(bias)
    mask = np.asarray(mask, dtype=bool)
    d = _check_subm_dw(x64, mask, g64, w64, b64, f)
    xp, _ = _pad_with_ground(x64, g64, f // 2)
    y = np.where(mask[:, None], _dw_fwd64(xp, w64, b64, f, 1),
                 _chan(b64 + w64.sum(axis=0) * g64, d))
    return _cast(y, x)


def submanifold_depthwise_backward(x, mask, ground, weight, bias, f: int, grad_y):
    """(grad_x (B,C,*N) w.r.t. every entry of x, grad_ground (C,) direct (padding + inactive
    outputs), grad_weight (K,C), grad_bias (C,)) of submanifold_depthwise_forward."""
    x64, g64, w64, b64, gy = _f64(x), _f64(ground), _f64(weight), _f64(bias), _f64(grad_y)
    mask = np.asarray(mask, dtype=bool)
    _check_subm_dw(x64, mask, g64, w64, b64, f)
    if gy.shape != x64.shape:
        raise ValueError(f"grad_y shape {gy.shape} != output shape {x64.shape}")
    m = mask[:, None]
    xp, interior = _pad_with_ground(x64, g64, f // 2)
    gxp, gw, _ = _dw_bwd64(xp, w64, f, 1, np.where(m, gy, 0.0))
    gx = gxp[interior].copy()
    gxp[interior] = 0.0
    G = np.where(m, 0.0, gy).sum(axis=_not_channel_axes(gy.ndim))     # inactive outputs
    g_ground = gxp.sum(axis=_not_channel_axes(gxp.ndim)) + w64.sum(axis=0) * G
    gw = gw + g64[None, :] * G[None, :]
    gb = gy.sum(axis=_not_channel_axes(gy.ndim))
    return _cast(gx, x), _cast(g_ground, ground), _cast(gw, weight), _cast(gb, bias)


def submanifold_depthwise_zero_forward(x, mask, weight, bias, f: int) -> np.ndarray:
    """Zero-ground submanifold depthwise convolution: at active p, bias + sum_k W[k] *
    x[p - f//2 + i_k] over the active neighbours; 0 at inactive p."""
    x64 = _f64(x)
    m = _mask64(mask, x64)
    y = submanifold_depthwise_forward(np.where(m[:, None], x64, 0.0), m,
                                      np.zeros(x64.shape[1]), weight, bias, f)
    return _cast(np.where(m[:, None], _f64(y), 0.0), x)


def submanifold_depthwise_zero_backward(x, mask, weight, bias, f: int, grad_y):
    """(grad_x (0 at inactive positions), grad_weight, grad_bias) of
    submanifold_depthwise_zero_forward."""
    x64, gy = _f64(x), _f64(grad_y)
    m = _mask64(mask, x64)
    gx, _, gw, gb = submanifold_depthwise_backward(
        np.where(m[:, None], x64, 0.0), m, np.zeros(x64.shape[1]), weight, bias, f,
        np.where(m[:, None], gy, 0.0))
    return _cast(np.where(m[:, None], _f64(gx), 0.0), x), gw, gb


# fractional max-pooling (Graham, arXiv 1412.6071): the regions are given
# --------------------------------------------------------------------------


def _fmp_argmax(x64, regions):
    """Max and first (row-major inside the region) argmax position over product regions:
    regions[j] (n_out_j, 2) [start, end) ranges of dimension j. Returns best (B,C,*n_out) and
    the winning flat input index per output (B,C,*n_out)."""
    spatial = x64.shape[2:]
    out_sp = tuple(len(r) for r in regions)
    best = np.empty(x64.shape[:2] + out_sp)
    arg = np.empty(x64.shape[:2] + out_sp, dtype=np.int64)
    B, C = x64.shape[:2]
    for o in itertools.product(*(range(n) for n in out_sp)):
        rng_ = [np.arange(r[i][0], r[i][1]) for r, i in zip(regions, o, strict=True)]
        pts = np.stack(np.meshgrid(*rng_, indexing="ij"), -1).reshape(-1, len(rng_))
        flat = np.ravel_multi_index(tuple(pts.T), spatial)
        vals = x64.reshape(B, C, -1)[:, :, flat]
        k = np.argmax(vals, axis=2)          # first maximum in row-major region order
        best[(slice(None), slice(None)) + o] = np.take_along_axis(vals, k[..., None], 2)[..., 0]
        arg[(slice(None), slice(None)) + o] = flat[k]
    return best, arg


def fmp_mask(mask, regions) -> np.ndarray:
    """Output mask: True where the product region holds an active input of mask (B,*N)."""
    m = np.asarray(mask, dtype=bool)[:, None].astype(np.float64)
    best, _ = _fmp_argmax(m, regions)
    return best[:, 0] > 0


def fmp_forward(x, regions) -> np.ndarray:
    """y[b,c,o] = max of x[b,c] over the region prod_j [regions[j][o_j, 0], regions[j][o_j, 1])."""
    x64 = _f64(x)
    _check_features(x64)
    return _cast(_fmp_argmax(x64, regions)[0], x)


def fmp_backward(x, regions, grad_y) -> np.ndarray:
    """dL/dx: grad_y[o] routed to the first maximal (row-major) position of region o
    (overlapping regions add up)."""
    x64, gy = _f64(x), _f64(grad_y)
    _check_features(x64)
    _, arg = _fmp_argmax(x64, regions)
    B, C = x64.shape[:2]
    gx = np.zeros((B, C, int(np.prod(x64.shape[2:]))))
    bi, ci = np.meshgrid(np.arange(B), np.arange(C), indexing="ij")
    for o in itertools.product(*(range(len(r)) for r in regions)):
        idx = (slice(None), slice(None)) + o
        np.add.at(gx, (bi, ci, arg[idx]), gy[idx])
    return _cast(gx.reshape(x64.shape), x)


def fmp_zero_forward(x, mask, regions) -> np.ndarray:
    """Zero-ground form: max over the region's active positions at active outputs, else 0."""
    x64 = _f64(x)
    m = _mask64(mask, x64)
    best, _ = _fmp_argmax(np.where(m[:, None], x64, -np.inf), regions)
    return _cast(np.where(fmp_mask(m, regions)[:, None], best, 0.0), x)


def fmp_zero_backward(x, mask, regions, grad_y) -> np.ndarray:
    """grad_y of each active output routed to its region's first maximal active position."""
    x64, gy = _f64(x), _f64(grad_y)
    m = _mask64(mask, x64)
    gy = np.where(fmp_mask(m, regions)[:, None], gy, 0.0)
    gx = fmp_backward(np.where(m[:, None], x64, -np.inf), regions, gy)
    return _cast(np.where(m[:, None], gx, 0.0), x)


# transposed convolution (Deconvolution) and unpooling
# --------------------------------------------------------------------------
#
# Input position i adds W_k^T x[i] to output position i*s + k (k the row-major window
# offset), output size (N - 1)*s + f; the bias is added everywhere. In torch's
# ConvTranspose layout (C_in, C_out, f, ..., f): weight[k, ci, co] == torch_weight[ci, co,
# i0, i1, ...]. Unpooling is the same with identity weights and no bias. The sparse inverse
# modes (InverseConvolution, UnPooling) equal these read at the active sites of the tensor
# the pooling came from (zero_inactive of the result with that tensor's mask).

__all__ += [
    "deconv_shape",
    "deconv_weight_to_torch_layout",
    "deconv_torch_loops",
    "deconv_mask",
    "deconv_forward",
    "deconv_backward",
    "deconv_zero_forward",
    "deconv_zero_backward",
    "unpool_forward",
    "unpool_backward",
]


def deconv_shape(spatial, f: int, s: int) -> tuple:
    """Per-dim output size (N - 1)*s + f of a transposed convolution."""
    if f < 1 or s < 1:
        raise ValueError(f"filter size and stride must be >= 1, got f={f}, s={s}")
    return tuple((n - 1) * s + f for n in spatial)


def deconv_weight_to_torch_layout(w, f: int, d: int) -> np.ndarray:
    """(K, C_in, C_out) library layout -> (C_in, C_out, f, ..., f) torch ConvTranspose layout."""
    w = np.asarray(w)
    if w.ndim != 3 or w.shape[0] != f**d:
        raise ValueError(f"weight shape {w.shape} incompatible with f={f}, d={d}")
    _, cin, cout = w.shape
    return np.ascontiguousarray(np.transpose(w, (1, 2, 0)).reshape((cin, cout) + (f,) * d))


def deconv_torch_loops(x, torch_weight, bias, s: int) -> np.ndarray:
    """The transposed convolution written from torch's definition with plain loops (no
    library layout): y[b, co, i*s + j] += x[b, ci, i] * torch_weight[ci, co, j] + bias[co].
    Slow; for small hand checks of the layout."""
    x64, tw, b64 = _f64(x), _f64(torch_weight), _f64(bias)
    d = _check_features(x64)
    f = tw.shape[2]
    B, cin = x64.shape[:2]
    cout = tw.shape[1]
    y = np.zeros((B, cout) + deconv_shape(x64.shape[2:], f, s))
    for bi in range(B):
        for co in range(cout):
            y[(bi, co)] += b64[co]
            for i in itertools.product(*(range(n) for n in x64.shape[2:])):
                for j in itertools.product(range(f), repeat=d):
                    o = tuple(a * s + c for a, c in zip(i, j, strict=True))
                    for ci in range(cin):
                        y[(bi, co) + o] += x64[(bi, ci) + i] * tw[(ci, co) + j]
    return _cast(y, x)


def _deconv_window(offset, in_shape, s) -> tuple:
    """Index selecting y[:, :, i*s + offset] for all input positions i."""
    return _window(offset, in_shape, s)


def _deconv_fwd64(x, w, b, f, s):
    d = x.ndim - 2
    in_sp = x.shape[2:]
    y = np.broadcast_to(_chan(b, d), (x.shape[0], w.shape[2]) + deconv_shape(in_sp, f, s)).copy()
    for k, off in enumerate(window_offsets(f, d)):
        y[_deconv_window(off, in_sp, s)] += np.einsum("bi...,io->bo...", x, w[k])
    return y


def _deconv_bwd64(x, w, f, s, gy):
    d = x.ndim - 2
    in_sp = x.shape[2:]
    gx = np.zeros_like(x)
    gw = np.zeros_like(w)
    for k, off in enumerate(window_offsets(f, d)):
        g = gy[_deconv_window(off, in_sp, s)]
        gx += np.einsum("bo...,io->bi...", g, w[k])
        gw[k] = _sum_outer(x, g)
    return gx, gw, gy.sum(axis=_not_channel_axes(gy.ndim))


def deconv_mask(mask, f: int, s: int) -> np.ndarray:
    """Output mask (B,*((N-1)*s+f)) of a transposed convolution: True where an active input's
    window [i*s, i*s + f)^d holds the position."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim < 2:
        raise ValueError(f"mask must have shape (B, *spatial) with d >= 1, got {mask.shape}")
    d = mask.ndim - 1
    in_sp = mask.shape[1:]
    out = np.zeros((mask.shape[0],) + deconv_shape(in_sp, f, s), dtype=bool)
    for off in window_offsets(f, d):
        out[(slice(None),) + tuple(slice(i, i + s * (n - 1) + 1, s)
                                   for i, n in zip(off, in_sp, strict=True))] |= mask
    return out


def deconv_forward(x, weight, bias, f: int, s: int) -> np.ndarray:
    """y[b,co,i*s+i_k] += sum_ci weight[k,ci,co] x[b,ci,i], plus bias[co] everywhere; x
    (B,Ci,*N), weight (f**d,Ci,Co) -> y (B,Co,*((N-1)*s+f))."""
    x64, w64, b64 = _f64(x), _f64(weight), _f64(bias)
    d = _check_features(x64)
    _check_conv_weight(w64, b64, x64.shape[1], f, d)
    return _cast(_deconv_fwd64(x64, w64, b64, f, s), x)


def deconv_backward(x, weight, bias, f: int, s: int, grad_y):
    """(dL/dx (B,Ci,*N), dL/dweight (K,Ci,Co), dL/dbias (Co,)) of deconv_forward."""
    x64, w64, b64, gy = _f64(x), _f64(weight), _f64(bias), _f64(grad_y)
    d = _check_features(x64)
    _check_conv_weight(w64, b64, x64.shape[1], f, d)
    expected = (x64.shape[0], w64.shape[2]) + deconv_shape(x64.shape[2:], f, s)
    if gy.shape != expected:
        raise ValueError(f"grad_y shape {gy.shape} != output shape {expected}")
    gx, gw, gb = _deconv_bwd64(x64, w64, f, s, gy)
    return _cast(gx, x), _cast(gw, weight), _cast(gb, bias)


def deconv_zero_forward(x, mask, weight, bias, f: int, s: int) -> np.ndarray:
    """Zero-ground transposed convolution: inactive inputs count as 0; the bias and the sums
    at active outputs (deconv_mask), 0 elsewhere."""
    x64 = _f64(x)
    m = _mask64(mask, x64)
    y = deconv_forward(np.where(m[:, None], x64, 0.0), weight, bias, f, s)
    return _cast(np.where(deconv_mask(m, f, s)[:, None], _f64(y), 0.0), x)


def deconv_zero_backward(x, mask, weight, bias, f: int, s: int, grad_y):
    """(grad_x (0 at inactive positions), grad_weight, grad_bias) of deconv_zero_forward."""
    x64, gy = _f64(x), _f64(grad_y)
    m = _mask64(mask, x64)
    out_m = deconv_mask(m, f, s)
    gx, gw, gb = deconv_backward(np.where(m[:, None], x64, 0.0), weight, bias, f, s,
                                 np.where(out_m[:, None], gy, 0.0))
    return _cast(np.where(m[:, None], _f64(gx), 0.0), x), gw, gb


def unpool_forward(x, f: int, s: int) -> np.ndarray:
    """Each position's value copied to every position of its window [i*s, i*s + f)^d, summed
    where windows overlap (deconv_forward with identity weights, no bias)."""
    x64 = _f64(x)
    d = _check_features(x64)
    in_sp = x64.shape[2:]
    y = np.zeros(x64.shape[:2] + deconv_shape(in_sp, f, s))
    for off in window_offsets(f, d):
        y[_deconv_window(off, in_sp, s)] += x64
    return _cast(y, x)


def unpool_backward(x, f: int, s: int, grad_y) -> np.ndarray:
    """dL/dx of unpool_forward: the sum of grad_y over each window."""
    x64, gy = _f64(x), _f64(grad_y)
    d = _check_features(x64)
    in_sp = x64.shape[2:]
    if gy.shape != x64.shape[:2] + deconv_shape(in_sp, f, s):
        raise ValueError(f"grad_y shape {gy.shape} does not match the output of unpooling")
    gx = np.zeros_like(x64)
    for off in window_offsets(f, d):
        gx += gy[_deconv_window(off, in_sp, s)]
    return _cast(gx, x)


# per-site losses (segmentation)
# --------------------------------------------------------------------------
#
# Per-site logits (n, C) of the active sites with one label each; sites whose label is
# ignore_index are not scored. The loss is the mean over the labelled sites.

__all__ += ["site_cross_entropy_forward", "site_cross_entropy_backward"]


def _site_keep(labels, ignore_index):
    labels = np.asarray(labels)
    return np.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index


def site_cross_entropy_forward(logits, labels, ignore_index=None, label_smoothing=0.0):
    """Mean over the labelled sites of -sum_c t[i,c] log softmax(logits)[i,c] -> scalar."""
    keep = _site_keep(labels, ignore_index)
    z = _f64(logits)
    return cross_entropy_forward(z[keep], np.asarray(labels)[keep], label_smoothing)


def site_cross_entropy_backward(logits, labels, ignore_index=None, label_smoothing=0.0):
    """dL/dlogits (n, C): (softmax - t) / n_labelled at labelled sites, 0 at ignored ones."""
    keep = _site_keep(labels, ignore_index)
    z = _f64(logits)
    g = np.zeros_like(z)
    g[keep] = cross_entropy_backward(z[keep], np.asarray(labels)[keep], label_smoothing)
    return _cast(g, logits)


# --------------------------------------------------------------------------
# networks with residual sums and global pooling (the ResNet / VGG builders)
# --------------------------------------------------------------------------
#
# graph_forward / graph_backward extend net_forward / net_backward (same augmented batch:
# the ground travels as an extra all-inactive sample) with three more specs:
#   ("residual", block, shortcut, gs)   add(shortcut(h), block(h)): block and shortcut are
#                                       layer lists (shortcut None: the identity); their
#                                       params come in that order; the active set is the union;
#                                       gs False: each side counts 0 at its inactive sites
#   ("gap", gs), ("gmp", gs)            global average / max pool -> (B, C) (gs False: over
#                                       the active sites only, 0 for a sample without any)
#   ("concat", [branch, ...], gs)      channels of the branches (layer lists) joined, the
#                                       union of their active sets (gs False: each branch
#                                       counts 0 at its inactive sites)
#   ("deconv", f, s, gs)                transposed convolution (params W (f**d, Ci, Co), b):
#                                       input site i adds W_k^T x[i] to output i*s + k, an
#                                       output is active iff it is in an active input's
#                                       window; gs True: b everywhere, exact only for a zero
#                                       input ground (else ValueError); gs False: inactive
#                                       inputs count 0, b at active outputs only
# and, after a global pool, ("act", slope) and ("linear",) on the (B, C) array.

__all__ += ["graph_forward", "graph_backward", "graph_n_params", "tconv_forward",
            "tconv_backward"]


def tconv_forward(x, weight, f: int, s: int) -> np.ndarray:
    """Dense transposed convolution without bias (deconv_forward with a zero bias)."""
    w = _f64(weight)
    return deconv_forward(x, w, np.zeros(w.shape[2]), f, s)


def tconv_backward(x, weight, f: int, s: int, grad_y):
    """(grad_x, grad_weight) of tconv_forward."""
    w = _f64(weight)
    gx, gw, _ = deconv_backward(x, w, np.zeros(w.shape[2]), f, s, grad_y)
    return gx, _cast(gw, weight)


def graph_n_params(layers) -> int:
    """Number of parameter arrays the layer list consumes (None for a missing bias counts)."""
    n = 0
    for spec in layers:
        if spec[0] == "residual":
            n += graph_n_params(spec[1]) + (0 if spec[2] is None else graph_n_params(spec[2]))
        elif spec[0] == "concat":
            n += sum(graph_n_params(b) for b in spec[1])
        elif spec[0] == "deconv":
            n += 2
        elif spec[0] not in ("gap", "gmp"):
            if spec[0] not in _NET_PARAMS:
                raise ValueError(f"unknown layer spec {spec!r}")
            n += _NET_PARAMS[spec[0]]
    return n


def _graph_fwd(layers, h, m, params, pos):
    """(output, mask, tape); params[pos:] are consumed in layer order."""
    tape = []
    for spec in layers:
        kind = spec[0]
        if kind == "residual":
            _, block, shortcut, gs = spec
            hb, mb, tb = _graph_fwd(block, h, m, params, pos)
            pos_s = pos + graph_n_params(block)
            if shortcut is None:
                hs, ms, ts = h, m, None
            else:
                hs, ms, ts = _graph_fwd(shortcut, h, m, params, pos_s)
            pos = pos_s + (0 if shortcut is None else graph_n_params(shortcut))
            out = hb + hs if gs else zero_inactive(hb, mb) + zero_inactive(hs, ms)
            tape.append((spec, h, m, (tb, ts, mb, ms)))
            h, m = _f64(out), mb | ms
        elif kind in ("gap", "gmp"):
            gs = spec[1]
            if gs:
                fwd = global_avgpool_forward if kind == "gap" else global_maxpool_forward
                y = fwd(h)
            else:
                fwd = global_avgpool_zero_forward if kind == "gap" else \
                    global_maxpool_zero_forward
                y = fwd(h, m)
            tape.append((spec, h, m, None))
            h, m = _f64(y), None
        elif kind == "concat":
            outs = []
            for branch in spec[1]:
                outs.append(_graph_fwd(branch, h, m, params, pos))
                pos += graph_n_params(branch)
            hs = [o[0] if spec[2] else _f64(zero_inactive(o[0], o[1])) for o in outs]
            tape.append((spec, h, m, outs))
            h, m = np.concatenate(hs, axis=1), union_mask(*[o[1] for o in outs])
        elif kind == "deconv":
            f, s, gs = spec[1:]
            w, b = (None if a is None else _f64(a) for a in params[pos:pos + 2])
            no_bias = b is None
            b = _bias(b, w.shape[2])
            if gs and np.any(_corner(h) != 0):
                raise ValueError("deconv: a nonzero input ground has no exact sparse form")
            mo = deconv_mask(m, f, s)
            y = tconv_forward(h if gs else zero_inactive(h, m), w, f, s)
            y = y + _chan(b, h.ndim - 2) * (1.0 if gs else mo[:, None])
            tape.append((spec, h, m, ([w, b], pos, mo, no_bias)))
            pos += 2
            h, m = _f64(y), mo
        else:
            k = _NET_PARAMS[kind]
            p = [None if a is None else _f64(a) for a in params[pos:pos + k]]
            tape.append((spec, h, m, (p, pos)))
            pos += k
            if m is None and kind == "act":
                h = _f64(_act_fwd(h, spec[1]))
            else:
                h, m = _net_layer_forward(spec, h, m, p)
    return h, m, tape


def _graph_bwd(tape, g, grads):
    """Gradient of the list's input from that of its output; params' grads into grads."""
    for spec, h, m, extra in reversed(tape):
        kind = spec[0]
        if kind == "residual":
            tb, ts, mb, ms = extra
            gs = spec[3]
            gb = g if gs else zero_inactive(g, mb)
            gsc = g if gs else zero_inactive(g, ms)
            g_in = _graph_bwd(tb, _f64(gb), grads)
            g_in = g_in + (_f64(gsc) if ts is None else _graph_bwd(ts, _f64(gsc), grads))
            g = g_in
        elif kind in ("gap", "gmp"):
            if spec[1]:
                bwd = global_avgpool_backward if kind == "gap" else global_maxpool_backward
                g = _f64(bwd(h, g))
            else:
                bwd = global_avgpool_zero_backward if kind == "gap" else \
                    global_maxpool_zero_backward
                g = _f64(bwd(h, m, g))
        elif kind == "concat":
            g_in, lo = np.zeros_like(h), 0
            for o in extra:
                c = o[0].shape[1]
                gc = g[:, lo:lo + c] if spec[2] else _f64(zero_inactive(g[:, lo:lo + c], o[1]))
                g_in = g_in + _graph_bwd(o[2], gc, grads)
                lo += c
            g = g_in
        elif kind == "deconv":
            f, s, gs = spec[1:]
            (w, b), pos, mo, no_bias = extra
            gx, gw = tconv_backward(h if gs else zero_inactive(h, m), w, f, s, g)
            gb = _f64(g if gs else zero_inactive(g, mo)).sum(axis=_not_channel_axes(g.ndim))
            grads[pos], grads[pos + 1] = _f64(gw), None if no_bias else gb
            g = _f64(gx) if gs else _f64(zero_inactive(gx, m))
        else:
            p, pos = extra
            if m is None and kind == "act":
                g = _f64(_act_bwd(h, spec[1], g))
                continue
            g, gp = _net_layer_backward(spec, h, m, p, g)
            for j, a in enumerate(gp):
                grads[pos + j] = a
    return g


def _graph_run(x, mask, ground, layers, params):
    x64 = _f64(x)
    _check_features(x64)
    m = _mask64(mask, x64)
    g = _f64(ground)
    if g.shape != (x64.shape[1],):
        raise ValueError(f"ground shape {g.shape} != (C={x64.shape[1]},)")
    if len(params) != graph_n_params(layers):
        raise ValueError(f"layers need {graph_n_params(layers)} parameter arrays, got "
                         f"{len(params)}")
    d = x64.ndim - 2
    extra = np.broadcast_to(_chan(g, d), (1,) + x64.shape[1:])
    h = np.concatenate([np.where(m[:, None], x64, _chan(g, d)), extra])
    m = np.concatenate([m, np.zeros((1,) + m.shape[1:], bool)])
    return h, m, _graph_fwd(layers, h, m, list(params), 0)


def graph_forward(x, mask, ground, layers, params):
    """net_forward for layer lists with residual sums and global pools (see above):
    (y, y_mask, y_ground), or (logits or pooled (B, C), None, None) after a global pool."""
    _, _, (h, m, _) = _graph_run(x, mask, ground, layers, params)
    if m is None:
        return h[:-1], None, None
    return h[:-1], m[:-1], _corner(h)


def graph_backward(x, mask, ground, layers, params, grad_y):
    """(grad_x at active sites (0 elsewhere), grad_ground, [param grads, None for None]) of
    sum(grad_y * graph_forward(...)[0])."""
    h0, m0, (h, _, tape) = _graph_run(x, mask, ground, layers, params)
    gy = _f64(grad_y)
    if gy.shape != h[:-1].shape:
        raise ValueError(f"grad_y shape {gy.shape} != output shape {h[:-1].shape}")
    grads = [None] * len(params)
    g = _graph_bwd(tape, np.concatenate([gy, np.zeros((1,) + gy.shape[1:])]), grads)
    inactive = ~m0[:, None]
    g_ground = np.where(inactive, g, 0.0).sum(axis=_not_channel_axes(g.ndim))
    return np.where(inactive[:-1], 0.0, g[:-1]), g_ground, grads
