"""The paper's networks: DeepCNet(l, k) and DeepCNiN(l, k) (Graham 2014, section 3);
``from_spec``, a builder of sparse Sequentials from a compact string (VGG-style stacks with
global pooling and fully connected heads); ``ResNet`` (He et al. 2016, submanifold form of
Graham et al. 2018) and ``UNet`` for per-site segmentation (Ronneberger et al. 2015; Graham
et al. 2018)."""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from . import backend
from .autograd import record
from .combine import Concat, Residual
from .heads import GlobalAveragePooling, GlobalMaxPooling
from .nn import (
    LAYERS,
    AveragePooling,
    BatchNorm,
    Convolution,
    Dropout,
    LeakyReLU,
    Linear,
    MaxPooling,
    Module,
    NetworkInNetwork,
    ReLU,
    Sequential,
    SubmanifoldConvolution,
    _check_dtype,
    _check_int,
    _register,
    classify,
)
from .tensor import SparseTensor, Tensor

ACTIVATIONS = {"relu": 0.0, "leaky": 0.01, "vleaky": 1.0 / 3.0}


def activation_slope(activation: str | float) -> float:
    """Negative slope for 'relu' (0), 'leaky' (0.01), 'vleaky' (1/3) or a float."""
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or a float "
                             f"slope, got {activation!r}")
        return ACTIVATIONS[activation]
    if isinstance(activation, (int, float)) and 0 <= activation < 1:
        return float(activation)
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or a float slope in "
                     f"[0, 1), got {activation!r}")


class _DeepNet(Module):
    """Shared body of DeepCNet and DeepCNiN."""

    nin = False

    def __init__(self, l: int, k: int, *, in_channels: int = 1, num_classes: int = 10,
                 activation: str | float = "relu", dropout: float = 0.0,
                 channel_dropout: bool = False, dim: int = 2, dtype: Any = np.float32,
                 seed: int | None = 0) -> None:
        self.l = _check_int(l, "l")
        self.k = _check_int(k, "k")
        self.in_channels = _check_int(in_channels, "in_channels")
        self.num_classes = _check_int(num_classes, "num_classes")
        self.slope = activation_slope(activation)
        self.activation = activation
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.channel_dropout = bool(channel_dropout)
        self.dim = _check_int(dim, "dim")
        dtype = _check_dtype(dtype)
        rng = np.random.default_rng(seed)
        seeds = iter(rng.integers(0, 2**63 - 1, size=4 * (self.l + 2)))
        gain = 1.0 / np.sqrt(1.0 + self.slope ** 2)   # He init for the leaky slope
        layers: list[Module] = []
        cin = self.in_channels
        for i in range(self.l + 1):
            cout = (i + 1) * self.k
            conv = Convolution(cin, cout, 3 if i == 0 else 2, dim=self.dim, dtype=dtype,
                               seed=int(next(seeds)))
            conv.weight.data *= np.asarray(gain, dtype=conv.weight.dtype)
            # the activation is monotone, so it commutes with max-pooling (the ground state
            # included): applying it after the pool gives the paper's network exactly, on a
            # quarter of the sites
            layers.append(conv)
            if i < self.l:
                layers.append(MaxPooling(2, 2, dim=self.dim))
            layers.append(self._act())
            p = self.dropout * i / self.l
            if p > 0:
                layers.append(Dropout(p, batchwise=self.channel_dropout,
                                      seed=int(next(seeds))))
            if self.nin:
                nin = NetworkInNetwork(cout, cout, dtype=dtype, seed=int(next(seeds)))
                nin.weight.data *= np.asarray(gain, dtype=nin.weight.dtype)
                layers += [nin, self._act()]
            cin = cout
        self.features = Sequential(*layers)
        self.classifier = Linear(cin, self.num_classes, dtype=dtype, seed=int(next(seeds)))

    def _act(self) -> Module:
        return ReLU() if self.slope == 0 else LeakyReLU(self.slope)

    @property
    def input_size(self) -> int:
        """Spatial input size per dimension: 3 * 2**l."""
        return 3 * 2 ** self.l

    def forward(self, x: SparseTensor) -> Tensor:
        """SparseTensor (batch B, spatial input_size^dim, in_channels) -> logits (B, classes)."""
        return classify(self, x, f" (input_size = 3 * 2**l = {self.input_size})")

    def _spec_args(self) -> dict[str, Any]:
        return dict(l=self.l, k=self.k, in_channels=self.in_channels,
                    num_classes=self.num_classes, activation=self.activation,
                    dropout=self.dropout, channel_dropout=self.channel_dropout, dim=self.dim)


@_register
class DeepCNet(_DeepNet):
    """DeepCNet(l, k): l + 1 valid convolutions, n*k filters in the n-th (3x3 first, then
    2x2), a 2x2/2 max-pool between consecutive convolutions, the activation after every
    convolution, then a linear classifier on the 1x1 output. Input size 3 * 2**l.

    ``features`` holds conv, pool, activation, ... : the activation is applied after the
    pool, which gives the same network (activation and max commute) on fewer sites.

    Parameters
    ----------
    l, k : int
    in_channels, num_classes : int
    activation : 'relu', 'leaky' (0.01), 'vleaky' (1/3) or a float slope
    dropout : float
        Dropout rate p * i / l on the input of convolution i + 1 (after the activation of
        convolution i, i = 1..l; the last one feeds the classifier).
    channel_dropout : bool
        Drop whole channels (one mask per batch) instead of single features.
    dim : int
        Spatial dimensions (2 for handwriting).
    seed : int or None
        Seed of the He-normal initialisation (fixed seed, identical weights).
    """


@_register
class DeepCNiN(_DeepNet):
    """DeepCNet with a 1x1 NetworkInNetwork layer (same width, then the activation) after
    each max-pool and after the last convolution."""

    nin = True




def _int_list(value: Any, name: str, n: int | None = None) -> list[int]:
    """A non-empty sequence of positive ints (or one int, repeated n times)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and n is not None:
        value = [value] * n
    if isinstance(value, str) or not hasattr(value, "__len__") or len(value) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of ints, got {value!r}")
    out = [_check_int(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if n is not None and len(out) != n:
        raise ValueError(f"{name} must have {n} entries (one per stage), got {len(out)}")
    return out


def _ints_str(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


def _ints_from_str(value: Any, name: str) -> list[int]:
    if not isinstance(value, str) or not re.fullmatch(r"\d+(,\d+)*", value):
        raise ValueError(f"bad {name}={value!r:.40} in model spec")
    return [int(v) for v in value.split(",")]


class _TreeModel(Module):
    """A builder's network, saved as its tree of layers (``_CHILDREN``, each a module spec
    that :func:`sparsecnn.load` builds and counts the parameters of before allocating them)
    plus its scalar arguments (``_ARGS``; sequences of ints as comma-separated strings), so a
    model file never runs the builder on hostile sizes."""

    _CHILDREN: tuple[str, ...] = ()
    _ARGS: tuple[str, ...] = ()
    _LISTS: tuple[str, ...] = ()

    def _spec_args(self) -> dict[str, Any]:
        return {k: (_ints_str(getattr(self, k)) if k in self._LISTS else getattr(self, k))
                for k in self._ARGS}

    def spec(self) -> dict[str, Any]:
        out = {"type": type(self).__name__, **self._spec_args()}
        for name in self._CHILDREN:
            out[name] = getattr(self, name).spec()
        return out

    @classmethod
    def _from_spec(cls, args: dict[str, Any], build) -> Module:
        if set(args) != set(cls._ARGS) | set(cls._CHILDREN):
            raise ValueError(f"bad {cls.__name__} spec arguments {sorted(args)}")
        self = cls.__new__(cls)
        for k in cls._ARGS:
            v = args[k]
            if k in cls._LISTS:
                v = _ints_from_str(v, k)
            elif not isinstance(v, (int, float, str, bool)):
                raise ValueError(f"bad {k}={v!r:.40} in {cls.__name__} spec")
            setattr(self, k, v)
        for name in cls._CHILDREN:
            setattr(self, name, build(args[name]))
        return self

    def __repr__(self) -> str:
        head = super().__repr__()[:-1]
        inner = "\n".join(f"  {n}: {getattr(self, n)!r}".replace("\n", "\n  ")
                          for n in self._CHILDREN)
        return head + ",\n" + inner + "\n)"


def _check_sparse_input(model: Module, x: Any) -> None:
    if not isinstance(x, SparseTensor):
        raise TypeError(f"{type(model).__name__} expects a SparseTensor, got "
                        f"{type(x).__name__}")
    if x.dim != model.dim:
        raise ValueError(f"{type(model).__name__} is {model.dim}-dimensional but the input is "
                         f"{x.dim}-dimensional")
    if x.channels != model.in_channels:
        raise ValueError(f"{type(model).__name__} expects {model.in_channels} input channels, "
                         f"got {x.channels}")


def _conv_bn_relu(conv: Module, channels: int, dtype: Any) -> list[Module]:
    return [conv, BatchNorm(channels, dtype=dtype), ReLU()]


@_register
class ResNet(_TreeModel):
    """A sparse residual network for classification.

    Source: He, Zhang, Ren & Sun, "Deep residual learning for image recognition" (CVPR
    2016): stages of residual blocks ``x + F(x)``, ``F`` two 3x3 convolutions with batch
    norm, the resolution halved and the width changed between stages, global average pooling
    and a linear classifier. Submanifold form as in Graham, Engelcke & van der Maaten, "3D
    semantic segmentation with submanifold sparse convolutional networks" (CVPR 2018): the
    3x3 convolutions are submanifold (the active set does not grow, so every block's sum
    shares one geometry and needs no hashing); downsampling is a strided ``Convolution``
    (filter 2, stride 2) with batch norm and ReLU.

    Layout (``features``, then ``pool``, then ``classifier``)::

        SubmanifoldConvolution(in_channels, widths[0], f) BatchNorm ReLU
        for each stage i: [Convolution(widths[i-1], widths[i], 2, 2) BatchNorm ReLU, if i > 0]
                          blocks[i] x (Residual(S(f) B R S(f) B) ReLU)
        GlobalAveragePooling   Linear(widths[-1], num_classes)

    Parameters
    ----------
    widths : sequence of int, default (16, 32, 64)
        Channels of each stage.
    blocks : int or sequence of int, default 2
        Residual blocks per stage.
    in_channels, num_classes : int
    filter_size : int (odd), default 3
    dim : int
    dtype, seed : the weights' dtype and the seed of their initialisation

    The input size per dimension must be divisible by ``2**(len(widths) - 1)``
    (:meth:`input_size`; any size that fits works: global pooling takes any grid). Works in
    both ground-state modes (``set_ground_state``); ``model(x)`` gives logits (B, classes).
    """

    _CHILDREN = ("features", "pool", "classifier")
    _ARGS = ("widths", "blocks", "in_channels", "num_classes", "filter_size", "dim")
    _LISTS = ("widths", "blocks")

    def __init__(self, widths: Any = (16, 32, 64), blocks: Any = 2, *, in_channels: int = 1,
                 num_classes: int = 10, filter_size: int = 3, dim: int = 2,
                 dtype: Any = np.float32, seed: int | None = 0) -> None:
        self.widths = _int_list(widths, "widths")
        self.blocks = _int_list(blocks, "blocks", len(self.widths))
        self.in_channels = _check_int(in_channels, "in_channels")
        self.num_classes = _check_int(num_classes, "num_classes")
        self.filter_size = _check_int(filter_size, "filter_size")
        if self.filter_size % 2 == 0:
            raise ValueError(f"filter_size must be odd, got {filter_size}")
        self.dim = _check_int(dim, "dim")
        dtype = _check_dtype(dtype)
        n_conv = 2 + len(self.widths) + 2 * sum(self.blocks)
        seeds = iter(np.random.default_rng(seed).integers(0, 2**63 - 1, size=n_conv))
        f, d = self.filter_size, self.dim

        def subm(cin: int, cout: int) -> Module:
            return SubmanifoldConvolution(cin, cout, f, dim=d, dtype=dtype,
                                          seed=int(next(seeds)))

        w0 = self.widths[0]
        layers: list[Module] = _conv_bn_relu(subm(self.in_channels, w0), w0, dtype)
        for i, (w, nb) in enumerate(zip(self.widths, self.blocks, strict=True)):
            if i > 0:
                down = Convolution(self.widths[i - 1], w, 2, 2, dim=d, dtype=dtype,
                                   seed=int(next(seeds)))
                layers += _conv_bn_relu(down, w, dtype)
            for _ in range(nb):
                block = Sequential(subm(w, w), BatchNorm(w, dtype=dtype), ReLU(),
                                   subm(w, w), BatchNorm(w, dtype=dtype))
                layers += [Residual(block), ReLU()]
        self.features = Sequential(*layers)
        self.pool = GlobalAveragePooling()
        self.classifier = Linear(self.widths[-1], self.num_classes, dtype=dtype,
                                 seed=int(next(seeds)))

    def forward(self, x: SparseTensor) -> Tensor:
        """SparseTensor (B samples, in_channels) -> logits Tensor (B, num_classes)."""
        _check_sparse_input(self, x)
        step = 2 ** (len(self.widths) - 1)
        bad = [n for n in x.spatial_shape if n % step]
        if bad:
            raise ValueError(f"{self!r}: every spatial size must be divisible by "
                             f"2**(len(widths) - 1) = {step} (one halving per stage), got "
                             f"spatial_shape {tuple(x.spatial_shape)}")
        return self.classifier(self.pool(self.features(x)))

    def input_size(self, output_size: int = 1) -> int:
        """The smallest input size whose last stage is ``output_size`` wide (global pooling
        accepts any size; the size must be a multiple of 2**(stages - 1))."""
        return _check_int(output_size, "output_size") * 2 ** (len(self.widths) - 1)


def _deconvolution_class() -> type[Module]:
    """scn.Deconvolution (the transposed convolution), or a clear error where this version
    of the library does not have it yet."""
    cls = LAYERS.get("Deconvolution")
    if cls is None:
        raise NotImplementedError("UNet needs scn.Deconvolution (the transposed convolution "
                                  "of its decoder), which this version of sparsecnn lacks")
    return cls


def _on_sites(y: SparseTensor, geometry: Any) -> SparseTensor:
    """``y`` restricted to the sites of ``geometry``, whose sites are ``y``'s first rows in
    order (true of a network whose outermost union puts its input's sites first, as
    ``Concat`` with the identity branch first does). Gradient: to those rows, 0 elsewhere."""
    if y.geometry is geometry:
        return y
    n = geometry.n_active
    if y.n_active < n:
        raise ValueError(f"the output has {y.n_active} sites, fewer than the input's {n}")
    xp = backend.xp(y.device)
    out = SparseTensor._make(geometry, xp.ascontiguousarray(y.features[:n]), y.ground)

    def backward(grad):
        gf, gg = grad
        full = xp.zeros_like(y.features)
        full[:n] = gf
        return ((full, gg),)

    return record(out, [y], backward, "on_input_sites")


@_register
class UNet(_TreeModel):
    """A sparse U-Net for segmentation: per-site logits at the input's active sites.

    Sources: Ronneberger, Fischer & Brox, "U-Net: convolutional networks for biomedical
    image segmentation" (MICCAI 2015): an encoder that halves the resolution level by
    level, a decoder that doubles it back, the encoder's features concatenated to the
    decoder's at each level, a per-pixel classifier; in the sparse form of Graham, Engelcke
    & van der Maaten, "3D semantic segmentation with submanifold sparse convolutional
    networks" (CVPR 2018): submanifold 3x3 blocks, strided convolutions (filter 2, stride
    2) down, transposed convolutions (``scn.Deconvolution``, filter 2, stride 2) up.

    Layout (``features``, then ``classifier``)::

        SubmanifoldConvolution(in_channels, widths[0], f) BatchNorm ReLU
        level(0), where level(i) is
            reps x [S(f) B R] at widths[i]
            if i is not the last level:
                Concat(identity,
                       [Convolution(widths[i], widths[i+1], 2, 2) B R, level(i + 1),
                        Deconvolution(widths[i+1], widths[i], 2, 2) B R])
                S(f) 2*widths[i] -> widths[i], B R, then reps - 1 x [S(f) B R]
        classifier: NetworkInNetwork(widths[0], num_classes)

    ``model(x)`` is a SparseTensor of logits (n_active, num_classes) on ``x``'s own sites,
    in ``x``'s row order (``site_cross_entropy(model(x), labels)``). Inside, a
    transposed convolution activates every site in the window of an active input, so the
    decoder's sites are a superset of the input's; the outermost concatenation puts the
    input's sites first, and the output is read there.

    Ground state: the transposed convolution is exact only when its input's ground is 0
    (design.md), and the biases and batch norms before it make the ground nonzero in the
    ground-state mode. So a UNet is built in the **zero-ground mode**
    (``set_ground_state(False)``, saved with the model: inactive sites are 0, biases apply at
    active sites), the semantics of SparseConvNet's U-Net. Switching it to the ground-state
    mode makes ``Deconvolution`` refuse its input unless that ground happens to be 0.

    Parameters
    ----------
    widths : sequence of int, default (16, 32, 64)
        Channels of each level (its length is the number of levels).
    reps : int, default 1
        Submanifold blocks per level on each side.
    in_channels, num_classes : int
    filter_size : int (odd), default 3
    dim : int
    dtype, seed : the weights' dtype and the seed of their initialisation

    Every spatial size must be divisible by ``2**(len(widths) - 1)``.
    """

    _CHILDREN = ("features", "classifier")
    _ARGS = ("widths", "reps", "in_channels", "num_classes", "filter_size", "dim")
    _LISTS = ("widths",)

    def __init__(self, widths: Any = (16, 32, 64), reps: int = 1, *, in_channels: int = 1,
                 num_classes: int = 2, filter_size: int = 3, dim: int = 2,
                 dtype: Any = np.float32, seed: int | None = 0) -> None:
        deconv = _deconvolution_class()
        self.widths = _int_list(widths, "widths")
        self.reps = _check_int(reps, "reps")
        self.in_channels = _check_int(in_channels, "in_channels")
        self.num_classes = _check_int(num_classes, "num_classes")
        self.filter_size = _check_int(filter_size, "filter_size")
        if self.filter_size % 2 == 0:
            raise ValueError(f"filter_size must be odd, got {filter_size}")
        self.dim = _check_int(dim, "dim")
        dtype = _check_dtype(dtype)
        rng = np.random.default_rng(seed)
        f, d = self.filter_size, self.dim

        def nseed() -> int:
            return int(rng.integers(0, 2**63 - 1))

        def block(cin: int, cout: int) -> list[Module]:
            conv = SubmanifoldConvolution(cin, cout, f, dim=d, dtype=dtype, seed=nseed())
            return _conv_bn_relu(conv, cout, dtype)

        def level(i: int) -> list[Module]:
            w = self.widths[i]
            layers: list[Module] = []
            for _ in range(self.reps):
                layers += block(w, w)
            if i + 1 < len(self.widths):
                wn = self.widths[i + 1]
                down = Convolution(w, wn, 2, 2, dim=d, dtype=dtype, seed=nseed())
                inner = level(i + 1)
                up = deconv(wn, w, 2, 2, dim=d, dtype=dtype, seed=nseed())
                branch = Sequential(*_conv_bn_relu(down, wn, dtype), *inner,
                                    *_conv_bn_relu(up, w, dtype))
                layers.append(Concat(Sequential(), branch))
                layers += block(2 * w, w)
                for _ in range(self.reps - 1):
                    layers += block(w, w)
            return layers

        self.features = Sequential(*block(self.in_channels, self.widths[0]), *level(0))
        self.classifier = NetworkInNetwork(self.widths[0], self.num_classes, dtype=dtype,
                                           seed=nseed())
        self.set_ground_state(False)

    def forward(self, x: SparseTensor) -> SparseTensor:
        """SparseTensor (n_active, in_channels) -> logits (n_active, num_classes) on x's
        sites, in x's row order."""
        _check_sparse_input(self, x)
        step = 2 ** (len(self.widths) - 1)
        if any(n % step for n in x.spatial_shape):
            raise ValueError(f"{self!r}: every spatial size must be divisible by "
                             f"2**(len(widths) - 1) = {step} (one halving per level), got "
                             f"spatial_shape {tuple(x.spatial_shape)}")
        return _on_sites(self.classifier(self.features(x)), x.geometry)

    def input_size(self, output_size: int) -> int:
        """Output sites are input sites: the same size (a multiple of 2**(levels - 1))."""
        step = 2 ** (len(self.widths) - 1)
        if _check_int(output_size, "output_size") % step:
            raise ValueError(f"UNet sizes must be multiples of {step}, got {output_size}")
        return output_size


MODELS = {"DeepCNet": DeepCNet, "DeepCNiN": DeepCNiN, "ResNet": ResNet, "UNet": UNet}
assert all(name in LAYERS for name in MODELS)


def _spec_token_new_layers(tok: str, cin: int, dim: int, dtype: Any, seed: int, dense: bool,
                           spec: str) -> tuple[Module, int] | None:
    """(layer, out channels) for the tokens of the depthwise, transposed and fractional
    layers, else None."""
    m = re.fullmatch(r"(S?)DW(\d+)(?:/(\d+))?|T(\d+)/(\d+)-(\d+)|FMP(\d*\.?\d+)", tok)
    if m is None:
        return None
    if dense:
        raise ValueError(f"token {tok!r} in spec {spec!r}: a sparse layer cannot follow "
                         f"a global pooling (GAP/GMP), whose output is dense (B, C)")
    if tok.startswith(("DW", "SDW")):
        from .depthwise import DepthwiseConvolution, SubmanifoldDepthwiseConvolution
        f = int(m.group(2))
        if m.group(1):
            if m.group(3):
                raise ValueError(f"token {tok!r}: a submanifold convolution has no stride")
            return SubmanifoldDepthwiseConvolution(cin, f, dim=dim, dtype=dtype, seed=seed), cin
        return DepthwiseConvolution(cin, f, int(m.group(3) or 1), dim=dim, dtype=dtype,
                                    seed=seed), cin
    if tok.startswith("T"):
        from .deconv import Deconvolution
        out = int(m.group(6))
        return Deconvolution(cin, out, int(m.group(4)), int(m.group(5)), dim=dim, dtype=dtype,
                             seed=seed), out
    from .fmp import FractionalMaxPooling
    return FractionalMaxPooling(float(m.group(7)), overlapping=True, dim=dim,
                                seed=seed % 2**32), cin


def fmp_net(*args: Any, **kwargs: Any) -> Module:
    """The paper's FMP networks (Graham 2014b): see :func:`sparsecnn.fmp.fmp_net`."""
    from .fmp import fmp_net as build
    return build(*args, **kwargs)


def from_spec(spec: str, in_channels: int = 1, *, dim: int = 2, dtype: Any = np.float32,
              seed: int | None = 0) -> Sequential:
    """Build a Sequential of sparse layers from a compact string of tokens.

    Tokens, separated by spaces (``in_channels`` flows from layer to layer)::

        C{f}-{out}, C{f}/{s}-{out}   Convolution (filter f, stride s, out channels)
        S{f}-{out}                   SubmanifoldConvolution (odd f)
        N-{out}                      NetworkInNetwork
        P{f}, P{f}/{s}               MaxPooling;  A{f}, A{f}/{s}: AveragePooling
        R                            ReLU;  L, L{slope}: LeakyReLU (default 1/3, 'very leaky')
        B                            BatchNorm;  D{p}: Dropout(p)
        DW{f}, DW{f}/{s}             DepthwiseConvolution;  SDW{f}: its submanifold form
        T{f}/{s}-{out}               Deconvolution (transposed convolution, stride s)
        FMP{ratio}                   FractionalMaxPooling (overlapping, random regions)
        GAP, GMP                     GlobalAveragePooling / GlobalMaxPooling: sparse -> (B, C)
        FC-{out}                     Linear (after GAP or GMP)

    After a global pooling the tensor is dense (B, C): only R, L, B, D and FC may follow
    (their dense forms), and no sparse layer. A VGG-style net (Simonyan & Zisserman 2015,
    "Very deep convolutional networks for large-scale image recognition": stacks of 3x3
    convolutions, pooling between them, fully connected layers on top) in its submanifold
    form (Graham, Engelcke & van der Maaten 2018)::

        from_spec("S3-16 B R S3-16 B R P2 S3-32 B R S3-32 B R P2 GAP FC-64 R D0.5 FC-10")

    >>> from_spec("C3-32 R P2 C2-64 R P2 C2-96 R").input_size(1)
    12
    """
    if not isinstance(spec, str) or not spec.split():
        raise ValueError(f"spec must be a non-empty string of layer tokens, got {spec!r}; "
                         f"see help(sparsecnn.models.from_spec)")

    rng = np.random.default_rng(seed)
    layers: list[Module] = []
    cin = _check_int(in_channels, "in_channels")
    dense = False       # after a global pooling: a dense (B, C) Tensor
    for tok in spec.split():
        seed_i = int(rng.integers(0, 2**63 - 1))
        extra = _spec_token_new_layers(tok, cin, dim, dtype, seed_i, dense, spec)
        if extra is not None:
            layers.append(extra[0])
            cin = extra[1]
            continue
        m = re.fullmatch(r"([CSPA])(\d+)(?:/(\d+))?(?:-(\d+))?|N-(\d+)|R|L([\d.]*)|B|D([\d.]+)"
                         r"|GAP|GMP|FC-(\d+)", tok)
        if m is None:
            raise ValueError(f"cannot read layer token {tok!r} in spec {spec!r}; see "
                             f"help(sparsecnn.models.from_spec)")
        kind = tok[:2] if tok[:2] in ("GA", "GM", "FC") else tok[0]
        if dense and kind in ("C", "S", "P", "A", "N", "GA", "GM"):
            raise ValueError(f"token {tok!r} in spec {spec!r}: a sparse layer cannot follow "
                             f"a global pooling (GAP/GMP), whose output is dense (B, C)")
        if kind == "FC" and not dense:
            raise ValueError(f"token {tok!r} in spec {spec!r}: FC needs the dense (B, C) "
                             f"output of a global pooling; put GAP or GMP before it")
        if kind in ("GA", "GM"):
            layers.append(GlobalAveragePooling() if kind == "GA" else GlobalMaxPooling())
            dense = True
            continue
        if kind == "FC":
            out = int(m.group(8))
            layers.append(Linear(cin, out, dtype=dtype, seed=seed_i))
            cin = out
            continue
        f = int(m.group(2)) if m.group(2) else None
        s = int(m.group(3)) if m.group(3) else None
        out = int(m.group(4)) if m.group(4) else None
        if kind in "CS" and out is None:
            raise ValueError(f"token {tok!r} needs output channels: {kind}{f}-OUT")
        if kind in "PA" and out is not None:
            raise ValueError(f"token {tok!r}: pooling keeps the channel count; drop '-{out}'")
        if kind == "C":
            layers.append(Convolution(cin, out, f, s or 1, dim=dim, dtype=dtype, seed=seed_i))
            cin = out
        elif kind == "S":
            if s is not None:
                raise ValueError(f"token {tok!r}: a submanifold convolution has no stride")
            layers.append(SubmanifoldConvolution(cin, out, f, dim=dim, dtype=dtype, seed=seed_i))
            cin = out
        elif kind == "P":
            layers.append(MaxPooling(f, s, dim=dim))
        elif kind == "A":
            layers.append(AveragePooling(f, s, dim=dim))
        elif kind == "N":
            out = int(m.group(5))
            layers.append(NetworkInNetwork(cin, out, dtype=dtype, seed=seed_i))
            cin = out
        elif kind == "R":
            layers.append(ReLU())
        elif kind == "L":
            layers.append(LeakyReLU(float(m.group(6)) if m.group(6) else 1.0 / 3.0))
        elif kind == "B":
            layers.append(BatchNorm(cin, dtype=dtype))
        else:
            layers.append(Dropout(float(m.group(7)), seed=seed_i))
    return Sequential(*layers)
