"""Stroke samples: validation, normalisation and rasterisation to sparse pixels.

A *stroke sample* is a list of strokes in writing order.  Each stroke is a
float64 array of shape ``(n_i, 2)`` holding ``(x, y)`` pen positions, also in
writing order.  Throughout the package ``y`` points *down*, as in images and
SVG files, so that a point ``(x, y)`` is drawn at pixel ``(row, col) =
(y, x)``.  Labels are plain Python/NumPy integers kept next to the strokes
(see :class:`sparsecnn.data.dataset.StrokeDataset`).

Rendering follows the spatially-sparse approach of B. Graham,
"Spatially-sparse convolutional neural networks" (arXiv:1409.6070) and
"Sparse arrays of signatures for online character recognition" (2013): a
character is drawn as a thin 8-connected pen trace into a large, mostly
empty grid, and only the active pixels are returned, each with a small
feature vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = [
    "Strokes",
    "FEATURE_KINDS",
    "as_strokes",
    "normalize",
    "bounding_box",
    "default_scale",
    "to_pixel_space",
    "rasterize",
    "render",
    "num_feature_channels",
    "segment_signature",
    "run_signatures",
    "chen_product",
    "path_signature",
]

#: Type alias for a stroke sample: strokes in writing order, each ``(n_i, 2)``.
Strokes = list[np.ndarray]

#: Names accepted by the ``features`` argument of :func:`render`.
FEATURE_KINDS = ("presence", "directions", "signature")

FeatureKind = Literal["presence", "directions", "signature"]


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------
def as_strokes(strokes: Sequence[np.ndarray], *, name: str = "strokes") -> Strokes:
    """Validate a stroke sample and return it as a list of float64 arrays.

    Parameters
    ----------
    strokes : sequence of array_like, each of shape (n_i, 2)
        Strokes in writing order.  Each stroke needs at least one point and
        only finite coordinates.  An empty sequence (no strokes) is allowed.
    name : str, optional
        Argument name used in error messages.

    Returns
    -------
    list of numpy.ndarray
        New float64 arrays of shape ``(n_i, 2)``; the input is not modified.

    Raises
    ------
    TypeError
        If ``strokes`` is not a sequence (a bare ndarray or string counts as
        wrong: a sample is a *list* of strokes) or a stroke is not numeric
        (strings and booleans are not taken as numbers).
    ValueError
        If a stroke does not have shape ``(n, 2)`` with ``n >= 1`` or holds
        non-finite values.
    """
    if isinstance(strokes, (str, bytes, np.ndarray)) or not isinstance(strokes, Sequence):
        raise TypeError(
            f"{name} must be a list of (n, 2) point arrays, got {type(strokes).__name__}"
        )
    out: Strokes = []
    for i, stroke in enumerate(strokes):
        try:
            arr = np.asarray(stroke)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}[{i}] is not a numeric (n, 2) array: {exc}") from None
        # strings ("1.5") and booleans would convert to numbers: refuse them
        if arr.dtype.kind not in "iuf":
            raise TypeError(
                f"{name}[{i}] must hold real numbers, got an array of dtype {arr.dtype}"
            )
        arr = arr.astype(np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"{name}[{i}] must have shape (n, 2), got {arr.shape}")
        if arr.shape[0] == 0:
            raise ValueError(f"{name}[{i}] has no points")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}[{i}] contains non-finite coordinates")
        out.append(arr)
    return out


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


# --------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------
def bounding_box(strokes: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Return the axis-aligned bounding box of all points of a sample.

    Parameters
    ----------
    strokes : sequence of (n_i, 2) array_like
        A non-empty stroke sample.

    Returns
    -------
    lo, hi : numpy.ndarray
        float64 arrays of shape ``(2,)`` with the minimum and maximum ``(x, y)``.
    """
    strokes = as_strokes(strokes)
    if not strokes:
        raise ValueError("strokes must contain at least one stroke")
    pts = np.concatenate(strokes, axis=0)
    return pts.min(axis=0), pts.max(axis=0)


def normalize(strokes: Sequence[np.ndarray]) -> Strokes:
    """Scale and translate a sample into the unit box ``[0, 1]^2``.

    The aspect ratio is kept: the longer side of the bounding box is mapped to
    length 1 and the sample is centred in the box, so the shorter side is
    centred around 0.5.  A sample whose points all coincide is moved to
    ``(0.5, 0.5)``.  An empty sample is returned unchanged (as an empty list).

    Parameters
    ----------
    strokes : sequence of (n_i, 2) array_like
        Stroke sample in arbitrary units.

    Returns
    -------
    list of numpy.ndarray
        New float64 ``(n_i, 2)`` arrays inside ``[0, 1]^2``.
    """
    strokes = as_strokes(strokes)
    if not strokes:
        return []
    pts = np.concatenate(strokes, axis=0)
    lo = pts.min(axis=0)
    hi = pts.max(axis=0)
    extent = hi - lo
    longest = float(extent.max())
    centre = (lo + hi) / 2.0
    if longest <= 0.0:
        return [np.full_like(s, 0.5) for s in strokes]
    return [(s - centre) / longest + 0.5 for s in strokes]


def default_scale(size: int) -> int:
    """Default character box size for a ``size x size`` grid: ``(2 * size) // 3``.

    This is the proportion used by Graham for online characters (a 64 pixel
    character in a 96 pixel grid), which leaves a margin of about ``size / 6``
    on each side for augmentation and for the receptive fields of the network.
    """
    size = _check_int(size, "size", 1)
    return max(1, (2 * size) // 3)


def _resolve_scale(size: int, scale: int | None) -> tuple[int, int]:
    size = _check_int(size, "size", 1)
    if scale is None:
        scale = default_scale(size)
    scale = _check_int(scale, "scale", 1)
    if scale > size:
        raise ValueError(f"scale must be <= size ({size}), got {scale}")
    return size, scale


def to_pixel_space(points: np.ndarray, size: int, scale: int | None = None) -> np.ndarray:
    """Map unit-box ``(x, y)`` points to continuous ``(row, col)`` pixel coordinates.

    The unit box is mapped onto a box of ``scale`` pixels whose top-left pixel
    is ``offset = (size - scale) // 2`` in both directions: ``x = 0`` lands on
    the centre of pixel column ``offset`` and ``x = 1`` on the centre of column
    ``offset + scale - 1`` (likewise for ``y`` and rows).  Pixel ``k`` covers
    continuous coordinates ``[k - 0.5, k + 0.5)``.

    Parameters
    ----------
    points : array_like, shape (n, 2)
        ``(x, y)`` points, nominally in ``[0, 1]^2``.
    size : int
        Side of the square grid.
    scale : int, optional
        Side of the character box in pixels; default :func:`default_scale`.

    Returns
    -------
    numpy.ndarray
        float64 array of shape ``(n, 2)`` with ``(row, col)`` coordinates
        (not rounded, not clipped).
    """
    size, scale = _resolve_scale(size, scale)
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (n, 2), got {pts.shape}")
    offset = (size - scale) // 2
    return pts[:, ::-1] * float(scale - 1) + float(offset)


# --------------------------------------------------------------------------
# rasterisation
# --------------------------------------------------------------------------
def rasterize(
    strokes: Sequence[np.ndarray], size: int, scale: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split every stroke into pixel-sized straight pieces.

    Each segment between consecutive points ``P0 -> P1`` (in continuous pixel
    coordinates, see :func:`to_pixel_space`) is sampled at
    ``n = max(1, ceil(max(|drow|, |dcol|)))`` equal steps, i.e. a DDA walk
    moving exactly one pixel per step along the major axis.  Sample ``k`` is
    drawn into the pixel ``floor(P(k / n) + 0.5)``, which makes the trace
    8-connected and one pixel thin (a Bresenham-like line); consecutive
    segments share their end pixel, so a stroke stays connected.

    The segment is cut at the parameters ``(k + 1/2) / n`` into ``n + 1``
    straight *pieces*; piece ``k`` is owned by the pixel of sample ``k``.  The
    pieces tile the segment exactly (the first and last are half steps), so
    the pieces of a stroke compose back to the whole stroke.  A stroke with a
    single point yields one piece of zero length.

    Pixel indices outside the grid are clipped to ``[0, size - 1]``: ink that
    leaves the grid piles up on the border instead of being dropped.  (To
    bound the work, vertices further than ``size`` pixels outside the grid are
    first clamped to that distance.)

    Parameters
    ----------
    strokes : sequence of (n_i, 2) array_like
        Points in the unit box (see :func:`normalize`).
    size : int
        Side of the square grid.
    scale : int, optional
        Side of the character box in pixels; default :func:`default_scale`.

    Returns
    -------
    pixels : numpy.ndarray
        int64 array of shape ``(m, 2)``: ``(row, col)`` of each piece, in
        drawing order (with repetitions).
    increments : numpy.ndarray
        float64 array of shape ``(m, 2)``: the ``(dx, dy)`` increment of each
        piece in pixel units (``dx`` along columns, ``dy`` along rows).
    stroke_index : numpy.ndarray
        int64 array of shape ``(m,)``: the stroke each piece belongs to.
    """
    strokes = as_strokes(strokes)
    size, scale = _resolve_scale(size, scale)
    all_pix: list[np.ndarray] = []
    all_inc: list[np.ndarray] = []
    all_idx: list[np.ndarray] = []
    for j, stroke in enumerate(strokes):
        # bound the work for absurd coordinates: vertices more than one grid
        # size outside the grid are pulled back (their ink is clipped anyway)
        p = np.clip(to_pixel_space(stroke, size, scale), -size, 2 * size)  # (row, col)
        if p.shape[0] == 1:
            all_pix.append(np.floor(p + 0.5))
            all_inc.append(np.zeros((1, 2)))
            all_idx.append(np.full(1, j, dtype=np.int64))
            continue
        d = p[1:] - p[:-1]
        n = np.maximum(1, np.ceil(np.abs(d).max(axis=1) - 1e-9)).astype(np.int64)
        counts = n + 1
        total = int(counts.sum())
        seg = np.repeat(np.arange(d.shape[0]), counts)
        starts = np.cumsum(counts) - counts
        k = np.arange(total) - np.repeat(starts, counts)
        nn = n[seg].astype(np.float64)
        t = k / nn
        a = np.maximum(0.0, (k - 0.5) / nn)
        b = np.minimum(1.0, (k + 0.5) / nn)
        centres = p[seg] + t[:, None] * d[seg]
        inc = (b - a)[:, None] * d[seg]
        all_pix.append(np.floor(centres + 0.5))
        all_inc.append(inc[:, ::-1])  # (drow, dcol) -> (dx, dy)
        all_idx.append(np.full(total, j, dtype=np.int64))
    if not all_pix:
        return np.zeros((0, 2), np.int64), np.zeros((0, 2), np.float64), np.zeros(0, np.int64)
    pix = np.clip(np.concatenate(all_pix), 0, size - 1).astype(np.int64)
    return pix, np.concatenate(all_inc), np.concatenate(all_idx)


# --------------------------------------------------------------------------
# path signatures
# --------------------------------------------------------------------------
def _check_depth(depth: object) -> int:
    depth = _check_int(depth, "signature_depth", 1)
    if depth > 3:
        raise ValueError(f"signature_depth must be 1, 2 or 3, got {depth}")
    return depth


def segment_signature(increments: np.ndarray, depth: int = 2) -> np.ndarray:
    """Truncated signature of straight segments with the given increments.

    For a straight line with increment ``d`` the signature is the tensor
    exponential ``(1, d, d⊗d/2, d⊗d⊗d/6, ...)``.

    Parameters
    ----------
    increments : array_like, shape (m, 2) or (2,)
        ``(dx, dy)`` increments.
    depth : {1, 2, 3}
        Truncation level.

    Returns
    -------
    numpy.ndarray
        float64 array of shape ``(m, C)`` (or ``(C,)`` for a single
        increment) with ``C = 1 + 2 + 4 (+ 8)``: level 0 (the constant 1),
        level 1 ``(dx, dy)``, level 2 flattened row-major
        ``(xx, xy, yx, yy)`` and for depth 3 level 3 flattened row-major
        (``xxx, xxy, ..., yyy``).
    """
    depth = _check_depth(depth)
    d = np.asarray(increments, dtype=np.float64)
    single = d.ndim == 1
    d = np.atleast_2d(d)
    if d.ndim != 2 or d.shape[1] != 2:
        raise ValueError(f"increments must have shape (m, 2), got {np.shape(increments)}")
    m = d.shape[0]
    parts = [np.ones((m, 1)), d]
    if depth >= 2:
        l2 = (d[:, :, None] * d[:, None, :]) / 2.0
        parts.append(l2.reshape(m, 4))
    if depth >= 3:
        l3 = (d[:, :, None, None] * d[:, None, :, None] * d[:, None, None, :]) / 6.0
        parts.append(l3.reshape(m, 8))
    out = np.concatenate(parts, axis=1)
    return out[0] if single else out


def _exclusive_segment_cumsum(x: np.ndarray, run_start: np.ndarray) -> np.ndarray:
    """Cumulative sum of ``x`` along axis 0 restarting at every run start, exclusive."""
    inclusive = np.cumsum(x, axis=0)
    exclusive = inclusive - x
    starts = np.nonzero(run_start)[0]
    run_id = np.cumsum(run_start) - 1
    return exclusive - exclusive[starts][run_id]


def run_signatures(increments: np.ndarray, run_start: np.ndarray, depth: int = 2) -> np.ndarray:
    """Signatures of runs of consecutive straight pieces (Chen's identity).

    The pieces ``increments[i]`` are concatenated in order; a new run begins
    wherever ``run_start`` is true.  For each run the truncated signature of
    the concatenated piecewise-linear path is computed in closed form with
    the recursion of Chen's identity,
    ``S <- S ⊗ exp(d)``: level 2 gains ``S1⊗d + d⊗d/2`` and level 3 gains
    ``S2⊗d + S1⊗d⊗d/2 + d⊗d⊗d/6``.

    Parameters
    ----------
    increments : array_like, shape (m, 2)
        ``(dx, dy)`` of each piece.
    run_start : array_like of bool, shape (m,)
        True where a run begins; ``run_start[0]`` must be true if ``m > 0``.
    depth : {1, 2, 3}
        Truncation level.

    Returns
    -------
    numpy.ndarray
        float64 array of shape ``(r, 2**(depth + 1) - 1)``, one signature per
        run (layout of :func:`segment_signature`).
    """
    depth = _check_depth(depth)
    d = np.asarray(increments, dtype=np.float64).reshape(-1, 2)
    start = np.asarray(run_start, dtype=bool).reshape(-1)
    if start.shape[0] != d.shape[0]:
        raise ValueError("run_start must have one entry per increment")
    m = d.shape[0]
    if m == 0:
        return np.zeros((0, 2 ** (depth + 1) - 1))
    if not start[0]:
        raise ValueError("run_start[0] must be True")
    run_id = np.cumsum(start) - 1
    r = int(run_id[-1]) + 1

    def run_sum(x: np.ndarray) -> np.ndarray:
        out = np.zeros((r,) + x.shape[1:])
        np.add.at(out, run_id, x)
        return out

    parts = [np.ones((r, 1)), run_sum(d)]
    if depth >= 2:
        p1 = _exclusive_segment_cumsum(d, start)  # level 1 before piece i
        dd = d[:, :, None] * d[:, None, :]
        c2 = p1[:, :, None] * d[:, None, :] + dd / 2.0
        parts.append(run_sum(c2).reshape(r, 4))
    if depth >= 3:
        p2 = _exclusive_segment_cumsum(c2, start)  # level 2 before piece i
        c3 = (
            p2[:, :, :, None] * d[:, None, None, :]
            + p1[:, :, None, None] * dd[:, None, :, :] / 2.0
            + dd[:, :, :, None] * d[:, None, None, :] / 6.0
        )
        parts.append(run_sum(c3).reshape(r, 8))
    return np.concatenate(parts, axis=1)


def _split_levels(sig: np.ndarray, depth: int) -> list[np.ndarray]:
    levels = [sig[..., 0]]
    start = 1
    for level in range(1, depth + 1):
        width = 2**level
        levels.append(sig[..., start : start + width].reshape(sig.shape[:-1] + (2,) * level))
        start += width
    return levels


def chen_product(sig_a: np.ndarray, sig_b: np.ndarray, depth: int = 2) -> np.ndarray:
    """Truncated tensor product of two signatures (Chen's identity).

    If ``sig_a`` is the signature of a path ``X`` and ``sig_b`` that of a path
    ``Y`` starting where ``X`` ends, the result is the signature of the
    concatenated path ``X * Y``.

    Parameters
    ----------
    sig_a, sig_b : array_like, shape (C,)
        Signatures in the layout of :func:`segment_signature`.
    depth : {1, 2, 3}
        Truncation level; ``C`` must be ``2**(depth + 1) - 1``.

    Returns
    -------
    numpy.ndarray
        float64 array of shape ``(C,)``.
    """
    depth = _check_depth(depth)
    channels = 2 ** (depth + 1) - 1
    a = np.asarray(sig_a, dtype=np.float64)
    b = np.asarray(sig_b, dtype=np.float64)
    for name, s in (("sig_a", a), ("sig_b", b)):
        if s.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {s.shape}")
    la = _split_levels(a, depth)
    lb = _split_levels(b, depth)
    out = [np.asarray(la[0] * lb[0])]
    for level in range(1, depth + 1):
        acc = np.zeros((2,) * level)
        for i in range(level + 1):
            acc = acc + np.multiply.outer(la[i], lb[level - i])
        out.append(acc.reshape(-1))
    return np.concatenate([out[0].reshape(1)] + out[1:])


def path_signature(points: np.ndarray, depth: int = 2) -> np.ndarray:
    """Truncated signature of a piecewise-linear path.

    Parameters
    ----------
    points : array_like, shape (n, 2)
        Vertices of the polyline, ``n >= 1``.
    depth : {1, 2, 3}
        Truncation level.

    Returns
    -------
    numpy.ndarray
        float64 array of shape ``(2**(depth + 1) - 1,)`` (layout of
        :func:`segment_signature`), computed with :func:`chen_product`.
    """
    depth = _check_depth(depth)
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] == 0:
        raise ValueError(f"points must have shape (n, 2) with n >= 1, got {pts.shape}")
    sig = segment_signature(np.zeros(2), depth)
    for inc in np.diff(pts, axis=0):
        sig = chen_product(sig, segment_signature(inc, depth), depth)
    return sig


# --------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------
def num_feature_channels(features: str = "presence", signature_depth: int = 2) -> int:
    """Number of feature channels ``C`` produced by :func:`render`.

    ``"presence"``: 1; ``"directions"``: 9; ``"signature"``: 7 (depth 2) or
    15 (depth 3); depth 1 gives 3.
    """
    if features == "presence":
        return 1
    if features == "directions":
        return 9
    if features == "signature":
        return 2 ** (_check_depth(signature_depth) + 1) - 1
    raise ValueError(f"features must be one of {FEATURE_KINDS}, got {features!r}")


def _direction_histogram(increments: np.ndarray) -> np.ndarray:
    """Soft 8-bin histogram of piece directions, weighted by piece length."""
    m = increments.shape[0]
    hist = np.zeros((m, 8))
    length = np.hypot(increments[:, 0], increments[:, 1])
    moving = length > 0
    if not np.any(moving):
        return hist
    ang = np.arctan2(increments[moving, 1], increments[moving, 0])
    pos = np.mod(ang / (np.pi / 4.0), 8.0)
    lo = np.floor(pos).astype(np.int64) % 8
    frac = pos - np.floor(pos)
    hi = (lo + 1) % 8
    rows = np.nonzero(moving)[0]
    w = length[moving]
    np.add.at(hist, (rows, lo), (1.0 - frac) * w)
    np.add.at(hist, (rows, hi), frac * w)
    return hist


def render(
    strokes: Sequence[np.ndarray],
    size: int,
    scale: int | None = None,
    *,
    features: FeatureKind = "presence",
    signature_depth: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Render a stroke sample as a sparse set of active pixels with features.

    The sample is **not** normalised here: points are taken to lie in the unit
    box ``[0, 1]^2`` (use :func:`normalize` first).  The unit box is mapped to
    a character box of ``scale`` pixels centred in the ``size x size`` grid
    (see :func:`to_pixel_space`), every segment between consecutive points is
    drawn as an 8-connected one-pixel-thin line (see :func:`rasterize`), and
    a stroke with one point draws one pixel.  Points that fall outside the
    grid (e.g. after augmentation) are clipped to the border pixels.

    Parameters
    ----------
    strokes : sequence of (n_i, 2) array_like
        ``(x, y)`` points in the unit box, y pointing down.
    size : int
        Side of the square grid (``>= 1``).
    scale : int, optional
        Side of the character box in pixels, ``1 <= scale <= size``.
        Default ``(2 * size) // 3`` (:func:`default_scale`).
    features : {"presence", "directions", "signature"}
        Per-pixel features:

        * ``"presence"`` -- ``C = 1``, all ones.
        * ``"directions"`` -- ``C = 9``: presence, then an 8-bin histogram of
          the pen direction of the pieces drawn into the pixel.  Bin ``j`` is
          centred on the angle ``j * 45°`` measured from the +x axis towards
          +y (image down, so bin 2 is "downwards"); each piece adds its length
          split linearly between the two nearest bins, and the histogram is
          normalised to sum to 1 per pixel (all zeros where the pen did not
          move, e.g. a single-point stroke).
        * ``"signature"`` -- presence followed by levels 1..depth of the
          truncated path signature of the local pen trace, ``C = 7`` for depth
          2 (``1, dx, dy, xx, xy, yx, yy``) or ``C = 15`` for depth 3
          (depth 1: ``C = 3``).  Every *visit* of the pen to a pixel (a
          maximal run of consecutive pieces of one stroke drawn into it, see
          :func:`rasterize`) contributes the signature of that part of the
          path, composed exactly from its straight pieces with Chen's
          identity (:func:`run_signatures`; a straight segment inside one
          pixel gives ``d``, ``d⊗d/2``, ``d⊗d⊗d/6``).  A pixel's features are
          the *sum* over its visits (e.g. where strokes cross).  Increments
          are in pixel units, ``(dx, dy)`` = (along columns, along rows);
          level ``k`` is flattened row-major over the index order ``(x, y)``.
          Channel 0 is the presence indicator 1, not the number of visits.
    signature_depth : {1, 2, 3}
        Truncation level for ``features="signature"``.

    Returns
    -------
    coords : numpy.ndarray
        int32 array of shape ``(n, 2)``: unique ``(row, col)`` of the active
        pixels, sorted lexicographically.
    feats : numpy.ndarray
        float32 array of shape ``(n, C)``.
    """
    if features not in FEATURE_KINDS:
        raise ValueError(f"features must be one of {FEATURE_KINDS}, got {features!r}")
    channels = num_feature_channels(features, signature_depth)
    size, scale = _resolve_scale(size, scale)
    pix, inc, stroke_idx = rasterize(strokes, size, scale)
    if pix.shape[0] == 0:
        return np.zeros((0, 2), np.int32), np.zeros((0, channels), np.float32)
    flat = pix[:, 0] * size + pix[:, 1]
    uniq, inverse = np.unique(flat, return_inverse=True)
    inverse = inverse.reshape(-1)
    n = uniq.shape[0]
    coords = np.stack([uniq // size, uniq % size], axis=1).astype(np.int32)
    if features == "presence":
        return coords, np.ones((n, 1), np.float32)
    if features == "directions":
        values = _direction_histogram(inc)
        owner = inverse
    else:
        # a visit: consecutive pieces of one stroke drawn into the same pixel
        start = np.ones(flat.shape[0], dtype=bool)
        start[1:] = (flat[1:] != flat[:-1]) | (stroke_idx[1:] != stroke_idx[:-1])
        values = run_signatures(inc, start, signature_depth)[:, 1:]
        owner = inverse[start]
    summed = np.zeros((n, values.shape[1]))
    for c in range(values.shape[1]):
        summed[:, c] = np.bincount(owner, weights=values[:, c], minlength=n)
    if features == "directions":
        total = summed.sum(axis=1, keepdims=True)
        summed = np.divide(summed, total, out=np.zeros_like(summed), where=total > 0)
    feats = np.concatenate([np.ones((n, 1)), summed], axis=1).astype(np.float32)
    return coords, feats
