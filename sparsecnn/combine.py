"""Combining sparse tensors on one grid: ``add`` (residual sums) and ``concat`` (channels of
Inception-style branches), and their modules ``Residual`` and ``Concat``.

The result's active set is the **union** of the inputs' sites, in a fixed order: the sites
of the first tensor in its row order, then the sites of the second that the first lacks (in
the second's row order), then those of the third that neither has, and so on. At a union
site a tensor contributes its feature there, or its ground where it is inactive, exactly as
the dense network sees it: ``add(a, b).to_dense() == a.to_dense() + b.to_dense()`` and
``concat([a, b]).to_dense()`` is the dense concatenation on the channel axis. The ground of
the result is ``a.ground + b.ground`` (``add``) or the concatenated grounds (``concat``).

With ``ground_state=False`` (the other libraries' semantics) a tensor's missing sites count
as 0 and the result's ground is 0; the inputs' grounds get no gradient.

Geometry: when all inputs share one geometry object (a ResNet block of submanifold
convolutions), the result has that geometry and no hashing happens. When the second's sites
are a subset of the first's, the result has the first's geometry. Otherwise the union is
hashed once, with the coordinate hash of the device (``build_hash`` over the concatenated
coordinates numbers the sites by first occurrence, which is the order above), and the new
geometry is cached on the first input's geometry, keyed by the others, so a network applied
twice to the same input reuses it (and every rulebook built on it). Forward and backward are
gathers and scatters with integer rows: each union row receives from at most one row of each
input, so the results are deterministic on every device.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from . import backend
from .autograd import is_grad_enabled, record
from .functional import colsum
from .geometry import Geometry
from .nn import Module, _register
from .tensor import SparseTensor

__all__ = ["add", "concat", "Residual", "Concat"]


# -- validation -----------------------------------------------------------------------------
def _check_inputs(tensors: Sequence[Any], names: Sequence[str], what: str) -> None:
    """Every input is a SparseTensor on the first one's grid, device and dtype."""
    for t, name in zip(tensors, names, strict=True):
        if not isinstance(t, SparseTensor):
            raise TypeError(f"{what}: {name} must be a SparseTensor, got {type(t).__name__}")
    a, first = tensors[0], names[0]
    for t, name in zip(tensors[1:], names[1:], strict=True):
        if t.spatial_shape != a.spatial_shape:
            raise ValueError(f"{what}: {name} has spatial_shape {t.spatial_shape} but {first} "
                             f"has {a.spatial_shape}; tensors must be on the same grid")
        if t.batch_size != a.batch_size:
            raise ValueError(f"{what}: {name} has batch_size {t.batch_size} but {first} has "
                             f"{a.batch_size}; tensors must be on the same grid")
        if t.device != a.device:
            raise ValueError(f"{what}: {name} is on {t.device!r} but {first} is on "
                             f"{a.device!r}; move one with .to(device)")
        if t.dtype != a.dtype:
            raise TypeError(f"{what}: {name} is {t.dtype} but {first} is {a.dtype}; cast one "
                            f"with .astype")


# -- the union of site sets -------------------------------------------------------------------
class _Union:
    """The union of several site sets on one grid: ``geometry`` (None where it is the first
    input's) and, for each input, ``rows`` (the union row of each of its sites, int32
    (n_i,)) and ``missing`` (the union rows it lacks, (n_union - n_i,)); ``identity[i]`` is
    True where input i's rows are the union's first n_i rows in order (``rows`` is
    arange(n_i)), so its features need no gather."""

    def __init__(self, geometry: Geometry | None, rows: list, missing: list,
                 identity: list) -> None:
        self.geometry = geometry
        self.rows = rows
        self.missing = missing
        self.identity = identity


def _union(geoms: Sequence[Geometry]) -> tuple[Geometry, _Union]:
    """The union geometry of ``geoms`` (sites of the first, then the others' new sites; see
    the module docstring) and its rows. Built once and cached on the first geometry keyed by
    the others (held by weak references, so the cache makes no reference cycle); tensors
    that all share one geometry need no cache."""
    first = geoms[0]
    if all(g is first for g in geoms):
        return first, _same_union(first, len(geoms))
    key = ("union",) + tuple(id(g) for g in geoms[1:])
    hit = first._cache.get(key)
    if hit is None or any(r() is not g for r, g in zip(hit[0], geoms[1:], strict=True)):
        hit = first._cache[key] = (tuple(weakref.ref(g) for g in geoms[1:]),
                                   _build_union(geoms))
    u = hit[1]
    return (first if u.geometry is None else u.geometry), u


def _same_union(geometry: Geometry, n_inputs: int) -> _Union:
    xp = backend.xp(geometry.device)
    rows = xp.arange(geometry.n_active, dtype=xp.int32)
    empty = xp.zeros(0, dtype=xp.int32)
    return _Union(None, [rows] * n_inputs, [empty] * n_inputs, [True] * n_inputs)


def _build_union(geoms: Sequence[Geometry]) -> _Union:
    dev = geoms[0].device
    xp = backend.xp(dev)
    coords = xp.concatenate([g.coords for g in geoms], axis=0)
    shape_arr = geoms[0].shape_array()
    keys, vals, inverse, n_union = backend.kernels(dev).build_hash(coords, shape_arr)
    # first-occurrence numbering: the first input's (unique) sites are rows 0..n_0-1, each
    # later input's new sites follow in its row order
    rows, missing, identity, start = [], [], [], 0
    for i, g in enumerate(geoms):
        r = inverse[start:start + g.n_active]
        start += g.n_active
        rows.append(r)
        covered = xp.zeros(n_union, dtype=bool)
        covered[r] = True
        missing.append(xp.nonzero(~covered)[0].astype(xp.int32))
        identity.append(i == 0)
    if n_union == geoms[0].n_active:     # nothing new: the first input's geometry
        return _Union(None, rows, missing, identity)
    ucoords = xp.empty((n_union, coords.shape[1]), dtype=coords.dtype)
    ucoords[inverse] = coords            # repeated rows write equal values: order-free
    geometry = Geometry(ucoords, geoms[0].spatial_shape, geoms[0].batch_size, dev,
                        (keys, vals), shape_arr)
    return _Union(geometry, rows, missing, identity)


def _spread(x: SparseTensor, u: _Union, i: int, ground: Any, n_union: int) -> Any:
    """Input i's values on the union's n_union rows (n_union, C): its features at its
    sites, ``ground`` at the others."""
    if u.identity[i] and x.n_active == n_union:
        return x.features
    xp = backend.xp(x.device)
    out = xp.empty((n_union, x.channels), dtype=x.dtype)
    out[u.missing[i]] = ground
    out[u.rows[i]] = x.features
    return out


def _input_grads(xs: Sequence[SparseTensor], u: _Union, gfs: Sequence[Any],
                 ggs: Sequence[Any], ground_state: bool) -> tuple:
    """Gradients of the inputs from those of their spread values ``gfs[i]`` (n_union, C_i)
    and of their share of the output ground ``ggs[i]`` (C_i,)."""
    out = []
    for i, (x, gf, gg) in enumerate(zip(xs, gfs, ggs, strict=True)):
        if not x.requires_grad:
            out.append(None)
            continue
        xp = backend.xp(x.device)
        if u.identity[i] and x.n_active == gf.shape[0]:
            g_feat = xp.ascontiguousarray(gf)
        else:
            g_feat = xp.ascontiguousarray(gf[u.rows[i]])
        if ground_state:        # the ground fills the missing rows and the output's ground
            g_ground = gg + colsum(xp.ascontiguousarray(gf[u.missing[i]]))
        else:
            g_ground = xp.zeros_like(x.ground)
        out.append((g_feat, g_ground))
    return tuple(out)


# -- the ops ----------------------------------------------------------------------------------
def add(a: SparseTensor, b: SparseTensor, *, ground_state: bool = True) -> SparseTensor:
    """Sum of two sparse tensors on one grid (a residual connection).

    Parameters
    ----------
    a, b : SparseTensor with the same channels, spatial_shape, batch_size, device and dtype;
        any active sets.
    ground_state : bool
        True: a tensor's inactive sites hold its ground. False: they count as 0.

    Returns
    -------
    SparseTensor (n_union, C) on the union of the sites (a's sites in a's order, then b's
    new ones in b's order); value ``a + b`` at every site, ground ``a.ground + b.ground``
    (0 with ``ground_state=False``). It has ``a``'s geometry when both share one (or when
    b's sites are among a's).
    """
    what = "add"
    _check_inputs([a, b], ["a", "b"], what)
    if a.channels != b.channels:
        raise ValueError(f"{what}: a has {a.channels} channels but b has {b.channels}; use "
                         f"concat to join channels")
    xp = backend.xp(a.device)
    if ground_state:
        ga, gb = a.ground, b.ground
        ground = ga + gb
    else:
        ga = gb = ground = xp.zeros_like(a.ground)
    geometry, u = _union([a.geometry, b.geometry])
    n = geometry.n_active
    feats = _spread(a, u, 0, ga, n) + _spread(b, u, 1, gb, n)
    out = SparseTensor._make(geometry, feats, ground)
    if not is_grad_enabled():
        return out

    def backward(grad):
        gf, gg = grad
        return _input_grads([a, b], u, [gf, gf], [gg, gg], ground_state)

    return record(out, [a, b], backward, "add")


def concat(tensors: Sequence[SparseTensor], *, ground_state: bool = True) -> SparseTensor:
    """Channels of sparse tensors on one grid joined (Inception-style branches).

    Parameters
    ----------
    tensors : non-empty sequence of SparseTensor with the same spatial_shape, batch_size,
        device and dtype; any channels and active sets.
    ground_state : bool
        True: a tensor's inactive sites hold its ground. False: they count as 0.

    Returns
    -------
    SparseTensor (n_union, sum of C_i) on the union of the sites (the first tensor's sites,
    then each later tensor's new ones, in row order); channels in the order of ``tensors``;
    each tensor's missing sites filled with its ground; ground the concatenated grounds (0
    with ``ground_state=False``).
    """
    what = "concat"
    if isinstance(tensors, SparseTensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"{what}: tensors must be a list or tuple of SparseTensors, got "
                        f"{type(tensors).__name__}")
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{what}: tensors is empty; give at least one SparseTensor")
    _check_inputs(tensors, [f"tensors[{i}]" for i in range(len(tensors))], what)
    xp = backend.xp(tensors[0].device)
    grounds = [t.ground if ground_state else xp.zeros_like(t.ground) for t in tensors]
    geometry, u = _union([t.geometry for t in tensors])
    n = geometry.n_active
    parts = [_spread(t, u, i, g, n) for i, (t, g) in enumerate(zip(tensors, grounds,
                                                                      strict=True))]
    feats = xp.ascontiguousarray(xp.concatenate(parts, axis=1))
    out = SparseTensor._make(geometry, feats, xp.ascontiguousarray(xp.concatenate(grounds)))
    if not is_grad_enabled():
        return out
    bounds = [0]
    for t in tensors:
        bounds.append(bounds[-1] + t.channels)

    def backward(grad):
        gf, gg = grad
        cols = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        return _input_grads(tensors, u, [gf[:, c] for c in cols], [gg[c] for c in cols],
                            ground_state)

    return record(out, tensors, backward, "concat")


# -- modules ----------------------------------------------------------------------------------
def _check_module(m: Any, name: str) -> Module:
    if not isinstance(m, Module):
        raise TypeError(f"{name} must be a sparsecnn Module, got {type(m).__name__}")
    return m


def _same_input_size(sizes: list[int], names: list[str], what: str) -> int:
    if len(set(sizes)) > 1:
        got = ", ".join(f"{n}: {s}" for n, s in zip(names, sizes, strict=True))
        raise ValueError(f"{what}: the branches need different input sizes ({got}); their "
                         f"outputs are not on one grid")
    return sizes[0]


@_register
class Residual(Module):
    """Residual connection: ``add(shortcut(x), block(x))``, the shortcut being the identity
    by default (``x + block(x)``).

    ``block`` and ``shortcut`` are modules whose outputs lie on one grid (a strided block
    needs a strided shortcut, e.g. a ``Convolution`` of the same size and stride). The sum's
    sites are the union, the shortcut's first (see :func:`add`); with a block of submanifold
    convolutions the output keeps the input's geometry. The layer's ground-state mode
    (``set_ground_state``) is the sum's.
    """

    def __init__(self, block: Module, shortcut: Module | None = None) -> None:
        self.block = _check_module(block, "block")
        self.shortcut = None if shortcut is None else _check_module(shortcut, "shortcut")

    def forward(self, x: SparseTensor) -> SparseTensor:
        s = x if self.shortcut is None else self.shortcut(x)
        return add(s, self.block(x), ground_state=self.ground_state)

    def input_size(self, output_size: int) -> int:
        sizes = [self.block.input_size(output_size)]
        if self.shortcut is not None:
            sizes.append(self.shortcut.input_size(output_size))
        return _same_input_size(sizes, ["block", "shortcut"][:len(sizes)], "Residual")

    def spec(self) -> dict[str, Any]:
        out = {"type": "Residual", "block": self.block.spec()}
        if self.shortcut is not None:
            out["shortcut"] = self.shortcut.spec()
        return out

    @classmethod
    def _from_spec(cls, args: dict[str, Any], build) -> Residual:
        if "block" not in args or set(args) - {"block", "shortcut"}:
            raise ValueError(f"bad Residual spec arguments {sorted(args)}")
        shortcut = args.get("shortcut")
        return cls(build(args["block"]), None if shortcut is None else build(shortcut))

    def __repr__(self) -> str:
        inner = f"  block: {self.block!r}".replace("\n", "\n  ")
        if self.shortcut is not None:
            inner += "\n" + f"  shortcut: {self.shortcut!r}".replace("\n", "\n  ")
        return "Residual(\n" + inner + "\n)"


@_register
class Concat(Module):
    """Inception-style branches: ``concat([branch(x) for branch in branches])``.

    The branches' outputs must lie on one grid; channels are joined in branch order and
    the sites are the union (the first branch's first; see :func:`concat`). An empty
    ``Sequential()`` is an identity branch (``Concat(Sequential(), block)`` gives DenseNet's
    ``[x, block(x)]``). The layer's ground-state mode is the concatenation's.
    """

    def __init__(self, *branches: Module) -> None:
        if not branches:
            raise ValueError("Concat needs at least one branch")
        self.branches = [_check_module(m, f"branches[{i}]") for i, m in enumerate(branches)]

    def forward(self, x: SparseTensor) -> SparseTensor:
        return concat([m(x) for m in self.branches], ground_state=self.ground_state)

    def input_size(self, output_size: int) -> int:
        return _same_input_size([m.input_size(output_size) for m in self.branches],
                                [f"branches[{i}]" for i in range(len(self.branches))],
                                "Concat")

    def spec(self) -> dict[str, Any]:
        return {"type": "Concat", "branches": [m.spec() for m in self.branches]}

    @classmethod
    def _from_spec(cls, args: dict[str, Any], build) -> Concat:
        branches = args.get("branches")
        if not isinstance(branches, list) or not branches or set(args) - {"branches"}:
            raise ValueError(f"bad Concat spec arguments {sorted(args)}")
        return cls(*(build(s) for s in branches))

    def __repr__(self) -> str:
        lines = [f"  ({i}): {m!r}".replace("\n", "\n  ") for i, m in enumerate(self.branches)]
        return "Concat(\n" + "\n".join(lines) + "\n)"
