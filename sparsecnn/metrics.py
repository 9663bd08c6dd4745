"""Classification metrics and running averages.

All functions work on NumPy arrays; CuPy (or any array exposing ``.get()``
to copy to the host) is accepted and converted to NumPy first.

Tie handling
------------
A sample counts as correct at ``k`` when *fewer than k other classes* have a
score greater than **or equal to** the score of the true label, i.e. the
label's score must be strictly greater than that of all but fewer than ``k``
other classes.  Ties therefore count against the prediction (a pessimistic
rule): constant logits give a top-1 accuracy of 0 whenever there are at least
two classes, instead of a result that depends on sort order.  When
``k >= n_classes`` every sample is trivially correct.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from numbers import Integral, Real
from typing import Any

import numpy as np

from . import backend

__all__ = ["accuracy", "topk_accuracy", "site_accuracy", "RunningMean", "MetricTracker"]


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a NumPy array, copying device arrays to the host."""
    if backend.device_of(x) == "cuda":
        x = backend.to_host(x)
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} could not be converted to a NumPy array: {exc}") from exc


def _check_k(k: Any, name: str) -> int:
    if isinstance(k, bool) or not isinstance(k, Integral):
        raise TypeError(f"{name} must be a positive integer, got {k!r}")
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")
    return int(k)


def _rank_of_label(logits: Any, labels: Any) -> np.ndarray:
    """Validate inputs and return, per sample, the number of *other* classes
    whose score is ``>=`` the true label's score."""
    logits = _to_numpy(logits, "logits")
    labels = _to_numpy(labels, "labels")
    if logits.ndim != 2:
        raise ValueError(
            f"logits must be 2-D (n_samples, n_classes), got shape {logits.shape}"
        )
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (n_samples,), got shape {labels.shape}")
    n, c = logits.shape
    if labels.shape[0] != n:
        raise ValueError(
            f"shape mismatch: logits has {n} samples (shape {logits.shape}) but "
            f"labels has {labels.shape[0]} (shape {labels.shape})"
        )
    if n == 0:
        raise ValueError("accuracy is undefined for an empty batch (0 samples)")
    if c == 0:
        raise ValueError("logits has 0 classes")
    if not (np.issubdtype(logits.dtype, np.floating)
            or np.issubdtype(logits.dtype, np.integer)):
        raise TypeError(f"logits must be a real numeric array, got dtype {logits.dtype}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(
            f"labels must lie in [0, {c}) for {c} classes, got values in "
            f"[{labels.min()}, {labels.max()}]"
        )
    if np.issubdtype(logits.dtype, np.floating) and np.isnan(logits).any():
        raise ValueError("logits contain NaN")
    true_score = logits[np.arange(n), labels]
    # count includes the label itself (score >= itself), hence the -1
    return np.count_nonzero(logits >= true_score[:, None], axis=1) - 1


def topk_accuracy(
    logits: Any, labels: Any, ks: Iterable[int] = (1, 5)
) -> dict[int, float]:
    """Top-k accuracies for several ``k`` at once.

    Parameters
    ----------
    logits : array_like, shape (n_samples, n_classes)
        Class scores (any monotone transform of them, e.g. probabilities,
        gives the same result).  Must not contain NaN.
    labels : array_like of int, shape (n_samples,)
        True class indices in ``[0, n_classes)``.
    ks : iterable of int, default (1, 5)
        Values of ``k`` (each ``>= 1``).  ``k`` larger than the number of
        classes is allowed and yields 1.0.

    Returns
    -------
    dict of int to float
        ``{k: fraction of samples whose label is in the top k}``.  Ties count
        against the prediction (see the module docstring).

    Raises
    ------
    ValueError
        On shape mismatch, wrong dimensionality, empty input, labels out of
        range, NaN logits, or empty / non-positive ``ks``.
    TypeError
        On non-integer labels or ``k``.
    """
    ks = [_check_k(k, "k") for k in ks]
    if not ks:
        raise ValueError("ks must contain at least one value")
    n_above = _rank_of_label(logits, labels)
    n = n_above.shape[0]
    return {k: float(np.count_nonzero(n_above < k)) / n for k in ks}


def accuracy(logits: Any, labels: Any, topk: int = 1) -> float:
    """Fraction of samples whose true label is among the ``topk`` best scores.

    Parameters
    ----------
    logits : array_like, shape (n_samples, n_classes)
        Class scores; must not contain NaN.
    labels : array_like of int, shape (n_samples,)
        True class indices in ``[0, n_classes)``.
    topk : int, default 1
        ``k`` of the top-k criterion (``>= 1``).

    Returns
    -------
    float
        Accuracy in ``[0, 1]``.  Ties count against the prediction: a label
        is in the top k only if fewer than k other classes score ``>=`` it.

    Raises
    ------
    ValueError
        On shape mismatch, empty input, labels out of range or NaN logits.
    TypeError
        On non-integer labels or ``topk``.

    Examples
    --------
    >>> accuracy([[0.1, 0.9], [0.8, 0.2]], [1, 1])
    0.5
    """
    k = _check_k(topk, "topk")
    return topk_accuracy(logits, labels, (k,))[k]


def site_accuracy(logits: Any, labels: Any, *, topk: int = 1,
                  ignore_index: int | None = None) -> float:
    """Per-site accuracy: the fraction of the labelled active sites whose label is among
    the ``topk`` best scores (ties count against the prediction, as in :func:`accuracy`).

    Parameters
    ----------
    logits : SparseTensor (n_active, n_classes), or array_like of that shape
        Per-site scores; row i is the site ``logits.coords[i]``.
    labels : array_like of int, shape (n_active,)
        The class of each active site in the logits' row order, or ``ignore_index``.
    topk : int, default 1
    ignore_index : int or None
        A label value for sites that are not scored.

    Raises
    ------
    ValueError
        On shape mismatch, labels out of range, NaN logits, or no labelled site.
    TypeError
        On non-integer labels.
    """
    from .tensor import SparseTensor  # tensor imports nothing of this module

    k = _check_k(topk, "topk")
    scores = logits.features if isinstance(logits, SparseTensor) else logits
    scores = _to_numpy(scores, "logits")
    lab = _to_numpy(labels, "labels")
    if ignore_index is not None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, Integral):
            raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
        if lab.ndim == 1 and scores.ndim == 2 and lab.shape[0] == scores.shape[0]:
            keep = lab != ignore_index
            if not keep.any():
                raise ValueError(f"no labelled site: all {lab.shape[0]} labels are "
                                 f"ignore_index={ignore_index}")
            scores, lab = scores[keep], lab[keep]
    if scores.ndim == 2 and scores.shape[0] == 0 and lab.shape == (0,):
        raise ValueError("site accuracy is undefined without active sites (0 sites)")
    return topk_accuracy(scores, lab, (k,))[k]


def _as_float(value: Any, name: str) -> float:
    """Convert a Python/NumPy/CuPy scalar (or 0-d / size-1 array) to float."""
    if backend.device_of(value) == "cuda":
        value = backend.to_host(value)
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"{name} must be a scalar, got an array of shape {value.shape}")
        value = value.reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, (Real, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


class RunningMean:
    """Weighted running mean, e.g. of a per-batch loss weighted by batch size.

    Attributes
    ----------
    total : float
        Sum of ``value * n`` over all updates.
    count : float
        Sum of the weights ``n``.

    Examples
    --------
    >>> m = RunningMean()
    >>> m.update(1.0, n=3); m.update(3.0, n=1)
    >>> m.mean
    1.5
    """

    def __init__(self) -> None:
        self.total: float = 0.0
        self.count: float = 0.0

    def update(self, value: Any, n: float = 1) -> None:
        """Add ``value`` (the mean over a batch) with weight ``n``.

        Parameters
        ----------
        value : float or 0-d array
            Batch mean of the quantity (NumPy/CuPy scalars are accepted).
        n : int or float, default 1
            Weight, typically the batch size; must be ``>= 0``.
        """
        value = _as_float(value, "value")
        n = _as_float(n, "n")
        if n < 0 or not math.isfinite(n):
            raise ValueError(f"n must be finite and >= 0, got {n}")
        if n == 0:
            return
        self.total += value * n
        self.count += n

    @property
    def mean(self) -> float:
        """float: Weighted mean so far; ``nan`` if nothing has been added."""
        return self.total / self.count if self.count > 0 else math.nan

    def reset(self) -> None:
        """Forget all values."""
        self.total = 0.0
        self.count = 0.0

    def __float__(self) -> float:
        return self.mean

    def __repr__(self) -> str:
        return f"RunningMean(mean={self.mean:.6g}, count={self.count:g})"


class MetricTracker:
    """A named collection of :class:`RunningMean` meters.

    Parameters
    ----------
    names : iterable of str, optional
        Metrics to create up front; others are created on first update.

    Examples
    --------
    >>> t = MetricTracker()
    >>> t.update(n=2, loss=1.0, acc=0.5)
    >>> t.update(n=2, loss=3.0, acc=1.0)
    >>> t.means()
    {'loss': 2.0, 'acc': 0.75}
    >>> t["loss"]
    2.0
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.meters: dict[str, RunningMean] = {}
        for name in names:
            self._meter(name)

    def _meter(self, name: str) -> RunningMean:
        if not isinstance(name, str):
            raise TypeError(f"metric names must be str, got {type(name).__name__}")
        if name not in self.meters:
            self.meters[name] = RunningMean()
        return self.meters[name]

    def update(
        self, values: Mapping[str, Any] | None = None, *, n: float = 1, **kwargs: Any
    ) -> None:
        """Add one batch worth of metric values, all with weight ``n``.

        Parameters
        ----------
        values : mapping of str to float, optional
            Metric values (use this form for a metric literally called ``n``).
        n : int or float, default 1
            Weight (batch size), keyword only.
        **kwargs
            More metric values, e.g. ``loss=0.3, acc=0.9``.
        """
        items = dict(values or {})
        items.update(kwargs)
        # convert everything first so a bad value leaves the tracker unchanged
        for k in items:
            if not isinstance(k, str):
                raise TypeError(f"metric names must be str, got {type(k).__name__}")
        converted = {k: _as_float(v, k) for k, v in items.items()}
        n_f = _as_float(n, "n")
        if n_f < 0 or not math.isfinite(n_f):
            raise ValueError(f"n must be finite and >= 0, got {n_f}")
        for k, v in converted.items():
            self._meter(k).update(v, n_f)

    def __getitem__(self, name: str) -> float:
        """Return the running mean of metric ``name``."""
        return self.meters[name].mean

    def __contains__(self, name: object) -> bool:
        return name in self.meters

    def means(self) -> dict[str, float]:
        """Return ``{name: running mean}`` for all metrics, in creation order."""
        return {k: m.mean for k, m in self.meters.items()}

    def reset(self) -> None:
        """Reset every meter (the metric names are kept)."""
        for m in self.meters.values():
            m.reset()

    def summary(self, fmt: str = ".4f") -> str:
        """Return e.g. ``'loss=0.1234 acc=0.9500'``."""
        return " ".join(f"{k}={m.mean:{fmt}}" for k, m in self.meters.items())

    def __repr__(self) -> str:
        return f"MetricTracker({self.summary()})"
