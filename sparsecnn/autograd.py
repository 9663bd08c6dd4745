"""A minimal reverse-mode tape: nodes, parameters, ``no_grad`` and ``backward``.

Every differentiable value (:class:`~sparsecnn.tensor.Tensor`,
:class:`~sparsecnn.tensor.SparseTensor`, :class:`Parameter`) is a :class:`Variable`. An op
that produces a variable from others records a :class:`Node`: its parents and a closure that
maps the output's gradient to one gradient per parent. ``backward`` walks the graph in reverse
topological order and accumulates gradients into the leaves' ``.grad``.

A sparse tensor's gradient is a pair ``(grad_features, grad_ground)``: the ground state (the
value of every inactive site) is a quantity of its own and receives gradient too.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

_state = threading.local()
_PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def is_grad_enabled() -> bool:
    """Whether ops record the graph in this thread (False inside ``no_grad``)."""
    return getattr(_state, "enabled", True)


class no_grad:
    """Context manager (and decorator) that stops ops from recording the graph."""

    def __enter__(self) -> no_grad:
        self._prev = is_grad_enabled()
        _state.enabled = False
        return self

    def __exit__(self, *exc: object) -> None:
        _state.enabled = self._prev

    def __call__(self, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            with no_grad():
                return fn(*args, **kwargs)
        wrapper.__name__ = getattr(fn, "__name__", "wrapper")
        wrapper.__doc__ = fn.__doc__
        return wrapper


class Node:
    """How a variable was made: ``parents`` and ``backward(grad) -> grads of the parents``.

    ``versions`` holds, for each parent that is a :class:`Parameter`, the parameter's version
    when the op ran: backward refuses to run if one has been changed since."""

    __slots__ = ("parents", "backward", "name", "versions")

    def __init__(self, parents: Sequence[Variable], backward: Callable, name: str = "") -> None:
        self.parents = tuple(parents)
        self.backward = backward
        self.name = name
        self.versions = tuple((p, p._version) for p in self.parents if isinstance(p, Parameter))


def _add(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if isinstance(a, tuple):
        return tuple(_add(x, y) for x, y in zip(a, b))
    if b is None:
        return a
    return a + b


class Variable:
    """Base of everything the tape differentiates."""

    requires_grad: bool = False
    _node: Node | None = None

    def _accumulate(self, grad: Any) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _check_grad(self, grad: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def _check_leaf_grad(self, grad: Any) -> None:
        """Raise if ``grad`` (reaching this leaf in backward) does not fit it."""

    @property
    def is_leaf(self) -> bool:
        return self._node is None

    def backward(self, grad: Any = None) -> None:
        """Accumulate d(self)/d(leaf) . grad into every leaf that requires grad.

        ``grad`` has this variable's shape (for a sparse tensor: ``(grad_features,
        grad_ground)`` or just ``grad_features``); it may be omitted for a scalar.
        """
        if not self.requires_grad:
            raise RuntimeError("backward(): this value does not require grad (no parameter "
                               "or input with requires_grad=True took part in computing it)")
        backward(self, self._check_grad(grad))


def _toposort(root: Variable) -> list[Variable]:
    order: list[Variable] = []
    seen: set[int] = set()
    stack: list[tuple[Variable, bool]] = [(root, False)]
    while stack:
        v, done = stack.pop()
        if done:
            order.append(v)
            continue
        if id(v) in seen:
            continue
        seen.add(id(v))
        stack.append((v, True))
        if v._node is not None:
            for p in v._node.parents:
                if p.requires_grad and id(p) not in seen:
                    stack.append((p, False))
    return order


def _check_versions(order: list[Variable]) -> None:
    """Refuse a backward through ops whose parameters changed after the forward pass (their
    saved activations and weights would no longer belong together)."""
    for v in order:
        node = v._node
        if node is None:
            continue
        for p, version in node.versions:
            if p._version != version:
                raise RuntimeError(
                    f"backward(): a {p!r} used by {node.name or 'an op'} was modified after "
                    f"the forward pass (version {version} -> {p._version}, e.g. by "
                    f"optimizer.step() or an assignment to .data); run the forward pass "
                    f"again before calling backward()")


def backward(root: Variable, grad: Any) -> None:
    """Reverse-mode sweep from ``root`` with upstream gradient ``grad`` (already checked).

    Every check (changed parameters, gradient shapes) happens before a leaf is touched where
    it can: a refused backward leaves every ``.grad`` as it was."""
    order = _toposort(root)
    _check_versions(order)
    grads: dict[int, Any] = {id(root): grad}
    leaves: list[tuple[Variable, Any]] = []
    for v in reversed(order):
        g = grads.pop(id(v), None)
        if g is None:
            continue
        if v._node is None:
            v._check_leaf_grad(g)
            leaves.append((v, g))
            continue
        parent_grads = v._node.backward(g)
        if len(parent_grads) != len(v._node.parents):
            raise RuntimeError(f"backward of {v._node.name or 'an op'} returned "
                               f"{len(parent_grads)} gradients for "
                               f"{len(v._node.parents)} inputs")
        for p, pg in zip(v._node.parents, parent_grads, strict=True):
            if pg is not None and p.requires_grad:
                grads[id(p)] = _add(grads.get(id(p)), pg)
    for v, g in leaves:
        v._accumulate(g)


def record(out: Variable, parents: Sequence[Variable], backward_fn: Callable,
           name: str = "") -> Variable:
    """Attach a node to ``out`` if grad is enabled and some parent requires grad."""
    if is_grad_enabled() and any(p is not None and p.requires_grad for p in parents):
        live = [p for p in parents if p is not None]
        keep = [p is not None for p in parents]

        def bw(g, _fn=backward_fn, _keep=keep):
            gs = _fn(g)
            if len(gs) != len(_keep):
                raise RuntimeError(f"backward of {name or 'an op'} returned {len(gs)} "
                                   f"gradients for {len(_keep)} inputs")
            return tuple(x for x, k in zip(gs, _keep, strict=True) if k)

        out._node = Node(live, bw, name)
        out.requires_grad = True
    return out


class Parameter(Variable):
    """A trainable array: ``.data`` (writable, C-contiguous float ndarray) and ``.grad``
    (ndarray or None).

    Every assignment to ``.data`` (also ``p.data -= ...``) and every optimizer step bumps the
    parameter's version; ``backward()`` through an op that saw an older version raises, since
    the activations saved by the forward pass no longer belong to these weights. After
    writing into ``.data`` in place by other means (``p.data[...] = ...``,
    ``np.copyto(p.data, ...)``), call :meth:`mark_modified`.
    """

    requires_grad = True

    def __init__(self, data: Any) -> None:
        self._version = 0
        self.data = data
        self.grad = None

    @property
    def data(self) -> Any:
        return self._data

    @data.setter
    def data(self, value: Any) -> None:
        if getattr(value, "dtype", None) not in _PARAM_DTYPES or not hasattr(value, "flags"):
            dt = f" of dtype {value.dtype}" if hasattr(value, "dtype") else ""
            raise TypeError(f"Parameter data must be a float32 or float64 array, got "
                            f"{type(value).__name__}{dt}")
        if not value.flags.c_contiguous or not value.flags.writeable:
            # Fortran order, strided views and broadcasts (read-only) become a private copy:
            # the kernels need C order, and optimizers write in place
            from . import backend
            value = backend.xp(backend.device_of(value)).array(value, order="C")
        self._data = value
        self._version += 1

    def mark_modified(self) -> None:
        """Record that ``.data`` was changed in place (optimizers call this after a step)."""
        self._version += 1

    @property
    def version(self) -> int:
        """How many times ``.data`` was set or modified (see the class docstring)."""
        return self._version

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def _check_leaf_grad(self, grad: Any) -> None:
        if tuple(grad.shape) != self.shape:
            raise RuntimeError(f"gradient of shape {tuple(grad.shape)} for a parameter of "
                               f"shape {self.shape}")

    def _accumulate(self, grad: Any) -> None:
        self._check_leaf_grad(grad)
        grad = grad.astype(self.data.dtype, copy=False)
        self.grad = grad.copy() if self.grad is None else self.grad + grad

    def _check_grad(self, grad: Any) -> Any:
        raise RuntimeError("backward() on a Parameter itself is not meaningful")

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"
