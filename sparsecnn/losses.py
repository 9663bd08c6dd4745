"""Losses over the active sites of a sparse tensor (per-site outputs: segmentation).

:func:`site_cross_entropy` reads per-site logits, a SparseTensor ``(n_active, classes)``,
against one integer label per active site, in the tensor's row order. Only the active sites
are scored: the ground (the value of the inactive sites) is no prediction and gets no
gradient. Deterministic on both devices: the per-site losses are summed by the backend's
``column_sums`` kernel (fixed blocks, then the partials in block order).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import backend
from .autograd import record
from .functional import colsum, log_softmax
from .tensor import SparseTensor, Tensor

__all__ = ["site_cross_entropy", "site_labels"]


def site_labels(labels: Any, n_active: int, n_classes: int, ignore_index: int | None,
                what: str) -> np.ndarray:
    """``labels`` as a host int64 array of shape (n_active,), checked: integers in
    [0, n_classes), or ``ignore_index``."""
    lab = np.asarray(backend.to_host(labels) if backend.device_of(labels) == "cuda"
                     else labels)
    if lab.dtype.kind not in "iu":
        raise TypeError(f"{what}: labels must be integers, got dtype {lab.dtype}")
    if lab.shape != (n_active,):
        raise ValueError(f"{what}: labels must have shape (n_active,) = ({n_active},), one per "
                         f"active site in the logits' row order, got {lab.shape}")
    if ignore_index is not None and (isinstance(ignore_index, bool)
                                     or not isinstance(ignore_index, (int, np.integer))):
        raise TypeError(f"{what}: ignore_index must be an int or None, got {ignore_index!r}")
    lab = lab.astype(np.int64)
    keep = lab != ignore_index if ignore_index is not None else np.ones(n_active, bool)
    bad = keep & ((lab < 0) | (lab >= n_classes))
    if bad.any():
        v = lab[bad]
        extra = "" if ignore_index is None else f" (or ignore_index={ignore_index})"
        raise ValueError(f"{what}: labels must be in [0, {n_classes}){extra}, got values in "
                         f"[{v.min()}, {v.max()}]")
    return lab


def site_cross_entropy(logits: SparseTensor, labels: Any, *, ignore_index: int | None = None,
                       label_smoothing: float = 0.0) -> Tensor:
    """Mean softmax cross-entropy over the labelled active sites.

    Parameters
    ----------
    logits : SparseTensor with C = n_classes channels (n_active, n_classes)
        Per-site scores, e.g. a U-Net's output; row i is the site ``logits.coords[i]``.
    labels : int array of shape (n_active,), host or device
        The class of each active site, in the logits' row order; values in [0, n_classes),
        or ``ignore_index`` for a site that is not scored.
    ignore_index : int or None
        A label value that marks unscored sites (they get no gradient).
    label_smoothing : float in [0, 1)
        Targets ``(1 - eps) one-hot + eps / n_classes``.

    Returns
    -------
    Tensor, a scalar: the sum of the per-site losses over the labelled sites divided by their
    number. Its gradient goes to ``logits.features`` (``(softmax - target) / n_labelled`` at
    labelled sites, 0 at ignored ones); the ground gets 0.

    Raises
    ------
    ValueError
        On a labels shape that is not (n_active,), labels out of range, a bad
        label_smoothing, or no labelled site (the mean is undefined).
    TypeError
        On logits that are not a SparseTensor, or non-integer labels.
    """
    what = "site_cross_entropy"
    if not isinstance(logits, SparseTensor):
        raise TypeError(f"{what}: logits must be a SparseTensor (per-site logits), got "
                        f"{type(logits).__name__}; for (B, n_classes) logits use cross_entropy")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{what}: label_smoothing must be in [0, 1), got {label_smoothing!r}")
    n, C = logits.features.shape
    lab = site_labels(labels, n, C, ignore_index, what)
    keep = lab != ignore_index if ignore_index is not None else np.ones(n, bool)
    n_lab = int(keep.sum())
    if n_lab == 0:
        raise ValueError(f"{what}: no labelled active site ({n} active, all ignored): the "
                         f"mean is undefined")
    dev = logits.device
    xp = backend.xp(dev)
    t = logits.dtype.type
    rows = backend.to_device(np.nonzero(keep)[0].astype(np.int64), dev)
    cls = backend.to_device(lab[keep], dev)
    target = xp.zeros((n, C), dtype=logits.dtype)
    target[rows, cls] = t(1)
    if label_smoothing:
        w = xp.zeros((n, 1), dtype=logits.dtype)
        w[rows] = t(1)
        target = target * t(1 - label_smoothing) + w * t(label_smoothing / C)
    lsm = log_softmax(logits.features)
    per_site = -(target * lsm).sum(axis=1)          # 0 at ignored sites
    total = colsum(xp.ascontiguousarray(per_site.reshape(n, 1)))[0]
    out = Tensor(xp.asarray(total / t(n_lab), dtype=logits.dtype).reshape(()))

    def backward(g):
        p = xp.exp(lsm)
        if ignore_index is not None:
            w = xp.zeros((n, 1), dtype=logits.dtype)
            w[rows] = t(1)
            p = p * w
        gf = xp.ascontiguousarray((p - target) * (g / t(n_lab)), dtype=logits.dtype)
        return ((gf, xp.zeros_like(logits.ground)),)

    return record(out, [logits], backward, "site_cross_entropy")
