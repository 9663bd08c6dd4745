"""Optimisers, gradient clipping and learning-rate schedules.

The optimiser works on any *parameter-like* objects, i.e. objects with a
writable ``.data`` array (NumPy or CuPy, floating point) and a ``.grad``
attribute holding an array of the same shape or ``None``.  Nothing else about
the parameters is assumed, so the module has no dependency on the rest of the
library and works unchanged for NumPy and CuPy arrays: all arithmetic is done
with the arrays' own operators and Python-float hyper-parameters, which keeps
every update in the parameter's dtype (``float32`` stays ``float32``).

Learning-rate schedules are small objects that compute the learning rate as a
pure function of the (possibly fractional) epoch, ``schedule(epoch) -> lr``,
and write it into ``optimizer.lr`` when :meth:`LRSchedule.step` is called.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from numbers import Real
from typing import Any

from . import backend

__all__ = [
    "SGD",
    "clip_grad_norm",
    "LRSchedule",
    "ExponentialLR",
    "StepLR",
    "CosineLR",
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _real(name: str, value: Any) -> float:
    """Convert a hyper-parameter to a finite Python float or raise."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def _check_params(params: Any, name: str = "params") -> list[Any]:
    """Materialise ``params`` as a list and check every item is parameter-like."""
    if hasattr(params, "data") and hasattr(params, "grad"):
        raise TypeError(
            f"{name} must be an iterable of parameters, got a single parameter; "
            "wrap it in a list"
        )
    try:
        items = list(params)
    except TypeError:
        raise TypeError(
            f"{name} must be an iterable of parameters, got {type(params).__name__}"
        ) from None
    for i, p in enumerate(items):
        if not (hasattr(p, "data") and hasattr(p, "grad")):
            raise TypeError(
                f"{name}[{i}] is not a parameter (needs .data and .grad attributes), "
                f"got {type(p).__name__}"
            )
    return items


def _array_like(ref: Any, value: Any, what: str) -> Any:
    """Return a fresh copy of ``value`` with the array type, dtype and shape of ``ref``.

    Used when restoring state that may have been saved from (or converted to)
    a different array library, e.g. NumPy buffers loaded into a CuPy run.
    """
    if tuple(value.shape) != tuple(ref.shape):
        raise ValueError(
            f"{what} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        )
    if type(value) is type(ref):
        return value.astype(ref.dtype, copy=True)
    if backend.device_of(value) == "cuda" and backend.device_of(ref) == "cpu":
        value = backend.to_host(value)  # device array -> host
    out = ref.copy()
    out[...] = value
    return out


# ---------------------------------------------------------------------------
# SGD
# ---------------------------------------------------------------------------


class SGD:
    """Stochastic gradient descent with optional (Nesterov) momentum.

    The update rule matches ``torch.optim.SGD``.  For every parameter ``p``
    whose gradient is not ``None``::

        g = grad + weight_decay * p
        if momentum != 0:
            buf = g                                       # first step
            buf = momentum * buf + (1 - dampening) * g    # later steps
            g = g + momentum * buf if nesterov else buf
        p -= lr * g

    Parameters whose ``.grad`` is ``None`` are skipped entirely (their
    momentum buffer, if any, is left untouched).  All arithmetic is done in
    the parameter's dtype; a gradient of a different floating dtype is cast
    to the parameter's dtype first.

    Parameters
    ----------
    params : iterable of parameter-like
        Objects with a writable ``.data`` floating-point array (NumPy or
        CuPy) and a ``.grad`` array of the same shape or ``None``.  Must be
        non-empty and contain no duplicates.
    lr : float
        Learning rate, ``>= 0``.  Stored in the writable attribute ``lr``
        (which the learning-rate schedules update).
    momentum : float, default 0.0
        Momentum factor in ``[0, 1)``.
    nesterov : bool, default False
        Use Nesterov momentum.  Requires ``momentum > 0`` and
        ``dampening == 0``.
    weight_decay : float, default 0.0
        L2 penalty coefficient, ``>= 0``.
    dampening : float, default 0.0
        Dampening for momentum, in ``[0, 1]`` (keyword only).

    Raises
    ------
    TypeError
        If ``params`` is not an iterable of parameter-like objects, or a
        hyper-parameter is not a real number.
    ValueError
        If ``params`` is empty or has duplicates, or a hyper-parameter is out
        of range (the message names the offending argument).

    Examples
    --------
    >>> opt = SGD(model_params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    ... # doctest: +SKIP
    >>> opt.zero_grad(); loss.backward(); opt.step()  # doctest: +SKIP
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        dampening: float = 0.0,
    ) -> None:
        items = _check_params(params)
        if not items:
            raise ValueError("params is empty: SGD needs at least one parameter")
        if len({id(p) for p in items}) != len(items):
            raise ValueError("params contains the same parameter more than once")
        for i, p in enumerate(items):
            dtype = getattr(p.data, "dtype", None)
            if dtype is None or getattr(dtype, "kind", None) != "f":
                raise TypeError(
                    f"params[{i}].data must be a floating-point array, got "
                    f"{getattr(dtype, 'name', type(p.data).__name__)}"
                )
        self.params: list[Any] = items
        self.lr = lr  # validated by the property setter
        self.momentum = _real("momentum", momentum)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        self.dampening = _real("dampening", dampening)
        if not 0.0 <= self.dampening <= 1.0:
            raise ValueError(f"dampening must be in [0, 1], got {self.dampening}")
        self.weight_decay = _real("weight_decay", weight_decay)
        if self.weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
        if nesterov and (self.momentum == 0.0 or self.dampening != 0.0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening == 0")
        self.nesterov: bool = nesterov
        self.momentum_buffers: list[Any | None] = [None] * len(items)
        self.step_count: int = 0

    # -- learning rate ------------------------------------------------------
    @property
    def lr(self) -> float:
        """float: Current learning rate (writable, must be finite and ``>= 0``)."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        value = _real("lr", value)
        if value < 0.0:
            raise ValueError(f"lr must be >= 0, got {value}")
        self._lr = value

    # -- main API ----------------------------------------------------------------
    def step(self) -> None:
        """Apply one update to every parameter that has a gradient.

        Raises
        ------
        ValueError
            If a gradient's shape differs from its parameter's shape.
        """
        lr, mom, damp, wd = self._lr, self.momentum, self.dampening, self.weight_decay
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            data = p.data
            if tuple(grad.shape) != tuple(data.shape):
                raise ValueError(
                    f"gradient of params[{i}] has shape {tuple(grad.shape)}, "
                    f"expected {tuple(data.shape)}"
                )
            g = grad if grad.dtype == data.dtype else grad.astype(data.dtype)
            if wd != 0.0:
                g = g + wd * data
            if mom != 0.0:
                buf = self.momentum_buffers[i]
                if buf is not None and backend.device_of(buf) != backend.device_of(data):
                    # the parameter moved (model.to(device)): its buffer follows it
                    buf = self.momentum_buffers[i] = backend.to_device(
                        buf, backend.device_of(data))
                if buf is None:
                    buf = g.copy()
                    self.momentum_buffers[i] = buf
                else:
                    buf *= mom
                    if damp == 0.0:
                        buf += g
                    else:
                        buf += (1.0 - damp) * g
                g = g + mom * buf if self.nesterov else buf
            data -= lr * g
            mark = getattr(p, "mark_modified", None)
            if mark is not None:      # a sparsecnn Parameter: backward through an older
                mark()                # forward now refuses to run
        self.step_count += 1

    def zero_grad(self) -> None:
        """Set the gradient of every parameter to ``None``."""
        for p in self.params:
            p.grad = None

    # -- checkpointing -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Return the optimiser state as plain numbers and array copies.

        Returns
        -------
        dict
            Keys ``lr``, ``momentum``, ``dampening``, ``nesterov``,
            ``weight_decay``, ``step_count`` (plain Python numbers / bool) and
            ``momentum_buffers``: a list aligned with ``params`` holding a copy
            of each momentum buffer (same array type and dtype as the
            parameter) or ``None`` where no buffer exists yet.
        """
        return {
            "lr": self._lr,
            "momentum": self.momentum,
            "dampening": self.dampening,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
            "step_count": self.step_count,
            "momentum_buffers": [
                None if b is None else b.copy() for b in self.momentum_buffers
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore state produced by :meth:`state_dict`.

        Hyper-parameters and momentum buffers are restored, so that the next
        :meth:`step` is bit-for-bit the step an uninterrupted run would take
        (given the same parameter values and gradients).  Buffers are copied
        (and converted to the parameters' array type and dtype if needed), so
        ``state`` is not aliased.

        Parameters
        ----------
        state : mapping
            A dictionary as returned by :meth:`state_dict`.

        Raises
        ------
        KeyError
            If a required key is missing.
        ValueError
            If the number or shapes of the buffers do not match the parameters,
            or a hyper-parameter is invalid.
        """
        required = ("lr", "momentum", "dampening", "nesterov", "weight_decay",
                    "momentum_buffers")
        missing = [k for k in required if k not in state]
        if missing:
            raise KeyError(f"SGD state_dict is missing keys: {missing}")
        bufs = list(state["momentum_buffers"])
        if len(bufs) != len(self.params):
            raise ValueError(
                f"state_dict has {len(bufs)} momentum buffers but the optimiser "
                f"has {len(self.params)} parameters"
            )
        new_bufs = [
            None if b is None
            else _array_like(p.data, b, f"momentum_buffers[{i}]")
            for i, (p, b) in enumerate(zip(self.params, bufs))
        ]
        # Validate hyper-parameters via a throw-away instance before mutating.
        SGD(self.params, state["lr"], state["momentum"], bool(state["nesterov"]),
            state["weight_decay"], dampening=state["dampening"])
        self.lr = state["lr"]
        self.momentum = float(state["momentum"])
        self.dampening = float(state["dampening"])
        self.nesterov = bool(state["nesterov"])
        self.weight_decay = float(state["weight_decay"])
        self.step_count = int(state.get("step_count", 0))
        self.momentum_buffers = new_bufs

    def __repr__(self) -> str:
        return (
            f"SGD(n_params={len(self.params)}, lr={self._lr:g}, "
            f"momentum={self.momentum:g}, nesterov={self.nesterov}, "
            f"weight_decay={self.weight_decay:g}, dampening={self.dampening:g})"
        )


# ---------------------------------------------------------------------------
# gradient clipping
# ---------------------------------------------------------------------------


def clip_grad_norm(params: Iterable[Any], max_norm: float) -> float:
    """Clip the global L2 norm of the gradients, in place.

    The total norm is ``sqrt(sum over params of sum(grad ** 2))`` (computed in
    float64 to avoid overflow).  If it exceeds ``max_norm`` every gradient is
    multiplied by ``max_norm / total_norm`` so the new global norm equals
    ``max_norm`` (up to rounding); otherwise gradients are left unchanged.
    Parameters whose ``.grad`` is ``None`` are ignored.

    Parameters
    ----------
    params : iterable of parameter-like
        Objects with a ``.grad`` attribute (array or ``None``).
    max_norm : float
        Maximum allowed global norm, finite and ``> 0``.

    Returns
    -------
    float
        The global gradient norm *before* clipping (0.0 if no gradients).

    Raises
    ------
    ValueError
        If ``max_norm`` is not finite and positive.
    FloatingPointError
        If the total norm is NaN or infinite (gradients are left unchanged).
    """
    items = _check_params(params)
    max_norm = _real("max_norm", max_norm)
    if max_norm <= 0.0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    grads = [p.grad for p in items if p.grad is not None]
    sq = 0.0
    for g in grads:
        g64 = g.astype("float64")
        sq += float((g64 * g64).sum())
    total = math.sqrt(sq)
    if not math.isfinite(total):
        raise FloatingPointError(
            f"clip_grad_norm: the total gradient norm is {total} (non-finite); "
            "the gradients contain NaN or Inf values"
        )
    if total > max_norm:
        coef = max_norm / total
        for g in grads:
            g *= coef
    return total


# ---------------------------------------------------------------------------
# learning-rate schedules
# ---------------------------------------------------------------------------


class LRSchedule:
    """Base class for learning-rate schedules.

    A schedule is a pure function of the epoch, ``schedule(epoch) -> lr``,
    relative to the base learning rate ``lr0`` (the optimiser's ``lr`` when
    the schedule is created).  :meth:`step` advances :attr:`epoch` and writes
    the new learning rate into ``optimizer.lr``.

    The epoch may be fractional, so a schedule can be updated per mini-batch
    with ``step(epoch=epoch_index + batch_index / n_batches)``; ``step()``
    without argument simply advances the epoch by 1.

    Parameters
    ----------
    optimizer : object
        Any object with a writable ``lr`` attribute (e.g. :class:`SGD`).

    Attributes
    ----------
    optimizer : object
        The optimiser whose ``lr`` is updated.
    lr0 : float
        Base learning rate.
    epoch : int or float
        Current epoch (starts at 0).
    """

    def __init__(self, optimizer: Any) -> None:
        if not hasattr(optimizer, "lr"):
            raise TypeError("optimizer must have an 'lr' attribute")
        self.optimizer = optimizer
        self.lr0: float = _real("optimizer.lr", optimizer.lr)
        if self.lr0 < 0.0:
            raise ValueError(f"optimizer.lr must be >= 0, got {self.lr0}")
        self.epoch: float = 0

    def _lr_at(self, epoch: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, epoch: float) -> float:
        """Return the learning rate at ``epoch`` (does not change any state).

        Parameters
        ----------
        epoch : float
            Epoch, ``>= 0``; may be fractional.

        Returns
        -------
        float
            The scheduled learning rate.
        """
        epoch = _real("epoch", epoch)
        if epoch < 0.0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return float(self._lr_at(epoch))

    def step(self, epoch: float | None = None) -> float:
        """Advance the schedule and set ``optimizer.lr``.

        Parameters
        ----------
        epoch : float, optional
            If given, set the current epoch to this (possibly fractional)
            value; otherwise advance the current epoch by 1.

        Returns
        -------
        float
            The new learning rate.
        """
        if epoch is None:
            new_epoch = self.epoch + 1
        else:
            _real("epoch", epoch)
            if epoch < 0:
                raise ValueError(f"epoch must be >= 0, got {epoch}")
            new_epoch = epoch
        lr = self(new_epoch)
        self.epoch = new_epoch
        self.optimizer.lr = lr
        return lr

    def get_lr(self) -> float:
        """Return the learning rate at the current :attr:`epoch`."""
        return self(self.epoch)

    def state_dict(self) -> dict[str, Any]:
        """Return ``{'epoch': ..., 'lr0': ...}`` plus the schedule's settings."""
        return {"epoch": self.epoch, "lr0": self.lr0, **self._settings()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the epoch counter, ``lr0`` and settings; set ``optimizer.lr``.

        Parameters
        ----------
        state : mapping
            A dictionary as returned by :meth:`state_dict`.
        """
        for key in ("epoch", "lr0"):
            if key not in state:
                raise KeyError(f"schedule state_dict is missing key {key!r}")
        epoch = state["epoch"]
        _real("epoch", epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        lr0 = _real("lr0", state["lr0"])
        if lr0 < 0.0:
            raise ValueError(f"lr0 must be >= 0, got {lr0}")
        self._load_settings(state)
        self.lr0 = lr0
        self.epoch = epoch
        self.optimizer.lr = self(epoch)

    def _settings(self) -> dict[str, Any]:
        return {}

    def _load_settings(self, state: Mapping[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self._settings().items())
        return f"{type(self).__name__}(lr0={self.lr0:g}, epoch={self.epoch!r}, {settings})"


class ExponentialLR(LRSchedule):
    """Exponential decay ``lr = lr0 * exp(-gamma * epoch)``.

    This is the schedule used in Graham's sparse-CNN experiments.  Note that
    it differs from ``torch.optim.lr_scheduler.ExponentialLR``, which uses
    ``lr0 * gamma ** epoch``.

    Parameters
    ----------
    optimizer : object
        Object with a writable ``lr`` attribute.
    gamma : float
        Decay rate, finite and ``>= 0``.
    """

    def __init__(self, optimizer: Any, gamma: float) -> None:
        super().__init__(optimizer)
        self.gamma = self._check_gamma(gamma)

    @staticmethod
    def _check_gamma(gamma: Any) -> float:
        gamma = _real("gamma", gamma)
        if gamma < 0.0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        return gamma

    def _lr_at(self, epoch: float) -> float:
        return self.lr0 * math.exp(-self.gamma * epoch)

    def _settings(self) -> dict[str, Any]:
        return {"gamma": self.gamma}

    def _load_settings(self, state: Mapping[str, Any]) -> None:
        if "gamma" in state:
            self.gamma = self._check_gamma(state["gamma"])


class StepLR(LRSchedule):
    """Step decay ``lr = lr0 * gamma ** floor(epoch / step_size)``.

    Parameters
    ----------
    optimizer : object
        Object with a writable ``lr`` attribute.
    step_size : int
        Number of epochs between decays, ``> 0``.
    gamma : float, default 0.1
        Multiplicative factor applied every ``step_size`` epochs, ``> 0``.
    """

    def __init__(self, optimizer: Any, step_size: int, gamma: float = 0.1) -> None:
        super().__init__(optimizer)
        self.step_size, self.gamma = self._check(step_size, gamma)

    @staticmethod
    def _check(step_size: Any, gamma: Any) -> tuple[float, float]:
        step_size = _real("step_size", step_size)
        if step_size <= 0.0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        if step_size == int(step_size):
            step_size = int(step_size)
        gamma = _real("gamma", gamma)
        if gamma <= 0.0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        return step_size, gamma

    def _lr_at(self, epoch: float) -> float:
        return self.lr0 * self.gamma ** math.floor(epoch / self.step_size)

    def _settings(self) -> dict[str, Any]:
        return {"step_size": self.step_size, "gamma": self.gamma}

    def _load_settings(self, state: Mapping[str, Any]) -> None:
        self.step_size, self.gamma = self._check(
            state.get("step_size", self.step_size), state.get("gamma", self.gamma)
        )


class CosineLR(LRSchedule):
    """Cosine annealing from ``lr0`` to ``min_lr`` over ``total_epochs``.

    ``lr = min_lr + (lr0 - min_lr) * (1 + cos(pi * e / total_epochs)) / 2``
    with ``e = min(epoch, total_epochs)``, so the rate stays at ``min_lr``
    after ``total_epochs``.

    Parameters
    ----------
    optimizer : object
        Object with a writable ``lr`` attribute.
    total_epochs : float
        Length of the annealing, ``> 0``.
    min_lr : float, default 0.0
        Final learning rate, ``>= 0``.
    """

    def __init__(self, optimizer: Any, total_epochs: float, min_lr: float = 0.0) -> None:
        super().__init__(optimizer)
        self.total_epochs, self.min_lr = self._check(total_epochs, min_lr)

    @staticmethod
    def _check(total_epochs: Any, min_lr: Any) -> tuple[float, float]:
        total_epochs = _real("total_epochs", total_epochs)
        if total_epochs <= 0.0:
            raise ValueError(f"total_epochs must be > 0, got {total_epochs}")
        min_lr = _real("min_lr", min_lr)
        if min_lr < 0.0:
            raise ValueError(f"min_lr must be >= 0, got {min_lr}")
        return total_epochs, min_lr

    def _lr_at(self, epoch: float) -> float:
        e = min(epoch, self.total_epochs)
        cos = (1.0 + math.cos(math.pi * e / self.total_epochs)) / 2.0
        return self.min_lr + (self.lr0 - self.min_lr) * cos

    def _settings(self) -> dict[str, Any]:
        return {"total_epochs": self.total_epochs, "min_lr": self.min_lr}

    def _load_settings(self, state: Mapping[str, Any]) -> None:
        self.total_epochs, self.min_lr = self._check(
            state.get("total_epochs", self.total_epochs),
            state.get("min_lr", self.min_lr),
        )
