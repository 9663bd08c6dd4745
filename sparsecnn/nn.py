"""Layers: Module, Sequential and the sparse layers of design.md.

Every layer and model has ``__call__``, ``parameters()`` (definition order, weight before
bias), ``train()``/``eval()``, ``to(device)``, ``state_dict()``/``load_state_dict()``, a
``spec()`` (JSON-able constructor arguments, used by :func:`sparsecnn.save`), and
``input_size(output_size)``: the spatial size that yields ``output_size``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import backend
from . import functional as F
from .autograd import Parameter
from .geometry import MAX_WINDOW
from .tensor import SparseTensor, Tensor

LAYERS: dict[str, type[Module]] = {}


def _register(cls):
    LAYERS[cls.__name__] = cls
    return cls


def _heads():
    """sparsecnn.heads (the dense-Tensor forms of ReLU, LeakyReLU, Dropout and BatchNorm);
    imported on use, as it imports this module."""
    from . import heads
    return heads


_INT_MAX = 2**31 - 1
_MAX_WEIGHTS = 2**31     # elements of one layer's weight


def _check_int(value: Any, name: str, minimum: int = 1, maximum: int = _INT_MAX) -> int:
    """An int in [minimum, maximum] (sizes and counts: at most 2**31 - 1 by default)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        limit = "2**31 - 1" if maximum == _INT_MAX else str(maximum)
        raise ValueError(f"{name} must be <= {limit}, got {value}")
    return int(value)


def _check_weight_size(shape: tuple[int, ...], names: str) -> None:
    """Refuse a weight of more than 2**31 numbers before allocating it."""
    n = math.prod(shape)
    if n > _MAX_WEIGHTS:
        raise ValueError(f"the weight {names} = {shape} would hold {n} numbers, more than the "
                         f"limit 2**31")


def _check_window_volume(filter_size: int, dim: int) -> int:
    """K = filter_size**dim, refused above MAX_WINDOW before a weight of K rows is made."""
    K = filter_size ** dim
    if K > MAX_WINDOW:
        raise ValueError(f"filter_size**dim = {filter_size}**{dim} = {K} exceeds the limit "
                         f"2**24 on the window volume")
    return K


def classify(model: Module, x: Any, size_rule: str = "") -> Tensor:
    """The forward of a network with a sparse ``features`` Sequential down to 1^d and a
    ``classifier``: checks that ``x`` is a SparseTensor of ``model.input_size``^dim sites with
    ``model.in_channels`` channels (``size_rule`` explains the size in the message), then
    logits (B, num_classes)."""
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{type(model).__name__} expects a SparseTensor, got "
                        f"{type(x).__name__}")
    n = model.input_size
    if tuple(x.spatial_shape) != (n,) * model.dim:
        raise ValueError(f"{model!r} needs spatial_shape {(n,) * model.dim}{size_rule}, got "
                         f"{tuple(x.spatial_shape)}")
    if x.channels != model.in_channels:
        raise ValueError(f"{model!r} expects {model.in_channels} input channels, got "
                         f"{x.channels}")
    y = model.features(x).to_dense()
    return model.classifier(y.reshape(y.shape[0], int(np.prod(y.shape[1:]))))


def _check_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def he_normal(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int,
              negative_slope: float = 0.0, dtype=np.float32) -> np.ndarray:
    """He initialisation: N(0, 2 / ((1 + a^2) fan_in)) for a (leaky) ReLU of slope a."""
    std = math.sqrt(2.0 / ((1.0 + negative_slope ** 2) * max(fan_in, 1)))
    return (rng.standard_normal(shape) * std).astype(dtype)


class Module:
    """Base class: parameters and sub-modules are found in attribute definition order."""

    training: bool = True
    ground_state: bool = True

    def __call__(self, x: Any) -> Any:
        self._check_parameters()
        return self.forward(x)

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape each of this layer's own parameters must have (from its arguments)."""
        return {}

    def _check_parameters(self) -> None:
        """Raise if a parameter was given data of another shape than the layer declares
        (checked before the op, so the message names the parameter that was changed)."""
        for name, shape in self._param_shapes().items():
            p = getattr(self, name)
            if p is not None and p.shape != shape:
                raise ValueError(f"{self!r}: {name} has shape {p.shape}, expected {shape}")

    def forward(self, x: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- structure ---------------------------------------------------------------------------
    def _children(self) -> Iterator[tuple[str, Any]]:
        for name, v in vars(self).items():
            if isinstance(v, (Parameter, Module)):
                yield name, v
            elif isinstance(v, (list, tuple)) and v and all(isinstance(m, Module) for m in v):
                for i, m in enumerate(v):
                    yield str(i), m

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """(dotted name, parameter) pairs; a parameter shared by several layers comes once,
        under its first name."""
        seen: set[int] = set()
        for name, p in self._named_parameters_all(prefix):
            if id(p) not in seen:
                seen.add(id(p))
                yield name, p

    def _named_parameters_all(self, prefix: str) -> Iterator[tuple[str, Parameter]]:
        for name, v in self._children():
            if isinstance(v, Parameter):
                yield prefix + name, v
            else:
                yield from v._named_parameters_all(prefix + name + ".")

    def parameters(self) -> list[Parameter]:
        """Trainable parameters in definition order (weight before bias)."""
        return [p for _, p in self.named_parameters()]

    def modules(self) -> Iterator[Module]:
        yield self
        for _, v in self._children():
            if isinstance(v, Module):
                yield from v.modules()

    def _buffers(self) -> dict[str, Any]:
        return {}

    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def set_ground_state(self, enabled: bool) -> Module:
        """``False``: the modern libraries' semantics (inactive = 0, biases at active sites)."""
        for m in self.modules():
            m.ground_state = bool(enabled)
        return self

    def set_fusion(self, enabled: bool) -> Module:
        """Let every Sequential in this module run fused kernels where they apply (the
        default), or (``False``) run each layer on its own; the results are the same."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        for m in self.modules():
            if isinstance(m, Sequential):
                m.fuse = enabled
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    @property
    def device(self) -> str:
        ps = self.parameters()
        return backend.device_of(ps[0].data) if ps else getattr(self, "_device", "cpu")

    def to(self, device: str) -> Module:
        """Move parameters and buffers to ``device`` ('cpu' or 'cuda')."""
        d = backend.require_device(device)
        for m in self.modules():
            m._device = d
            for v in vars(m).values():
                if isinstance(v, Parameter):
                    v.data = backend.to_device(v.data, d)
                    if v.grad is not None:
                        v.grad = backend.to_device(v.grad, d)
            for name, buf in m._buffers().items():
                setattr(m, name, backend.to_device(buf, d))
        return self

    def astype(self, dtype: Any) -> Module:
        """Cast parameters and buffers to float32 or float64."""
        dt = np.dtype(dtype)
        if dt not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dt}")
        for m in self.modules():
            for v in vars(m).values():
                if isinstance(v, Parameter):
                    v.data = v.data.astype(dt)
                    v.grad = None
            for name, buf in m._buffers().items():
                setattr(m, name, buf.astype(dt))
        return self

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters and buffers by dotted name, as NumPy arrays (copies)."""
        out: dict[str, np.ndarray] = {}
        for name, p in self.named_parameters():
            out[name] = np.array(backend.to_device(p.data, "cpu"))
        self._collect_buffers("", out)
        return out

    def _collect_buffers(self, prefix: str, out: dict[str, np.ndarray]) -> None:
        for name, buf in self._buffers().items():
            out[prefix + name] = np.array(backend.to_device(buf, "cpu"))
        for name, v in self._children():
            if isinstance(v, Module):
                v._collect_buffers(prefix + name + ".", out)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy arrays into parameters and buffers; names and shapes must match exactly."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            raise ValueError(f"state_dict mismatch: missing {missing}, unexpected {extra}")
        for k, v in state.items():
            if tuple(np.shape(v)) != own[k].shape:
                raise ValueError(f"state_dict[{k!r}] has shape {tuple(np.shape(v))}, expected "
                                 f"{own[k].shape}")
        params = dict(self.named_parameters())
        dev = self.device
        for k, v in state.items():
            if k in params:
                p = params[k]
                p.data = backend.to_device(np.array(v, dtype=p.data.dtype), dev)
        self._load_buffers("", state)

    def _load_buffers(self, prefix: str, state: dict[str, Any]) -> None:
        for name, buf in self._buffers().items():
            setattr(self, name, backend.to_device(np.array(state[prefix + name],
                                                           dtype=buf.dtype), self.device))
        for name, v in self._children():
            if isinstance(v, Module):
                v._load_buffers(prefix + name + ".", state)

    def spec(self) -> dict[str, Any]:
        """JSON-able description from which :func:`sparsecnn.load` rebuilds the module."""
        out = {"type": type(self).__name__, **self._spec_args()}
        ps = self.parameters()
        if ps:
            out["dtype"] = str(ps[0].dtype)
        return out

    def _spec_args(self) -> dict[str, Any]:  # pragma: no cover - overridden
        return {}

    # -- sizes ---------------------------------------------------------------------------------
    def input_size(self, output_size: int) -> int:
        """Spatial size of the input that gives ``output_size`` (per dimension)."""
        return output_size

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._spec_args().items())
        return f"{type(self).__name__}({args})"


class _ConvBase(Module):
    """Shared by the two convolutions: checked sizes, He-normal weight, zero bias."""

    def _init_conv(self, in_channels: int, out_channels: int, filter_size: int, dim: int,
                   bias: bool, dtype: Any, seed: int | None) -> None:
        self.in_channels = _check_int(in_channels, "in_channels")
        self.out_channels = _check_int(out_channels, "out_channels")
        self.filter_size = _check_int(filter_size, "filter_size")
        self.dim = _check_dim_arg(dim)
        dtype = _check_dtype(dtype)
        K = _check_window_volume(self.filter_size, self.dim)
        _check_weight_size((K, self.in_channels, self.out_channels),
                           "(filter_size**dim, in_channels, out_channels)")
        rng = np.random.default_rng(seed)
        self.weight = Parameter(he_normal(rng, (K, self.in_channels, self.out_channels),
                                          K * self.in_channels, dtype=dtype))
        self.bias = Parameter(np.zeros(self.out_channels, dtype=dtype)) if bias else None

    def _check_dim(self, x: Any) -> None:
        _check_input_dim(self, x)

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.filter_size ** self.dim, self.in_channels, self.out_channels),
                "bias": (self.out_channels,)}


def _check_dim_arg(dim: Any) -> int:
    dim = _check_int(dim, "dim")
    if dim > 4:
        raise ValueError(f"dim must be 1, 2, 3 or 4, got {dim}")
    return dim


def _check_input_dim(layer: Module, x: Any) -> None:
    """A layer made for ``layer.dim`` spatial dimensions gets an input with that many."""
    if isinstance(x, SparseTensor) and x.dim != layer.dim:
        raise ValueError(f"{layer!r} is {layer.dim}-dimensional but the input is {x.dim}-"
                         f"dimensional")


@_register
class Convolution(_ConvBase):
    """Valid sparse convolution (no padding) of size ``filter_size`` and ``stride``.

    Input SparseTensor (n, C_in) on an N^d grid with ``(N - f) % s == 0``; output on the
    ``((N - f) / s + 1)^d`` grid, active where the window holds an active input.
    ``weight``: (f**dim, C_in, C_out), row-major window offsets; ``bias``: (C_out,).
    Weights are He-normal (std sqrt(2 / (f**dim * C_in))), biases zero.
    """

    def __init__(self, in_channels: int, out_channels: int, filter_size: int, stride: int = 1,
                 *, dim: int = 2, bias: bool = True, dtype: Any = np.float32,
                 seed: int | None = None) -> None:
        self.stride = _check_int(stride, "stride")
        self._init_conv(in_channels, out_channels, filter_size, dim, bias, dtype, seed)

    def forward(self, x: SparseTensor) -> SparseTensor:
        self._check_dim(x)
        return F.convolution(x, self.weight, self.bias, self.filter_size, self.stride,
                             ground_state=self.ground_state)

    def input_size(self, output_size: int) -> int:
        return (output_size - 1) * self.stride + self.filter_size

    def _spec_args(self) -> dict[str, Any]:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    filter_size=self.filter_size, stride=self.stride, dim=self.dim,
                    bias=self.bias is not None)


@_register
class SubmanifoldConvolution(_ConvBase):
    """Submanifold convolution, odd ``filter_size``: output sites = input sites."""

    def __init__(self, in_channels: int, out_channels: int, filter_size: int, *, dim: int = 2,
                 bias: bool = True, dtype: Any = np.float32, seed: int | None = None) -> None:
        if _check_int(filter_size, "filter_size") % 2 == 0:
            raise ValueError(f"filter_size must be odd for a submanifold convolution, got "
                             f"{filter_size}")
        self._init_conv(in_channels, out_channels, filter_size, dim, bias, dtype, seed)

    def forward(self, x: SparseTensor) -> SparseTensor:
        self._check_dim(x)
        return F.submanifold_convolution(x, self.weight, self.bias, self.filter_size,
                                         ground_state=self.ground_state)

    def _spec_args(self) -> dict[str, Any]:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    filter_size=self.filter_size, dim=self.dim, bias=self.bias is not None)


class _PoolBase(Module):
    def __init__(self, pool_size: int, stride: int | None = None, *, dim: int = 2) -> None:
        self.pool_size = _check_int(pool_size, "pool_size")
        self.stride = self.pool_size if stride is None else _check_int(stride, "stride")
        self.dim = _check_dim_arg(dim)

    def input_size(self, output_size: int) -> int:
        return (output_size - 1) * self.stride + self.pool_size

    def _spec_args(self) -> dict[str, Any]:
        return dict(pool_size=self.pool_size, stride=self.stride, dim=self.dim)


@_register
class MaxPooling(_PoolBase):
    """Max pooling; the ground state is a candidate in windows with inactive sites.

    Ties (which only matter for the gradient) go to the ground, then to the first active
    site in window order; a dense max-pool that gives them to the first position of the
    window sends the gradient elsewhere only at such exact ties (both are subgradients)."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        _check_input_dim(self, x)
        return F.max_pooling(x, self.pool_size, self.stride, ground_state=self.ground_state)


@_register
class AveragePooling(_PoolBase):
    """Average over the whole window; inactive sites count as the ground state."""

    def forward(self, x: SparseTensor) -> SparseTensor:
        _check_input_dim(self, x)
        return F.average_pooling(x, self.pool_size, self.stride, ground_state=self.ground_state)


@_register
class NetworkInNetwork(Module):
    """1x1 convolution: ``weight`` (C_in, C_out), ``bias`` (C_out,)."""

    def __init__(self, in_channels: int, out_channels: int, *, bias: bool = True,
                 dtype: Any = np.float32, seed: int | None = None) -> None:
        self.in_channels = _check_int(in_channels, "in_channels")
        self.out_channels = _check_int(out_channels, "out_channels")
        _check_weight_size((self.in_channels, self.out_channels), "(in_channels, out_channels)")
        rng = np.random.default_rng(seed)
        dtype = _check_dtype(dtype)
        self.weight = Parameter(he_normal(rng, (self.in_channels, self.out_channels),
                                          self.in_channels, dtype=dtype))
        self.bias = Parameter(np.zeros(self.out_channels, dtype=dtype)) if bias else None

    def forward(self, x: SparseTensor) -> SparseTensor:
        return F.network_in_network(x, self.weight, self.bias, ground_state=self.ground_state)

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.in_channels, self.out_channels), "bias": (self.out_channels,)}

    def _spec_args(self) -> dict[str, Any]:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    bias=self.bias is not None)


@_register
class ReLU(Module):
    """max(x, 0) on features and ground."""

    def forward(self, x: SparseTensor | Tensor) -> SparseTensor | Tensor:
        if isinstance(x, Tensor):
            return _heads().dense_relu(x)
        return F.relu(x)


@_register
class LeakyReLU(Module):
    """x if x > 0 else negative_slope * x (Graham's 'very leaky' is 1/3)."""

    def __init__(self, negative_slope: float = 0.01) -> None:
        if not isinstance(negative_slope, (int, float)) or not 0 <= negative_slope < 1:
            raise ValueError(f"negative_slope must be a number in [0, 1), got "
                             f"{negative_slope!r}")
        self.negative_slope = float(negative_slope)

    def forward(self, x: SparseTensor | Tensor) -> SparseTensor | Tensor:
        if isinstance(x, Tensor):
            return _heads().dense_leaky_relu(x, self.negative_slope)
        return F.leaky_relu(x, self.negative_slope)

    def _spec_args(self) -> dict[str, Any]:
        return dict(negative_slope=self.negative_slope)


@_register
class Dropout(Module):
    """Inverted dropout of the active sites' features in training; identity in eval mode.

    The ground state keeps its expected value, so in training mode this is the one layer
    where the sparse network is not the dense network (which would drop inactive sites too).
    ``channelwise=True`` drops whole channels per sample; ``batchwise=True`` drops whole
    channels for the whole batch (batch-wise channel dropout).
    """

    def __init__(self, p: float = 0.5, *, channelwise: bool = False, batchwise: bool = False,
                 seed: int | None = None) -> None:
        if not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"p must be a probability in [0, 1), got {p!r}")
        self.p = float(p)
        self.channelwise = bool(channelwise)
        self.batchwise = bool(batchwise)
        self.rng = np.random.default_rng(seed)
        self._device_rngs: dict[str, Any] = {}

    def rng_for(self, device: str) -> Any:
        """The generator that draws the masks on ``device``: ``self.rng`` on the CPU; on a
        GPU one of the array module's, seeded once from ``self.rng`` (so the masks come
        from the device, reproducibly for a fixed seed)."""
        if device == "cpu":
            return self.rng
        r = self._device_rngs.get(device)
        if r is None:
            seed = int(self.rng.integers(2**63 - 1))
            r = self._device_rngs[device] = backend.xp(device).random.default_rng(seed)
        return r

    def forward(self, x: SparseTensor | Tensor) -> SparseTensor | Tensor:
        if not self.training or self.p == 0:
            return x
        if isinstance(x, Tensor):
            return _heads().dense_dropout(x, self.p, self.rng_for(x.device),
                                          channelwise=self.channelwise,
                                          batchwise=self.batchwise)
        return F.dropout(x, self.p, self.rng_for(x.device), channelwise=self.channelwise,
                         batchwise=self.batchwise)

    def _spec_args(self) -> dict[str, Any]:
        return dict(p=self.p, channelwise=self.channelwise, batchwise=self.batchwise)


@_register
class BatchNorm(Module):
    """Batch normalisation over the active sites (the ground goes through the same map).

    ``weight`` (gamma) and ``bias`` (beta) have shape (channels,); running statistics are
    buffers saved with the model. ``sync`` (not saved; None by default): a
    :class:`sparsecnn.distributed.BatchNormSync` whose ranks share the training statistics
    (``fit(..., sync_batchnorm=True)`` sets it for the run; sparse inputs only).
    """

    sync: Any = None

    def __init__(self, channels: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 dtype: Any = np.float32) -> None:
        self.channels = _check_int(channels, "channels")
        F._check_bn_options(eps, momentum)
        self.eps = float(eps)
        self.momentum = float(momentum)
        dtype = _check_dtype(dtype)
        self.weight = Parameter(np.ones(self.channels, dtype=dtype))
        self.bias = Parameter(np.zeros(self.channels, dtype=dtype))
        self.running_mean = np.zeros(self.channels, dtype=dtype)
        self.running_var = np.ones(self.channels, dtype=dtype)

    def _buffers(self) -> dict[str, Any]:
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.channels,), "bias": (self.channels,)}

    def forward(self, x: SparseTensor | Tensor) -> SparseTensor | Tensor:
        sync = self.sync if self.training else None
        if isinstance(x, Tensor):
            if sync is not None:
                raise NotImplementedError("BatchNorm: synchronised statistics (sync) are for "
                                          "sparse inputs only, not after a global pooling")
            return _heads().dense_batch_norm(x, self.weight, self.bias, self.running_mean,
                                             self.running_var, training=self.training,
                                             momentum=self.momentum, eps=self.eps)
        return F.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                            training=self.training, momentum=self.momentum, eps=self.eps,
                            ground_state=self.ground_state, sync=sync)

    def _spec_args(self) -> dict[str, Any]:
        return dict(channels=self.channels, eps=self.eps, momentum=self.momentum)


@_register
class SparseToDense(Module):
    """SparseTensor -> dense Tensor (B, C, *spatial), inactive sites = ground."""

    def forward(self, x: SparseTensor) -> Tensor:
        return F.to_dense(x)


@_register
class Flatten(Module):
    """Dense Tensor (B, ...) -> (B, prod(...))."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], int(np.prod(x.shape[1:])))


@_register
class Linear(Module):
    """Dense classifier: (B, C_in) @ weight (C_in, C_out) + bias."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 dtype: Any = np.float32, seed: int | None = None) -> None:
        self.in_features = _check_int(in_features, "in_features")
        self.out_features = _check_int(out_features, "out_features")
        _check_weight_size((self.in_features, self.out_features), "(in_features, out_features)")
        rng = np.random.default_rng(seed)
        dtype = _check_dtype(dtype)
        std = 1.0 / math.sqrt(self.in_features)
        self.weight = Parameter((rng.standard_normal((self.in_features, self.out_features))
                                 * std).astype(dtype))
        self.bias = Parameter(np.zeros(self.out_features, dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def _param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"weight": (self.in_features, self.out_features), "bias": (self.out_features,)}

    def _spec_args(self) -> dict[str, Any]:
        return dict(in_features=self.in_features, out_features=self.out_features,
                    bias=self.bias is not None)


def _fused_slope(layer: Module | None) -> float | None:
    """The negative slope of a (Leaky)ReLU that a pooling kernel can apply, else None."""
    if type(layer) is ReLU:
        return 0.0
    if type(layer) is LeakyReLU:
        return layer.negative_slope
    return None


def fusion_at(layers: list[Module], i: int) -> tuple[str | None, int, float | None]:
    """Which fused kernel ``Sequential`` runs for ``layers[i:]``: (kind, layers it
    replaces, fused activation slope or None).

    - ``"conv+maxpool"``: a ``Convolution`` followed by a ``MaxPooling`` whose windows
      partition its input (pool_size == stride), and a following ``ReLU``/``LeakyReLU`` too
      if there is one (2 or 3 layers);
    - ``"maxpool+act"``: a ``MaxPooling`` followed by a ``ReLU``/``LeakyReLU`` (2 layers);
    - ``None``: no fusion, the layer runs alone (1 layer).

    Only these exact types fuse (not subclasses, whose forward may differ)."""
    m = layers[i]
    nxt = layers[i + 1] if i + 1 < len(layers) else None
    if type(m) is Convolution and type(nxt) is MaxPooling and nxt.pool_size == nxt.stride:
        slope = _fused_slope(layers[i + 2] if i + 2 < len(layers) else None)
        return "conv+maxpool", 2 if slope is None else 3, slope
    if type(m) is MaxPooling and _fused_slope(nxt) is not None:
        return "maxpool+act", 2, _fused_slope(nxt)
    return None, 1, None


@_register
class Sequential(Module):
    """Layers applied in order; ``input_size`` chains the layers' size rules backwards.

    Fusion: where a fused kernel gives the same values and gradients as consecutive layers
    (:func:`fusion_at`: a Convolution and a MaxPooling whose windows partition its output,
    with a following ReLU/LeakyReLU; a MaxPooling and a following activation), the forward
    runs it instead, after every check of the layers it replaces. The groups are
    :meth:`fusion_plan`; they show in ``repr`` and in ``sparsecnn.stats`` (and ``sparsecnn
    demo``). ``fuse=False`` (or :meth:`Module.set_fusion`) runs every layer on its own.
    """

    def __init__(self, *layers: Module, fuse: bool = True) -> None:
        for i, m in enumerate(layers):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential: layer {i} is a {type(m).__name__}, not a Module")
        if not isinstance(fuse, bool):
            raise TypeError(f"fuse must be True or False, got {fuse!r}")
        self.layers = list(layers)
        self.fuse = fuse
        self._plan: tuple[tuple, list] | None = None

    def fusion_plan(self) -> list[tuple[str | None, int, int, float | None]]:
        """The groups the forward runs: (kind, start, stop, fused slope) for ``layers[start:
        stop]``, kind ``"conv+maxpool"``, ``"maxpool+act"`` or None (one layer alone).
        Worked out once per list of layers (and again when the list or ``fuse`` changes)."""
        key = (self.fuse, tuple(map(id, self.layers)))
        if self._plan is None or self._plan[0] != key:
            plan, i = [], 0
            while i < len(self.layers):
                kind, n, slope = fusion_at(self.layers, i) if self.fuse else (None, 1, None)
                plan.append((kind, i, i + n, slope))
                i += n
            self._plan = (key, plan)
        return self._plan[1]

    def forward(self, x: Any) -> Any:
        layers = self.layers
        for kind, start, _, slope in self.fusion_plan():
            m = layers[start]
            if kind == "conv+maxpool":
                # one kernel computes the convolution's rows window by window and pools
                # them: its output never goes to memory (same values and gradients); a
                # following activation runs in it too. Every check of the layers it
                # replaces runs first.
                pool = layers[start + 1]
                m._check_parameters()
                m._check_dim(x)
                _check_input_dim(pool, x)
                x = F.convolution_max_pooling(
                    x, m.weight, m.bias, m.filter_size, m.stride, pool.pool_size,
                    ground_state=m.ground_state, pool_ground_state=pool.ground_state,
                    negative_slope=slope)
            elif kind == "maxpool+act":
                # the activation runs inside the pooling kernel: same values and gradients,
                # one pass over the features fewer
                _check_input_dim(m, x)
                x = F.max_pooling(x, m.pool_size, m.stride, ground_state=m.ground_state,
                                  negative_slope=slope)
            else:
                x = m(x)
        return x

    def __getitem__(self, i: int) -> Module:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Module]:
        return iter(self.layers)

    def append(self, layer: Module) -> Sequential:
        self.layers.append(layer)
        return self

    def input_size(self, output_size: int) -> int:
        for m in reversed(self.layers):
            output_size = m.input_size(output_size)
        return output_size

    def spec(self) -> dict[str, Any]:
        out = {"type": "Sequential", "layers": [m.spec() for m in self.layers]}
        if not self.fuse:
            out["fuse"] = False
        return out

    def __repr__(self) -> str:
        lines = []
        for kind, start, stop, _ in self.fusion_plan():
            group = "+".join(type(m).__name__ for m in self.layers[start:stop])
            for i in range(start, stop):
                tag = f"   <- fused {group} ({start}-{stop - 1})" if kind else ""
                lines.append(f"  ({i}): {self.layers[i]!r}{tag}")
        head = "Sequential(fuse=False," if not self.fuse else "Sequential("
        return head + "\n" + "\n".join(lines) + "\n)"
