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
    """How a variable was made: ``parents`` and ``backward(grad) -> grads of the parents``."""

    __slots__ = ("parents", "backward", "name")

    def __init__(self, parents: Sequence[Variable], backward: Callable, name: str = "") -> None:
        self.parents = tuple(parents)
        self.backward = backward
        self.name = name


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


def backward(root: Variable, grad: Any) -> None:
    """Reverse-mode sweep from ``root`` with upstream gradient ``grad`` (already checked)."""
    grads: dict[int, Any] = {id(root): grad}
    for v in reversed(_toposort(root)):
        g = grads.pop(id(v), None)
        if g is None:
            continue
        if v._node is None:
            v._accumulate(g)
            continue
        parent_grads = v._node.backward(g)
        for p, pg in zip(v._node.parents, parent_grads):
            if pg is not None and p.requires_grad:
                grads[id(p)] = _add(grads.get(id(p)), pg)


def record(out: Variable, parents: Sequence[Variable], backward_fn: Callable,
           name: str = "") -> Variable:
    """Attach a node to ``out`` if grad is enabled and some parent requires grad."""
    if is_grad_enabled() and any(p is not None and p.requires_grad for p in parents):
        live = [p for p in parents if p is not None]
        keep = [p is not None for p in parents]

        def bw(g, _fn=backward_fn, _keep=keep):
            gs = _fn(g)
            return tuple(x for x, k in zip(gs, _keep) if k)

        out._node = Node(live, bw, name)
        out.requires_grad = True
    return out


class Parameter(Variable):
    """A trainable array: ``.data`` (writable ndarray) and ``.grad`` (ndarray or None)."""

    requires_grad = True

    def __init__(self, data: Any) -> None:
        if not hasattr(data, "dtype") or data.dtype.kind != "f":
            raise TypeError(f"Parameter data must be a float array, got {type(data).__name__}"
                            f"{' of dtype ' + str(data.dtype) if hasattr(data, 'dtype') else ''}")
        self.data = data
        self.grad = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def _accumulate(self, grad: Any) -> None:
        if grad.shape != self.data.shape:
            raise RuntimeError(f"gradient of shape {grad.shape} for a parameter of shape "
                               f"{self.data.shape}")
        grad = grad.astype(self.data.dtype, copy=False)
        self.grad = grad.copy() if self.grad is None else self.grad + grad

    def _check_grad(self, grad: Any) -> Any:
        raise RuntimeError("backward() on a Parameter itself is not meaningful")

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"
