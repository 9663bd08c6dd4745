"""Random affine augmentation of stroke samples.

All transformations act on unit-box coordinates ``(x, y)`` (y pointing down)
*about the centre* ``c = (0.5, 0.5)`` of the unit box, so a centred character
stays centred unless a translation is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .strokes import Strokes, as_strokes

__all__ = ["CENTRE", "as_rng", "random_affine", "apply_affine", "augment"]

#: Centre of the unit box; affine maps act about this point.
CENTRE = np.array([0.5, 0.5])


def as_rng(rng: np.random.Generator | int | None, name: str = "rng") -> np.random.Generator:
    """Return ``rng`` if it is a :class:`numpy.random.Generator`, else seed a new one.

    Parameters
    ----------
    rng : numpy.random.Generator, int, or None
        A generator (used as is, its state advances) or a seed for
        :func:`numpy.random.default_rng`.
    name : str
        Argument name for error messages.
    """
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise TypeError(
        f"{name} must be a numpy.random.Generator or an int seed, got {type(rng).__name__}"
    )


def _amplitude(value: object, name: str, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if upper is not None and value >= upper:
        raise ValueError(f"{name} must be < {upper}, got {value}")
    return value


def random_affine(
    rng: np.random.Generator | int,
    *,
    scale: float = 0.1,
    stretch: float = 0.1,
    shear: float = 0.2,
    rotation: float = 0.2,
    translation: float = 0.05,
) -> np.ndarray:
    """Draw a random affine map ``p -> A (p - c) + c + t``.

    Every amplitude ``a`` is a symmetric uniform range ``U(-a, a)``.  The
    values are drawn in this order (fixed, so a seed gives the same matrix):

    1. ``s ~ U(-scale, scale)`` -- isotropic scaling ``S = (1 + s) I``;
    2. ``e ~ U(-stretch, stretch)`` -- anisotropic stretch
       ``E = diag(1 + e, 1 - e)`` (x widened while y is narrowed);
    3. ``h ~ U(-shear, shear)`` -- horizontal shear ``H = [[1, h], [0, 1]]``
       (``x' = x + h y``);
    4. ``theta ~ U(-rotation, rotation)`` radians -- rotation
       ``R = [[cos, -sin], [sin, cos]]`` (with y down, positive ``theta``
       turns the character clockwise on screen);
    5. ``t ~ U(-translation, translation)^2`` -- translation in unit-box
       units, ``(tx, ty)``.

    The linear part is ``A = R @ H @ E @ S`` (scale first, rotation last).

    Parameters
    ----------
    rng : numpy.random.Generator or int
        Random source (or a seed).
    scale, stretch : float
        Amplitudes in ``[0, 1)``.
    shear, rotation, translation : float
        Amplitudes ``>= 0``.

    Returns
    -------
    numpy.ndarray
        float64 array of shape ``(2, 3)``: ``[A | t]``, to be used with
        :func:`apply_affine`.
    """
    rng = as_rng(rng)
    scale = _amplitude(scale, "scale", upper=1.0)
    stretch = _amplitude(stretch, "stretch", upper=1.0)
    shear = _amplitude(shear, "shear")
    rotation = _amplitude(rotation, "rotation")
    translation = _amplitude(translation, "translation")
    s = rng.uniform(-scale, scale)
    e = rng.uniform(-stretch, stretch)
    h = rng.uniform(-shear, shear)
    theta = rng.uniform(-rotation, rotation)
    t = rng.uniform(-translation, translation, size=2)
    S = (1.0 + s) * np.eye(2)
    E = np.diag([1.0 + e, 1.0 - e])
    H = np.array([[1.0, h], [0.0, 1.0]])
    c, sn = np.cos(theta), np.sin(theta)
    R = np.array([[c, -sn], [sn, c]])
    A = R @ H @ E @ S
    return np.concatenate([A, t[:, None]], axis=1)


def _check_matrix(matrix: np.ndarray) -> np.ndarray:
    try:
        m = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError("matrix must be a numeric (2, 3) array") from None
    if m.shape != (2, 3):
        raise ValueError(f"matrix must have shape (2, 3), got {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("matrix contains non-finite values")
    return m


def apply_affine(strokes: Sequence[np.ndarray], matrix: np.ndarray) -> Strokes:
    """Apply an affine map about the unit-box centre to every point.

    Each point ``p = (x, y)`` becomes ``p' = A (p - c) + c + t`` with
    ``c = (0.5, 0.5)``, ``A = matrix[:, :2]`` and ``t = matrix[:, 2]``.

    Parameters
    ----------
    strokes : sequence of (n_i, 2) array_like
        Stroke sample.
    matrix : array_like, shape (2, 3)
        ``[A | t]``, e.g. from :func:`random_affine`.

    Returns
    -------
    list of numpy.ndarray
        New float64 ``(n_i, 2)`` arrays (not re-normalised, not clipped).
    """
    strokes = as_strokes(strokes)
    m = _check_matrix(matrix)
    A, t = m[:, :2], m[:, 2]
    return [(s - CENTRE) @ A.T + CENTRE + t for s in strokes]


def augment(
    strokes: Sequence[np.ndarray],
    rng: np.random.Generator | int,
    *,
    stroke_jitter: float = 0.02,
    **affine_kwargs: float,
) -> Strokes:
    """Randomly distort a sample: a global affine map plus per-stroke jitter.

    First ``matrix = random_affine(rng, **affine_kwargs)`` is drawn and applied
    with :func:`apply_affine`; then every stroke is translated by its own
    ``U(-stroke_jitter, stroke_jitter)^2`` offset (drawn in stroke order), which
    slightly perturbs the relative placement of strokes as in real
    handwriting.  The same generator state always gives the same output.

    Parameters
    ----------
    strokes : sequence of (n_i, 2) array_like
        Sample in the unit box.
    rng : numpy.random.Generator or int
        Random source (or a seed).
    stroke_jitter : float
        Amplitude of the per-stroke translation in unit-box units (``>= 0``).
    **affine_kwargs
        ``scale``, ``stretch``, ``shear``, ``rotation``, ``translation`` for
        :func:`random_affine`.

    Returns
    -------
    list of numpy.ndarray
        New float64 ``(n_i, 2)`` arrays; points may leave the unit box slightly
        (they are clipped by :func:`~sparsecnn.data.strokes.render`).
    """
    allowed = {"scale", "stretch", "shear", "rotation", "translation"}
    unknown = set(affine_kwargs) - allowed
    if unknown:
        raise TypeError(f"augment() got unexpected keyword arguments {sorted(unknown)}")
    rng = as_rng(rng)
    jitter = _amplitude(stroke_jitter, "stroke_jitter")
    strokes = as_strokes(strokes)
    matrix = random_affine(rng, **affine_kwargs)
    out = apply_affine(strokes, matrix)
    if jitter > 0 and out:
        offsets = rng.uniform(-jitter, jitter, size=(len(out), 2))
        out = [s + o for s, o in zip(out, offsets, strict=True)]
    return out
