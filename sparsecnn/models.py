"""The paper's networks: DeepCNet(l, k) and DeepCNiN(l, k) (Graham 2014, section 3), and
``from_spec``, a builder of sparse Sequentials from a compact string."""
from __future__ import annotations

import re
from typing import Any

import numpy as np

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
        if not isinstance(x, SparseTensor):
            raise TypeError(f"{type(self).__name__} expects a SparseTensor, got "
                            f"{type(x).__name__}")
        n = self.input_size
        if tuple(x.spatial_shape) != (n,) * self.dim:
            raise ValueError(f"{self!r} needs spatial_shape {(n,) * self.dim} (input_size = "
                             f"3 * 2**l = {n}), got {tuple(x.spatial_shape)}")
        if x.channels != self.in_channels:
            raise ValueError(f"{self!r} expects {self.in_channels} input channels, got "
                             f"{x.channels}")
        y = self.features(x).to_dense()
        return self.classifier(y.reshape(y.shape[0], int(np.prod(y.shape[1:]))))

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




MODELS = {"DeepCNet": DeepCNet, "DeepCNiN": DeepCNiN}
assert all(name in LAYERS for name in MODELS)


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

    >>> from_spec("C3-32 R P2 C2-64 R P2 C2-96 R").input_size(1)
    12
    """
    if not isinstance(spec, str) or not spec.split():
        raise ValueError(f"spec must be a non-empty string of layer tokens, got {spec!r}; "
                         f"see help(sparsecnn.models.from_spec)")

    rng = np.random.default_rng(seed)
    layers: list[Module] = []
    cin = _check_int(in_channels, "in_channels")
    for tok in spec.split():
        seed_i = int(rng.integers(0, 2**63 - 1))
        m = re.fullmatch(r"([CSPA])(\d+)(?:/(\d+))?(?:-(\d+))?|N-(\d+)|R|L([\d.]*)|B|D([\d.]+)",
                         tok)
        if m is None:
            raise ValueError(f"cannot read layer token {tok!r} in spec {spec!r}; see "
                             f"help(sparsecnn.models.from_spec)")
        kind = tok[0]
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
