"""Fractional max-pooling (B. Graham, "Fractional Max-Pooling", arXiv 1412.6071).

Sizes. Per dimension an input of size ``N_in`` gives ``N_out = floor(N_in / ratio)`` outputs
(``N_in >= 2``); :meth:`FractionalMaxPooling.input_size` inverts it (the smallest ``N_in``).

Regions. Per dimension an increasing integer sequence ``0 = a_0 < a_1 < ... < a_{N_out} =
N_in - 1`` with increments 1 and 2 (the paper's sequences, which run from 1 to ``N_in``,
shifted to 0-based). Output ``i`` pools the region ``[a_i, a_{i+1})`` (disjoint: the regions
tile ``[0, N_in - 1)``; the last input row is in none, as in the paper) or ``[a_i, a_{i+1} + 1)``
(overlapping: one wider, neighbours share their boundary row). A d-dimensional region is the
product of one region per dimension. The sequences:

- random: ``N_in - 1 - N_out`` increments 2 and the rest 1, in a random order;
- pseudo-random: ``a_i = ceil(alpha (i + u)) - ceil(alpha u)`` with ``u`` uniform in [0, 1)
  and ``alpha = (N_in - 1) / N_out``, the ratio that makes the sequence end at ``N_in - 1``
  exactly (it lies in [1, 2], close to ``ratio``).

In training mode every forward pass draws new sequences from the layer's seeded NumPy
generator (on the host, so CPU and GPU get the same regions for a given seed); in evaluation
mode one draw per input shape is kept (``eval_regions="fixed"``, the default), or, with
``eval_regions="fresh"``, every forward pass draws new regions from an evaluation generator
that restarts from its seed each time the layer is put into evaluation mode: then
``scn.train.evaluate(model, data, tta=k)`` averages k passes over k different region draws
(the paper's test-time averaging), reproducibly.

Semantics (design.md's ground state). An output site is active iff its region holds an active
input; its value is the max over the region's active sites and, if the region holds an
inactive site, the ground; the output ground is the input ground. With ``ground_state=False``
the max is over active sites only and the output ground is 0.

Kernels. The op builds a :class:`~sparsecnn.geometry.Rulebook` on the input's device (pairs
(i, o, k), k the row-major position of the site in the M^d box at the region's corner, M the
largest region side, K = M**d; an input has at most one pair per k, as the kernels need) and
calls the backend's ``maxpool_forward`` / ``maxpool_backward``. Those kernels add the ground
as a candidate wherever a window has fewer than K pairs; a region smaller than K whose sites
are all active must not get it, so its box positions outside the region are filled with pairs
from a phantom input row (index n_in, appended to the features, value -inf: it never wins over
a real site, except a tie with a real -inf, and its gradient row is dropped).
"""
from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from . import backend
from .autograd import record
from .functional import _check_sparse, _maxpool_grads, _pool_grounds
from .geometry import MAX_WINDOW, Geometry, Rulebook
from .nn import (
    Convolution,
    LeakyReLU,
    Linear,
    Module,
    ReLU,
    Sequential,
    _check_dim_arg,
    _check_dtype,
    _check_input_dim,
    _check_int,
    _register,
    classify,
)
from .tensor import SparseTensor, Tensor

__all__ = ["FractionalMaxPooling", "FMPNet", "fmp_net", "fmp_output_size", "fmp_input_size",
           "fmp_sequence", "fmp_regions", "fractional_max_pooling"]

_WHAT = "FractionalMaxPooling"


# -- sizes and regions (host NumPy) -------------------------------------------------------------
def _check_ratio(ratio: Any) -> float:
    if (isinstance(ratio, bool) or not isinstance(ratio, int | float | np.floating)
            or not 1 < float(ratio) < 2):
        raise ValueError(f"{_WHAT}: ratio must be a number with 1 < ratio < 2, got {ratio!r}")
    return float(ratio)


def fmp_output_size(n_in: int, ratio: float) -> int:
    """``floor(n_in / ratio)``: the output size of one dimension."""
    return int(math.floor(int(n_in) / float(ratio)))


def fmp_input_size(n_out: int, ratio: float) -> int:
    """The smallest input size whose output size is ``n_out`` (about ``ceil(n_out * ratio)``)."""
    n_out = _check_int(n_out, "output_size")
    m = max(2, math.ceil(n_out * ratio) - 2)
    while fmp_output_size(m, ratio) < n_out:
        m += 1
    while m > 2 and fmp_output_size(m - 1, ratio) >= n_out:
        m -= 1
    return m


def fmp_sequence(n_in: int, n_out: int, rng: np.random.Generator, *,
                 pseudo_random: bool = False) -> np.ndarray:
    """(n_out + 1,) int64: ``0 = a_0 < ... < a_{n_out} = n_in - 1``, increments 1 and 2."""
    n_in, n_out = int(n_in), int(n_out)
    n2 = n_in - 1 - n_out
    if n_out < 1 or not 0 <= n2 <= n_out:
        raise ValueError(f"{_WHAT}: no sequence of {n_out} increments 1 and 2 sums to "
                         f"{n_in} - 1 (need n_out <= n_in - 1 <= 2 n_out)")
    if pseudo_random:
        u = float(rng.random())
        alpha = (n_in - 1) / n_out
        if n2 in (0, n_out):                     # alpha is 1 or 2: every increment is alpha
            a = np.arange(n_out + 1, dtype=np.int64) * int(round(alpha))
        else:
            i = np.arange(n_out + 1, dtype=np.float64)
            a = (np.ceil(alpha * (i + u)) - math.ceil(alpha * u)).astype(np.int64)
            a[-1] = n_in - 1
    else:
        inc = np.ones(n_out, dtype=np.int64)
        inc[:n2] = 2
        inc = rng.permutation(inc)
        a = np.concatenate([[0], np.cumsum(inc)]).astype(np.int64)
    step = np.diff(a)
    if a[0] != 0 or a[-1] != n_in - 1 or step.min() < 1 or step.max() > 2:  # pragma: no cover
        raise AssertionError(f"bad FMP sequence {a} for n_in={n_in}, n_out={n_out}")
    return a


def fmp_regions(n_in: int, ratio: float, rng: np.random.Generator, *,
                overlapping: bool = False, pseudo_random: bool = False) -> np.ndarray:
    """(n_out, 2) int64 [start, end) pooling regions of one dimension of size ``n_in``."""
    ratio = _check_ratio(ratio)
    n_out = fmp_output_size(n_in, ratio)
    if n_out < 1:
        raise ValueError(f"{_WHAT}(ratio={ratio}): an input size of {n_in} gives no output; "
                         f"each spatial size must be >= 2")
    a = fmp_sequence(n_in, n_out, rng, pseudo_random=pseudo_random)
    return np.stack([a[:-1], a[1:] + (1 if overlapping else 0)], axis=1)


def _check_regions(regions: Any, spatial_shape: tuple[int, ...]) -> list[np.ndarray]:
    d = len(spatial_shape)
    if not isinstance(regions, list | tuple) or len(regions) != d:
        raise ValueError(f"{_WHAT}: regions must be a list of {d} arrays (one per dimension) "
                         f"of shape (n_out, 2), got {type(regions).__name__}")
    out = []
    for j, (r, n) in enumerate(zip(regions, spatial_shape, strict=True)):
        r = np.asarray(backend.to_host(r) if backend.device_of(r) != "cpu" else r)
        if r.ndim != 2 or r.shape[1] != 2 or r.shape[0] < 1 or r.dtype.kind not in "iu":
            raise ValueError(f"{_WHAT}: regions[{j}] must be an int array of shape (n_out, 2) "
                             f"with n_out >= 1, got {r.dtype} {r.shape}")
        r = r.astype(np.int64)
        if r[:, 0].min() < 0 or r[:, 1].max() > n or (r[:, 1] <= r[:, 0]).any():
            raise ValueError(f"{_WHAT}: regions[{j}] must hold non-empty [start, end) ranges "
                             f"inside [0, {n})")
        out.append(r)
    M = max(int((r[:, 1] - r[:, 0]).max()) for r in out)
    if M ** d > MAX_WINDOW:
        raise ValueError(f"{_WHAT}: largest region side {M} gives a window volume {M}**{d} "
                         f"above the limit 2**24")
    return out


def _coverage_table(r: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, T) tables of the regions holding each coordinate: output index and position
    inside the region, -1 where a coordinate lies in fewer than T regions."""
    size = r[:, 1] - r[:, 0]
    o = np.repeat(np.arange(r.shape[0], dtype=np.int64), size)
    p = np.arange(o.shape[0], dtype=np.int64) - np.repeat(np.cumsum(size) - size, size)
    c = r[o, 0] + p
    order = np.argsort(c, kind="stable")
    c, o, p = c[order], o[order], p[order]
    cov = np.bincount(c, minlength=n)
    T = max(int(cov.max()) if cov.size else 0, 1)
    slot = np.arange(c.shape[0]) - np.repeat(np.cumsum(cov) - cov, cov)
    to = np.full((n, T), -1, dtype=np.int32)
    tp = np.full((n, T), -1, dtype=np.int32)
    to[c, slot] = o
    tp[c, slot] = p
    return to, tp


def fmp_rulebook(geometry: Geometry, regions: list[np.ndarray]) -> tuple[Rulebook, Geometry]:
    """The rulebook (n_in + 1 inputs: the last one the phantom row) and output geometry of
    max-pooling ``geometry``'s sites over the product regions ``regions`` (checked)."""
    dev, d = geometry.device, geometry.dim
    xp = backend.xp(dev)
    sizes = [r[:, 1] - r[:, 0] for r in regions]
    M = max(int(s.max()) for s in sizes)
    K = M ** d
    n = geometry.n_active
    out_shape = tuple(int(r.shape[0]) for r in regions)
    coords = geometry.coords
    cand_o, cand_p, size_dev = [], [], []
    for j, r in enumerate(regions):
        to, tp = _coverage_table(r, geometry.spatial_shape[j])
        c = coords[:, 1 + j]
        cand_o.append(backend.to_device(to, dev)[c])          # (n, T_j)
        cand_p.append(backend.to_device(tp, dev)[c])
        size_dev.append(backend.to_device(sizes[j], dev))
    rows = xp.arange(n, dtype=xp.int64)
    ins, ocs, ks = [], [], []
    for ts in itertools.product(*(range(int(a.shape[1])) for a in cand_o)):
        os_ = [cand_o[j][:, t] for j, t in enumerate(ts)]
        ok = os_[0] >= 0
        for o in os_[1:]:
            ok &= o >= 0
        sel = xp.nonzero(ok)[0]
        if int(sel.shape[0]) == 0:
            continue
        k = xp.zeros(sel.shape[0], dtype=xp.int64)
        cols = [coords[sel, 0]]
        for j, t in enumerate(ts):
            o = os_[j][sel].astype(xp.int64)
            k = k * M + cand_p[j][sel, t]            # row-major in the M^d box
            cols.append(o.astype(xp.int32))
        ins.append(rows[sel])
        ocs.append(xp.stack(cols, axis=1).astype(xp.int32))
        ks.append(k)
    if ins:
        in_real = xp.concatenate(ins)
        oc = xp.ascontiguousarray(xp.concatenate(ocs, axis=0))
        k_real = xp.concatenate(ks)
    else:
        in_real = xp.zeros(0, dtype=xp.int64)
        oc = xp.zeros((0, 1 + d), dtype=xp.int32)
        k_real = xp.zeros(0, dtype=xp.int64)
    shape_arr = backend.to_device(np.asarray(out_shape, dtype=np.int64), dev)
    _, _, inverse, n_out = backend.kernels(dev).build_hash(oc, shape_arr)
    out_coords = xp.empty((n_out, 1 + d), dtype=xp.int32)
    inverse = inverse.astype(xp.int64)
    out_coords[inverse] = oc
    # regions whose sites are all active: their missing window positions go to the phantom
    count = xp.bincount(inverse, minlength=n_out) if n_out else xp.zeros(0, dtype=xp.int64)
    region = xp.ones(n_out, dtype=xp.int64)
    outside = xp.zeros((n_out, K), dtype=bool)            # box positions beyond the region
    box = backend.to_device(np.stack(np.unravel_index(np.arange(K), (M,) * d), 1), dev)
    for j in range(d):
        side = size_dev[j][out_coords[:, 1 + j].astype(xp.int64)]
        region = region * side
        outside |= box[None, :, j] >= side[:, None]
    slots = (count == region)[:, None] & outside
    ph_o, ph_k = xp.nonzero(slots)
    in_idx = xp.concatenate([in_real, xp.full(ph_o.shape[0], n, dtype=xp.int64)])
    out_idx = xp.concatenate([inverse, ph_o.astype(xp.int64)])
    k_all = xp.concatenate([k_real, ph_k.astype(xp.int64)])
    order = xp.argsort(k_all * max(n_out, 1) + out_idx)      # (k, o) pairs are unique
    k_sorted = k_all[order]
    offsets = xp.searchsorted(k_sorted, xp.arange(K + 1, dtype=xp.int64)).astype(xp.int64)
    rb = Rulebook(xp.ascontiguousarray(in_idx[order].astype(xp.int32)),
                  xp.ascontiguousarray(out_idx[order].astype(xp.int32)),
                  xp.ascontiguousarray(offsets), n + 1, int(n_out), M, 0)
    geom = Geometry(out_coords, out_shape, geometry.batch_size, dev)
    return rb, geom


# -- the op ---------------------------------------------------------------------------------
def fractional_max_pooling(x: SparseTensor, regions: Any, *,
                           ground_state: bool = True) -> SparseTensor:
    """Max-pool ``x`` over the product regions ``regions`` (one (n_out_j, 2) int array of
    [start, end) ranges per dimension, e.g. from :func:`fmp_regions`): output spatial shape
    (n_out_0, ..., n_out_{d-1}). Input (n, C) -> output (n_out, C); see the module docstring
    for the ground state."""
    _check_sparse(x, _WHAT)
    regions = _check_regions(regions, x.spatial_shape)
    xp = backend.xp(x.device)
    rb, geom = fmp_rulebook(x.geometry, regions)
    g, g_out = _pool_grounds(x.ground, ground_state, None)
    n, C = x.features.shape
    ext = xp.concatenate([x.features, xp.full((1, C), -xp.inf, dtype=x.features.dtype)], axis=0)
    feats, argmax = backend.kernels(x.device).maxpool_forward(ext, g, rb)
    out = SparseTensor._make(geom, feats, g_out)

    def backward(grad):
        gx, gg = _maxpool_grads(rb, x.ground, feats, argmax, ground_state, None, grad)
        return ((xp.ascontiguousarray(gx[:n]), gg),)

    return record(out, [x], backward, "fractional_max_pooling")


def _check_seed(seed: Any) -> int:
    """A non-negative int seed, or a fresh one for None."""
    if seed is None:
        return int(np.random.SeedSequence().entropy)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be None or an int >= 0, got {seed!r}")
    return int(seed)


# -- the layer ------------------------------------------------------------------------------
@_register
class FractionalMaxPooling(Module):
    """Fractional max-pooling by ``ratio`` (1 < ratio < 2) per dimension: output size
    ``floor(N / ratio)``; see the module docstring for the regions and semantics.

    Parameters
    ----------
    ratio : float in (1, 2), e.g. ``2 ** 0.5``
    overlapping : bool
        Regions ``[a_i, a_{i+1} + 1)`` instead of the disjoint ``[a_i, a_{i+1})``.
    pseudo_random : bool
        Sequences ``ceil(alpha (i + u))`` instead of shuffled increments.
    dim : int
    seed : int or None
        Seed of the region draws (training, the kept evaluation draw, the evaluation
        generator); saved with the layer.
    eval_regions : "fixed" or "fresh"
        Evaluation mode: one kept draw per input shape, or a new draw per forward pass from a
        generator restarted whenever the layer enters evaluation mode (test-time averaging).
    """

    def __init__(self, ratio: float, *, overlapping: bool = False, pseudo_random: bool = False,
                 dim: int = 2, seed: int | None = None, eval_regions: str = "fixed") -> None:
        self.ratio = _check_ratio(ratio)
        self.overlapping = bool(overlapping)
        self.pseudo_random = bool(pseudo_random)
        self.dim = _check_dim_arg(dim)
        if eval_regions not in ("fixed", "fresh"):
            raise ValueError(f"eval_regions must be 'fixed' or 'fresh', got {eval_regions!r}")
        self.eval_regions = eval_regions
        self._entropy = _check_seed(seed)
        self.seed = self._entropy     # saved: a loaded layer keeps its kept evaluation draw
        self.rng = np.random.default_rng(np.random.SeedSequence(self._entropy, spawn_key=(0,)))
        self._training = True
        self._restart_eval()
        self._fixed: dict[tuple[int, ...], list[np.ndarray]] = {}

    # training is a property so that entering evaluation mode restarts the evaluation draws
    @property
    def training(self) -> bool:
        return self._training

    @training.setter
    def training(self, mode: bool) -> None:
        self._training = bool(mode)
        if not mode:
            self._restart_eval()

    def _restart_eval(self) -> None:
        self._eval_rng = np.random.default_rng(
            np.random.SeedSequence(self._entropy, spawn_key=(2,)))

    def _draw(self, spatial_shape: tuple[int, ...], rng: np.random.Generator) -> list:
        return [fmp_regions(n, self.ratio, rng, overlapping=self.overlapping,
                            pseudo_random=self.pseudo_random) for n in spatial_shape]

    def regions_for(self, spatial_shape: tuple[int, ...]) -> list[np.ndarray]:
        """The regions the next forward pass on an input of ``spatial_shape`` uses (drawing
        them: in training, and for ``eval_regions="fresh"``, each call advances a generator)."""
        shape = tuple(int(n) for n in spatial_shape)
        for j, n in enumerate(shape):
            if fmp_output_size(n, self.ratio) < 1:
                raise ValueError(f"{self!r}: spatial_shape[{j}] = {n} gives no output "
                                 f"(floor(N / ratio) = 0); each size must be >= 2")
        if self.training:
            return self._draw(shape, self.rng)
        if self.eval_regions == "fresh":
            return self._draw(shape, self._eval_rng)
        if shape not in self._fixed:
            rng = np.random.default_rng(np.random.SeedSequence(self._entropy,
                                                               spawn_key=(1, *shape)))
            self._fixed[shape] = self._draw(shape, rng)
        return self._fixed[shape]

    def forward(self, x: SparseTensor) -> SparseTensor:
        _check_input_dim(self, x)
        return fractional_max_pooling(x, self.regions_for(x.spatial_shape),
                                      ground_state=self.ground_state)

    def input_size(self, output_size: int) -> int:
        return fmp_input_size(output_size, self.ratio)

    def _spec_args(self) -> dict[str, Any]:
        return dict(ratio=self.ratio, overlapping=self.overlapping,
                    pseudo_random=self.pseudo_random, dim=self.dim, seed=self.seed,
                    eval_regions=self.eval_regions)


# -- the paper's FMP networks ---------------------------------------------------------------
@_register
class FMPNet(Module):
    """Graham's FMP network (arXiv 1412.6071, section 4): ``(k n)C2 - FMP(ratio)`` for
    n = 1..n_layers, then a C2 with ``k (n_layers + 1)`` filters and a linear classifier on the
    1^d output (the paper's final C1). The activation follows each convolution (applied after
    the FMP, which gives the same network since a monotone activation commutes with max).

    Input size, computed top-down from the 1^d output: the last C2 needs 2; below it each FMP
    needs the smallest N with floor(N / ratio) equal to the size above it (about
    ceil(size * ratio)) and each C2 adds 1. E.g. fmp_net(6, 32) (ratio sqrt 2) takes 38.
    """

    def __init__(self, n_layers: int, k: int, ratio: float = 2 ** 0.5, *, in_channels: int = 1,
                 num_classes: int = 10, dim: int = 2, overlapping: bool = True,
                 pseudo_random: bool = False, activation: str | float = "relu",
                 eval_regions: str = "fixed", dtype: Any = np.float32,
                 seed: int | None = 0) -> None:
        from .models import activation_slope
        self.n_layers = _check_int(n_layers, "n_layers")
        self.k = _check_int(k, "k")
        self.ratio = _check_ratio(ratio)
        self.in_channels = _check_int(in_channels, "in_channels")
        self.num_classes = _check_int(num_classes, "num_classes")
        self.dim = _check_dim_arg(dim)
        self.overlapping = bool(overlapping)
        self.pseudo_random = bool(pseudo_random)
        self.activation = activation
        self.slope = activation_slope(activation)
        self.eval_regions = eval_regions
        dtype = _check_dtype(dtype)
        self.seed = _check_seed(seed)
        rng = np.random.default_rng(self.seed)
        seeds = iter(rng.integers(0, 2**63 - 1, 2 * self.n_layers + 2))
        layers: list[Module] = []
        cin = self.in_channels
        for i in range(1, self.n_layers + 2):
            cout = self.k * i
            layers.append(Convolution(cin, cout, 2, dim=self.dim, dtype=dtype,
                                      seed=int(next(seeds))))
            if i <= self.n_layers:
                layers.append(FractionalMaxPooling(
                    self.ratio, overlapping=self.overlapping, pseudo_random=self.pseudo_random,
                    dim=self.dim, seed=int(next(seeds)), eval_regions=eval_regions))
            layers.append(ReLU() if self.slope == 0 else LeakyReLU(self.slope))
            cin = cout
        self.features = Sequential(*layers)
        self.classifier = Linear(cin, self.num_classes, dtype=dtype, seed=int(next(seeds)))

    @property
    def input_size(self) -> int:
        """Spatial input size per dimension (the top-down rule of the class docstring)."""
        return self.features.input_size(1)

    def forward(self, x: SparseTensor) -> Tensor:
        """SparseTensor (B, input_size^dim, in_channels) -> logits (B, num_classes)."""
        return classify(self, x)

    def _spec_args(self) -> dict[str, Any]:
        return dict(n_layers=self.n_layers, k=self.k, ratio=self.ratio,
                    in_channels=self.in_channels, num_classes=self.num_classes, dim=self.dim,
                    overlapping=self.overlapping, pseudo_random=self.pseudo_random,
                    activation=self.activation, eval_regions=self.eval_regions, seed=self.seed)


def fmp_net(n_layers: int, k: int, ratio: float = 2 ** 0.5, **kwargs: Any) -> FMPNet:
    """``FMPNet(n_layers, k, ratio, ...)``: e.g. ``fmp_net(6, 32)`` is the paper's MNIST net
    ``(32n)C2 - FMP(sqrt 2)`` x 6, C2, classifier."""
    return FMPNet(n_layers, k, ratio, **kwargs)
