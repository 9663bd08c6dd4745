"""SparseTensor (active sites + ground state) and the dense Tensor used for logits and losses."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import backend
from .autograd import Node, Variable, record
from .geometry import Geometry, check_packable

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_INT32_MAX = 2**31 - 1


def _as_float_array(a: Any, name: str, dtype=None):
    if backend.device_of(a) == "cuda":  # pragma: no cover - needs a GPU
        arr = a
    else:
        arr = np.asarray(a)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    if arr.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {arr.dtype}")
    return arr


def _unbroadcast(g: Any, shape: tuple[int, ...]) -> Any:
    """Sum a gradient over the axes along which an operand of ``shape`` was broadcast."""
    if g.shape == shape:
        return g
    g = g.sum(axis=tuple(range(g.ndim - len(shape)))) if g.ndim > len(shape) else g
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    g = g.sum(axis=axes, keepdims=True) if axes else g
    return g.reshape(shape)


class Tensor(Variable):
    """A dense array in the autograd graph (logits, losses, ``SparseTensor.to_dense()``).

    Parameters
    ----------
    data : ndarray, float32 or float64
    requires_grad : bool
        Make this a leaf whose ``.grad`` collects gradients.
    """

    __array_priority__ = 100

    def __init__(self, data: Any, requires_grad: bool = False) -> None:
        self.data = _as_float_array(data, "data")
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._node = None

    # -- properties -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    def numpy(self) -> np.ndarray:
        """The values as a NumPy array (copied from the GPU if needed)."""
        return backend.to_device(self.data, "cpu")

    def item(self) -> float:
        if self.data.size != 1:
            raise ValueError(f"item() needs a single value, this tensor has shape {self.shape}")
        return float(self.numpy().reshape(()))

    def detach(self) -> Tensor:
        return Tensor(self.data)

    # -- autograd plumbing ------------------------------------------------------------------
    def _check_grad(self, grad: Any) -> Any:
        if grad is None:
            if self.data.size != 1:
                raise ValueError(f"backward(): grad is required for a non-scalar tensor "
                                 f"(shape {self.shape})")
            return backend.xp(self.device).ones_like(self.data)
        if isinstance(grad, Tensor):
            grad = grad.data
        g = _as_float_array(grad, "grad")
        if tuple(g.shape) != self.shape:
            raise ValueError(f"backward(): grad has shape {tuple(g.shape)}, expected {self.shape}")
        return backend.xp(self.device).ascontiguousarray(g, dtype=self.dtype)

    def _check_leaf_grad(self, grad: Any) -> None:
        if tuple(grad.shape) != self.shape:
            raise RuntimeError(f"gradient of shape {tuple(grad.shape)} for a Tensor of shape "
                               f"{self.shape}")

    def _accumulate(self, grad: Any) -> None:
        if self.requires_grad:
            self.grad = grad.copy() if self.grad is None else self.grad + grad

    # -- a few differentiable ops -----------------------------------------------------------
    def sum(self) -> Tensor:
        out = Tensor(self.data.sum().reshape(()).astype(self.dtype))
        return record(out, [self], lambda g: (g * backend.xp(self.device).ones_like(self.data),),
                      "sum")

    def mean(self) -> Tensor:
        n = self.data.size
        out = Tensor((self.data.sum() / n).reshape(()).astype(self.dtype))
        return record(out, [self],
                      lambda g: (g * backend.xp(self.device).ones_like(self.data) / n,), "mean")

    def reshape(self, *shape: int) -> Tensor:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        out = Tensor(self.data.reshape(shape))
        old = self.data.shape
        return record(out, [self], lambda g: (g.reshape(old),), "reshape")

    def _other(self, other: Any, what: str) -> Tensor:
        """``other`` as a Tensor: a Tensor as it is, an array or number as a constant."""
        if isinstance(other, Tensor):
            return other
        if isinstance(other, Variable):
            raise TypeError(f"Tensor {what} {type(other).__name__}: not supported")
        if backend.device_of(other) != self.device:
            raise ValueError(f"Tensor {what}: the tensor is on {self.device!r} but the other "
                             f"operand is on {backend.device_of(other)!r}")
        return Tensor(backend.xp(self.device).asarray(other, dtype=self.dtype))

    def __mul__(self, other: Any) -> Tensor:
        o = self._other(other, "*")
        a, b = self.data, o.data
        out = Tensor(a * b)
        return record(out, [self, o],
                      lambda g: (_unbroadcast(g * b, a.shape), _unbroadcast(g * a, b.shape)),
                      "mul")

    __rmul__ = __mul__

    def __add__(self, other: Any) -> Tensor:
        o = self._other(other, "+")
        sa, sb = self.data.shape, o.data.shape
        out = Tensor(self.data + o.data)
        return record(out, [self, o], lambda g: (_unbroadcast(g, sa), _unbroadcast(g, sb)),
                      "add")

    __radd__ = __add__

    def __neg__(self) -> Tensor:
        return self * -1.0

    def __sub__(self, other: Any) -> Tensor:
        return self + (-other)

    def __repr__(self) -> str:
        rg = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{rg})"


class SparseTensor(Variable):
    """Active sites of a batch of d-dimensional grids, plus the ground state.

    Parameters
    ----------
    coords : array_like of shape (n, 1 + d), integer
        Batch index, then d spatial coordinates, each in ``[0, spatial_shape[i])``.
        Duplicate sites are allowed at input: their features are summed.
    features : array_like of shape (n, C), dtype=float32 or float64
    spatial_shape : sequence of d ints (d = 1, 2, 3 or 4)
    batch_size : int, optional
        Number of samples; default ``max(coords[:, 0]) + 1`` (0 for no sites).
    requires_grad : bool
        Collect ``.grad`` (features) and ``.ground_grad`` in backward.
    ground : array_like of shape (C,), optional
        Value of every inactive site; default 0 (the empty background).
    allow_nonfinite : bool
        Accept NaN/Inf features (rejected by default).

    Attributes
    ----------
    grad : ndarray of shape (n, C) or None
        Gradient of the features after ``backward``.
    ground_grad : ndarray of shape (C,) or None
        Gradient of the ground state (the sum over all inactive sites of the dense gradient).
    """

    def __init__(self, coords: Any, features: Any, spatial_shape: Sequence[int],
                 batch_size: int | None = None, requires_grad: bool = False, *,
                 ground: Any = None, allow_nonfinite: bool = False) -> None:
        geometry, feats, g = _validate(coords, features, spatial_shape, batch_size, ground,
                                       allow_nonfinite)
        self._init(geometry, feats, g)
        self.requires_grad = bool(requires_grad)

    def _init(self, geometry: Geometry, features: Any, ground: Any) -> None:
        self.geometry = geometry
        self.features = features
        self.ground = ground
        self.grad = None
        self.ground_grad = None
        self._node: Node | None = None
        self.requires_grad = False

    @classmethod
    def _make(cls, geometry: Geometry, features: Any, ground: Any) -> SparseTensor:
        """Internal constructor: no validation."""
        t = cls.__new__(cls)
        t._init(geometry, features, ground)
        return t

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, array: Any, threshold: float = 0.0, *,
                   requires_grad: bool = False) -> SparseTensor:
        """Sites where any channel has ``|value| > threshold``.

        Parameters
        ----------
        array : ndarray of shape (B, C, *spatial), float32 or float64
        threshold : float
        """
        a = _as_float_array(array, "array")
        if a.ndim < 3 or a.ndim > 6:
            raise ValueError(f"array must have shape (B, C, *spatial) with 1 to 4 spatial "
                             f"dimensions, got shape {a.shape}")
        if (isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number))
                or not np.isfinite(threshold) or threshold < 0):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        a = backend.to_device(a, "cpu")
        if not np.isfinite(a).all():
            raise ValueError("array contains NaN or Inf; from_dense needs finite values")
        active = (np.abs(a) > threshold).any(axis=1)
        idx = np.nonzero(active)
        coords = np.stack(idx, axis=1).astype(np.int32)
        feats = np.moveaxis(a, 1, -1)[idx]
        return cls(coords.reshape(-1, a.ndim - 1), feats.reshape(-1, a.shape[1]), a.shape[2:],
                   batch_size=a.shape[0], requires_grad=requires_grad)

    @classmethod
    def from_samples(cls, samples: Sequence[Any], spatial_shape: Sequence[int]) -> SparseTensor:
        """Batch single samples into one tensor (sample b gets batch index b).

        Parameters
        ----------
        samples : sequence of (coords (n_b, d), features (n_b, C)) pairs or of SparseTensors
            with batch_size 1.
        spatial_shape : sequence of d ints
        """
        coords, feats = [], []
        for b, smp in enumerate(samples):
            if isinstance(smp, SparseTensor):
                if smp.batch_size != 1:
                    raise ValueError(f"samples[{b}] has batch_size {smp.batch_size}, expected 1")
                c = backend.to_device(smp.coords, "cpu")[:, 1:]
                f = backend.to_device(smp.features, "cpu")
            else:
                try:
                    c, f = smp
                except (TypeError, ValueError):
                    raise TypeError(f"samples[{b}] must be a (coords, features) pair or a "
                                    f"SparseTensor") from None
                c = np.asarray(c)
                f = np.asarray(f)
            if c.ndim != 2 or c.shape[1] != len(spatial_shape):
                raise ValueError(f"samples[{b}] coords must have shape (n, {len(spatial_shape)}),"
                                 f" got {c.shape}")
            coords.append(np.concatenate([np.full((len(c), 1), b, dtype=np.int64), c], 1))
            feats.append(f)
        if not samples:
            raise ValueError("samples is empty; give at least one sample")
        chans = {f.shape[1] if f.ndim == 2 else -1 for f in feats}
        if len(chans) != 1:
            raise ValueError(f"samples have different channel counts: {sorted(chans)}")
        return cls(np.concatenate(coords), np.concatenate(feats), spatial_shape,
                   batch_size=len(samples))

    # -- properties ---------------------------------------------------------------------------
    @property
    def coords(self):
        return self.geometry.coords

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.geometry.spatial_shape

    @property
    def batch_size(self) -> int:
        return self.geometry.batch_size

    @property
    def n_active(self) -> int:
        return self.geometry.n_active

    @property
    def channels(self) -> int:
        return int(self.features.shape[1])

    @property
    def dim(self) -> int:
        return self.geometry.dim

    @property
    def dtype(self) -> np.dtype:
        return self.features.dtype

    @property
    def device(self) -> str:
        return self.geometry.device

    @property
    def density(self) -> float:
        """Fraction of the grid's sites that are active."""
        total = self.batch_size * int(np.prod(self.spatial_shape))
        return self.n_active / total if total else 0.0

    # -- conversions ---------------------------------------------------------------------------
    def to_dense(self) -> Tensor:
        """Dense ``Tensor`` of shape (B, C, *spatial); inactive sites hold the ground state.

        Differentiable: the gradient reaches the active features and the ground state.
        """
        from .functional import to_dense
        return to_dense(self)

    def numpy(self) -> np.ndarray:
        """Dense NumPy array (B, C, *spatial), inactive sites = ground (no graph)."""
        from .autograd import no_grad
        with no_grad():
            return self.to_dense().numpy()

    def detach(self) -> SparseTensor:
        """Same sites and values, cut from the graph."""
        return SparseTensor._make(self.geometry, self.features, self.ground)

    def replace(self, features: Any, ground: Any = None, *,
                allow_nonfinite: bool = False) -> SparseTensor:
        """Same geometry, new features and ground; no graph. Validated like the constructor.

        Parameters
        ----------
        features : array of shape (n_active, C'), float32 or float64, on this tensor's device
        ground : array of shape (C',), optional (default zeros)
        allow_nonfinite : bool
            Accept NaN/Inf values (rejected by default).
        """
        xp = backend.xp(self.device)
        if backend.device_of(features) != self.device:
            raise ValueError(f"features are on {backend.device_of(features)!r} but the tensor "
                             f"is on {self.device!r}")
        feats = _as_float_array(features, "features")
        if feats.ndim != 2 or feats.shape[0] != self.n_active:
            raise ValueError(f"features must have shape ({self.n_active}, C), "
                             f"got {tuple(feats.shape)}")
        if not allow_nonfinite and feats.size and not _all_finite(feats):
            raise ValueError("features contain NaN or Inf; pass allow_nonfinite=True to "
                             "accept them")
        g = _check_ground(ground, feats.shape[1], feats.dtype, allow_nonfinite, xp)
        return SparseTensor._make(self.geometry, xp.ascontiguousarray(feats), g)

    def to(self, device: str) -> SparseTensor:
        """Copy to ``device`` ('cpu' or 'cuda'); differentiable."""
        d = backend.require_device(device)
        if d == self.device:
            return self
        out = SparseTensor._make(self.geometry.to(d), backend.to_device(self.features, d),
                                 backend.to_device(self.ground, d))
        src = self.device
        return record(out, [self], lambda g: ((backend.to_device(g[0], src),
                                                backend.to_device(g[1], src)),), "to")

    def astype(self, dtype: Any) -> SparseTensor:
        """Features and ground cast to float32 or float64 (no graph)."""
        dt = np.dtype(dtype)
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {dt}")
        return SparseTensor._make(self.geometry, self.features.astype(dt),
                                  self.ground.astype(dt))

    # -- autograd plumbing ---------------------------------------------------------------------
    def _check_grad(self, grad: Any) -> Any:
        if grad is None:
            raise ValueError("backward(): a sparse tensor needs grad=(grad_features, "
                             "grad_ground) or grad_features")
        xp = backend.xp(self.device)
        if isinstance(grad, tuple):
            gf, gg = grad
        else:
            gf, gg = grad, None
        gf = _as_float_array(gf, "grad")
        if tuple(gf.shape) != tuple(self.features.shape):
            raise ValueError(f"backward(): grad has shape {tuple(gf.shape)}, expected "
                             f"{tuple(self.features.shape)}")
        gg = xp.zeros_like(self.ground) if gg is None else xp.asarray(gg, self.dtype)
        if tuple(gg.shape) != tuple(self.ground.shape):
            raise ValueError(f"backward(): the ground-state grad has shape {tuple(gg.shape)}, "
                             f"expected {tuple(self.ground.shape)}")
        return (xp.ascontiguousarray(gf, dtype=self.dtype), xp.ascontiguousarray(gg))

    def _check_leaf_grad(self, grad: Any) -> None:
        gf, gg = grad
        if tuple(gf.shape) != tuple(self.features.shape) or tuple(gg.shape) != tuple(
                self.ground.shape):
            raise RuntimeError(f"gradient of shapes {tuple(gf.shape)}, {tuple(gg.shape)} for "
                               f"a SparseTensor with features {tuple(self.features.shape)} "
                               f"and ground {tuple(self.ground.shape)}")

    def _accumulate(self, grad: Any) -> None:
        if self.requires_grad:
            gf, gg = grad
            self.grad = gf.copy() if self.grad is None else self.grad + gf
            self.ground_grad = gg.copy() if self.ground_grad is None else self.ground_grad + gg

    def __repr__(self) -> str:
        return (f"SparseTensor(n_active={self.n_active}, channels={self.channels}, "
                f"spatial_shape={self.spatial_shape}, batch_size={self.batch_size}, "
                f"dtype={self.dtype}, device={self.device!r})")


def _validate(coords: Any, features: Any, spatial_shape: Any, batch_size: Any, ground: Any,
              allow_nonfinite: bool) -> tuple[Geometry, Any, Any]:
    """Check a user's sparse tensor, sum duplicate sites, hash the coordinates."""
    # spatial_shape
    try:
        shape = tuple(int(n) for n in spatial_shape)
        if any(int(n) != n for n in spatial_shape):
            raise TypeError
    except (TypeError, ValueError):
        raise TypeError(f"spatial_shape must be a sequence of ints, got {spatial_shape!r}") \
            from None
    if not 1 <= len(shape) <= 4:
        raise ValueError(f"spatial_shape must have 1 to 4 dimensions, got {len(shape)}")
    if any(n <= 0 for n in shape):
        raise ValueError(f"spatial_shape must be positive, got {shape}")
    if any(n > _INT32_MAX for n in shape):
        raise ValueError(f"spatial_shape entries must be at most 2**31 - 1 (coordinates are "
                         f"int32), got {shape}")
    d = len(shape)
    devices = {backend.device_of(coords), backend.device_of(features)}
    if devices == {"cuda"}:
        return _validate_on_device(coords, features, shape, batch_size, ground,
                                   allow_nonfinite)
    if "cuda" in devices:
        raise ValueError(f"coords are on {backend.device_of(coords)!r} but features on "
                         f"{backend.device_of(features)!r}; put both on one device")
    # coords
    c = np.asarray(coords)
    if c.dtype.kind not in "iu":
        if c.size == 0 and c.dtype.kind == "f":
            c = c.astype(np.int32)
        else:
            raise TypeError(f"coords must be an integer array, got dtype {c.dtype}")
    if c.ndim != 2 or c.shape[1] != 1 + d:
        raise ValueError(f"coords must have shape (n, {1 + d}) (batch index, then {d} "
                         f"coordinates), got shape {c.shape}")
    n = c.shape[0]
    # features
    f = np.asarray(features)
    if f.dtype not in FLOAT_DTYPES:
        raise TypeError(f"features must be float32 or float64, got dtype {f.dtype}")
    if f.ndim != 2:
        raise ValueError(f"features must have shape (n, C), got shape {f.shape}")
    if f.shape[0] != n:
        raise ValueError(f"features has {f.shape[0]} rows but coords has {n}")
    if not allow_nonfinite and f.size and not np.isfinite(f).all():
        bad = int(np.argwhere(~np.isfinite(f))[0, 0])
        raise ValueError(f"features contain NaN or Inf (first at row {bad}); pass "
                         f"allow_nonfinite=True to accept them")
    # coordinate ranges: per column, as 1-D reductions (numpy's axis-0 reductions over a few
    # int columns are some 50x slower); the offending row is looked for only on failure
    if n:
        lo = [c[:, j].min() for j in range(1 + d)]
        hi = [c[:, j].max() for j in range(1 + d)]
        if lo[0] < 0:
            row = int(np.argmax(c[:, 0] < 0))
            raise ValueError(f"coords[{row}] has a negative batch index {int(c[row, 0])}")
        if hi[0] > _INT32_MAX:
            row = int(np.argmax(c[:, 0] > _INT32_MAX))
            raise ValueError(f"coords[{row}] has batch index {int(c[row, 0])}; batch indices "
                             f"must be below 2**31")
        if any(lo[1 + j] < 0 or hi[1 + j] >= shape[j] for j in range(d)):
            bad = (c[:, 1:] < 0) | (c[:, 1:] >= np.asarray(shape))
            row, j = (int(v) for v in np.argwhere(bad)[0])
            raise ValueError(f"coords[{row}] = {c[row].tolist()} is outside the grid: "
                             f"coordinate {j} must be in [0, {shape[j]})")
    max_b = int(hi[0]) + 1 if n else 0
    if batch_size is None:
        batch_size = max_b
    else:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise TypeError(f"batch_size must be an int, got {batch_size!r}")
        batch_size = int(batch_size)
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        if batch_size > _INT32_MAX + 1:
            raise ValueError(f"batch_size must be at most 2**31 (batch indices are int32), "
                             f"got {batch_size}")
        if batch_size < max_b:
            raise ValueError(f"batch_size={batch_size} but coords use batch index {max_b - 1}")
    check_packable(shape, batch_size)
    c32 = np.ascontiguousarray(c, dtype=np.int32)
    f = np.ascontiguousarray(f)
    from . import _cpu
    keys, vals, inverse, n_unique = _cpu.build_hash(c32, np.asarray(shape, dtype=np.int64))
    if n_unique < n:  # duplicates are summed (row order: first occurrence)
        first = np.full(n_unique, n, dtype=np.int64)
        np.minimum.at(first, inverse, np.arange(n))
        c32 = c32[first]
        summed = np.zeros((n_unique, f.shape[1]), dtype=f.dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            np.add.at(summed, inverse, f)
        if not allow_nonfinite and not np.isfinite(summed).all():
            bad = int(np.argwhere(~np.isfinite(summed))[0, 0])
            raise ValueError(f"the features summed over the duplicates of coords[{int(first[bad])}]"
                             f" = {c32[bad].tolist()} overflow to Inf ({f.dtype}); scale the "
                             f"features or pass allow_nonfinite=True")
        f = summed
    return Geometry(c32, shape, batch_size, "cpu", (keys, vals)), f, _check_ground(
        ground, f.shape[1], f.dtype, allow_nonfinite)


def _check_ground(ground: Any, C: int, dtype: np.dtype, allow_nonfinite: bool,
                  xp: Any = np) -> Any:
    """The ground state (C,) of a tensor with C channels: zeros by default; finite."""
    if ground is None:
        return xp.zeros(C, dtype=dtype)
    try:
        g = xp.asarray(ground, dtype=dtype)
    except (TypeError, ValueError):
        raise TypeError(f"ground must be an array of {C} numbers, got {ground!r:.60}") from None
    if g.shape != (C,):
        raise ValueError(f"ground must have shape ({C},), got {g.shape}")
    if not allow_nonfinite and not _all_finite(g):
        raise ValueError(f"ground contains NaN or Inf ({backend.to_host(g).tolist()}); pass "
                         f"allow_nonfinite=True to accept it")
    return xp.ascontiguousarray(g)


def _all_finite(a: Any) -> bool:
    """Whether every value of ``a`` is finite (on a device: one counted read of the answer)."""
    if backend.device_of(a) == "cpu":
        return bool(np.isfinite(a).all())
    return bool(backend.to_host(backend.xp("cuda").isfinite(a).all()))


def _validate_on_device(coords: Any, features: Any, shape: tuple[int, ...], batch_size: Any,
                        ground: Any, allow_nonfinite: bool) -> tuple[Geometry, Any, Any]:
    """_validate for coords and features on a device: the tensor stays there (the hash is
    built by the device's kernels). The ranges and the finiteness are summarised on the
    device and read back in one small copy; only if something is wrong (or sites repeat,
    which is rare) do the arrays come to the host, where the host checks name the fault."""
    xp = backend.xp("cuda")
    d = len(shape)
    if coords.dtype.kind not in "iu":
        raise TypeError(f"coords must be an integer array, got dtype {coords.dtype}")
    if coords.ndim != 2 or coords.shape[1] != 1 + d:
        raise ValueError(f"coords must have shape (n, {1 + d}) (batch index, then {d} "
                         f"coordinates), got shape {tuple(coords.shape)}")
    if features.dtype not in FLOAT_DTYPES:
        raise TypeError(f"features must be float32 or float64, got dtype {features.dtype}")
    if features.ndim != 2 or features.shape[0] != coords.shape[0]:
        raise ValueError(f"features must have shape ({coords.shape[0]}, C), got shape "
                         f"{tuple(features.shape)}")
    n = int(coords.shape[0])

    def on_host():      # the host checks, for their messages (and to sum duplicates)
        geom, f, g = _validate(backend.to_host(coords), backend.to_host(features), shape,
                               batch_size, backend.to_host(ground) if backend.device_of(
                                   ground) == "cuda" else ground, allow_nonfinite)
        geom = geom.to("cuda")
        return geom, backend.to_device(f, "cuda"), backend.to_device(g, "cuda")

    if n:
        c64 = coords.astype(xp.int64)
        summary = xp.concatenate([c64.min(axis=0), c64.max(axis=0),
                                  (~xp.isfinite(features)).any().reshape(1).astype(xp.int64)])
        s = backend.to_host(summary)
        lo, hi, bad = s[:1 + d], s[1 + d:2 + 2 * d], bool(s[-1])
        limits = np.asarray((_INT32_MAX,) + tuple(n - 1 for n in shape))
        if lo.min() < 0 or (hi > limits).any() or (bad and not allow_nonfinite) or (
                batch_size is not None and int(batch_size) <= hi[0]):
            return on_host()
        max_b = int(hi[0]) + 1
    else:
        max_b = 0
    if batch_size is None:
        batch_size = max_b
    elif isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
            not 0 <= batch_size <= _INT32_MAX + 1):
        return on_host()
    batch_size = int(batch_size)
    check_packable(shape, batch_size)
    c32 = xp.ascontiguousarray(coords, dtype=xp.int32)
    shape_arr = backend.to_device(np.asarray(shape, dtype=np.int64), "cuda")
    K = backend.kernels("cuda")
    keys, vals, _, n_unique = K.build_hash(c32, shape_arr)
    if n_unique < n:
        return on_host()
    f = xp.ascontiguousarray(features)
    if ground is not None and backend.device_of(ground) == "cpu":
        ground = backend.to_device(_check_ground(ground, f.shape[1], f.dtype, allow_nonfinite),
                                   "cuda")
    g = _check_ground(ground, f.shape[1], f.dtype, allow_nonfinite, xp)
    return Geometry(c32, shape, batch_size, "cuda", (keys, vals), shape_arr), f, g
