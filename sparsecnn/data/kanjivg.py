"""Loading KanjiVG stroke data (https://kanjivg.tagaini.net).

KanjiVG (by Ulrich Apel, CC BY-SA 3.0) describes each character as an SVG
file in a 109 x 109 view box whose ``<path>`` elements are the strokes in
writing order.  The optional PyPI package ``kanjivg`` (``pip install
sparsecnn[kanji]``) installs the files into a bare ``kanji/`` folder:

* ``04e00.svg`` -- the base drawing of U+4E00 (five lowercase hex digits);
* ``04e14-Kaisho.svg``, ``04e9b-HzFst.svg``, ... -- variant drawings of the
  same character (``Kaisho`` = regular-script form; other suffixes mark
  alternative stroke orders or glyph forms).

Class selection used by :func:`load_kanjivg`:

* ``select="first"`` -- base files (no ``-suffix``) whose code point lies in
  the CJK Unified Ideographs block U+4E00..U+9FFF, in code-point order
  (6,413 characters in the kanjivg 20260714 release; files of other blocks, e.g.
  compatibility ideographs, kana, Latin, are not counted);
* ``select="kana"`` -- base files in the Hiragana (U+3040..U+309F) and
  Katakana (U+30A0..U+30FF) blocks, in code-point order;
* an explicit sequence (or string) of characters.
"""

from __future__ import annotations

import collections
import functools
import importlib.metadata
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .dataset import StrokeDataset
from .strokes import Strokes, normalize

__all__ = [
    "CJK_RANGE",
    "KANA_RANGES",
    "parse_svg_path",
    "load_character",
    "kanjivg_dir",
    "kanjivg_index",
    "load_kanjivg",
    "load_kanjivg_variants",
]

#: Inclusive code-point range counted by ``select="first"``.
CJK_RANGE = (0x4E00, 0x9FFF)
#: Inclusive code-point ranges counted by ``select="kana"`` (hiragana, katakana).
KANA_RANGES = ((0x3040, 0x309F), (0x30A0, 0x30FF))

_INSTALL_HINT = "install it with `pip install sparsecnn[kanji]` (or `pip install kanjivg`)"

# ---------------------------------------------------------------------------
# SVG path parsing
# ---------------------------------------------------------------------------
_CMD = r"[MmLlHhVvCcSsQqTtZzAa]"
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TOKEN = re.compile(rf"({_CMD})|({_NUM})")
_VALID = re.compile(rf"(?:[\s,]*(?:{_CMD}|{_NUM}))*[\s,]*")
_NARGS = {"M": 2, "L": 2, "H": 1, "V": 1, "C": 6, "S": 4, "Q": 4, "T": 2, "Z": 0}
_DENSE = 64  # parameter samples per segment for arc-length estimation
_T_DENSE = np.linspace(0.0, 1.0, _DENSE + 1)


def _bernstein(t: np.ndarray) -> np.ndarray:
    """Cubic Bernstein basis, shape ``t.shape + (4,)``."""
    u = 1.0 - t
    return np.stack([u * u * u, 3.0 * u * u * t, 3.0 * u * t * t, t * t * t], axis=-1)


_B_DENSE = _bernstein(_T_DENSE)  # (65, 4)


def _tokenize(d: str) -> list[str | float]:
    m = _VALID.fullmatch(d)
    if m is None:
        bad = _VALID.match(d)
        pos = bad.end() if bad is not None else 0
        # skip separators to point at the offending character
        while pos < len(d) and d[pos] in " \t\r\n,":
            pos += 1
        raise ValueError(f"invalid SVG path data at position {pos}: {d[pos : pos + 20]!r}")
    return [c if c else float(n) for c, n in _TOKEN.findall(d)]


def _resample(ctrl: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Sample cubic segments at equal arc-length spacing.

    Parameters
    ----------
    ctrl : (S, 4, 2) control points (lines are encoded as cubics with control
        points at thirds, whose parametrisation is uniform).
    step : target spacing.

    Returns
    -------
    points : (P, 2) samples after each segment's start point, segment by
        segment (the last sample of a segment is exactly its end point).
    counts : (S,) number of samples per segment.
    """
    s = ctrl.shape[0]
    dense = np.einsum("tk,skd->std", _B_DENSE, ctrl)  # (S, 65, 2)
    seglen = np.sqrt(np.sum(np.diff(dense, axis=1) ** 2, axis=2))  # (S, 64)
    cum = np.concatenate([np.zeros((s, 1)), np.cumsum(seglen, axis=1)], axis=1)  # (S, 65)
    length = cum[:, -1]
    counts = np.maximum(1, np.ceil(length / step - 1e-9)).astype(np.int64)
    # fraction of arc length along each segment; degenerate segments use t itself
    safe = np.where(length > 0, length, 1.0)
    frac = np.where(length[:, None] > 0, cum / safe[:, None], _T_DENSE[None, :])
    seg = np.repeat(np.arange(s), counts)
    first = np.cumsum(counts) - counts
    j = np.arange(seg.size) - np.repeat(first, counts) + 1
    target = j / counts[seg]  # in (0, 1]
    # invert frac(t) per segment with one global search: offset segment i by 2 i
    keys = (frac + 2.0 * np.arange(s)[:, None]).ravel()
    q = target + 2.0 * seg
    hi = np.clip(np.searchsorted(keys, q, side="left"), 1, keys.size - 1)
    lo = hi - 1
    # keep both bracket ends inside the same segment
    lo = np.maximum(lo, seg * (_DENSE + 1))
    hi = np.maximum(hi, lo + 1)
    k_lo, k_hi = keys[lo], keys[hi]
    denom = k_hi - k_lo
    w = np.where(denom > 0, (q - k_lo) / np.where(denom > 0, denom, 1.0), 0.0)
    t_lo = _T_DENSE[lo % (_DENSE + 1)]
    t_hi = _T_DENSE[hi % (_DENSE + 1)]
    t = np.clip(t_lo + w * (t_hi - t_lo), 0.0, 1.0)
    t[np.cumsum(counts) - 1] = 1.0
    pts = np.einsum("pk,pkd->pd", _bernstein(t), ctrl[seg])
    return pts, counts


def parse_svg_path(d: str, samples_per_unit: float = 0.5) -> list[np.ndarray]:
    """Parse SVG path data into polylines, one per subpath.

    Supported commands (absolute upper case, relative lower case): ``M``,
    ``L``, ``H``, ``V``, ``C``, ``S`` (smooth cubic: the first control point is
    the reflection of the previous cubic's second control point, or the
    current point if the previous command was not a cubic), ``Q``, ``T``
    (quadratics, converted exactly to cubics) and ``Z``.  Repeated argument
    groups repeat the command (after ``M``/``m`` they are ``L``/``l``).
    Numbers may be separated by whitespace, commas, signs or a second decimal
    point (``"1.5-2.3"``, ``".5.5"``) and may have exponents.  Elliptical arcs
    (``A``) are not supported.

    Every line and curve segment is resampled with equal spacing along its arc
    length: a segment of length ``L`` gets ``max(1, ceil(L * samples_per_unit))``
    intervals.  Curves are evaluated densely (64 parameter steps), their
    cumulative chord length is inverted by linear interpolation to find the
    parameters of the resampled points.  Segment end points (corners) are
    always kept exactly.

    Parameters
    ----------
    d : str
        Content of a ``d`` attribute.
    samples_per_unit : float
        Point density in points per path unit (> 0).  The default 0.5 gives
        one point every 2 units, about 55 points across a 109-unit KanjiVG box.

    Returns
    -------
    list of numpy.ndarray
        One float64 array of shape ``(n, 2)`` of ``(x, y)`` points per
        subpath, in path units (y down).  A lone ``M x y`` gives a one-point
        subpath.

    Raises
    ------
    TypeError
        If ``d`` is not a string.
    ValueError
        On malformed data, an unsupported command or a bad argument count.
    """
    if not isinstance(d, str):
        raise TypeError(f"d must be a str, got {type(d).__name__}")
    return _polylines([_parse_segments(d)], _step(samples_per_unit))[0]


def _step(samples_per_unit: float) -> float:
    """Validate a point density and return the spacing ``1 / samples_per_unit``."""
    if isinstance(samples_per_unit, bool) or not isinstance(
        samples_per_unit, (int, float, np.number)
    ):
        raise TypeError(f"samples_per_unit must be a number, got {type(samples_per_unit).__name__}")
    if not (samples_per_unit > 0 and math.isfinite(samples_per_unit)):
        raise ValueError(f"samples_per_unit must be finite and > 0, got {samples_per_unit}")
    return 1.0 / float(samples_per_unit)


_Subpaths = list[tuple[tuple[float, float], list[tuple[float, ...]]]]


def _parse_segments(d: str) -> _Subpaths:
    """Interpret path data into subpaths: a start point and cubic segments."""
    tokens = _tokenize(d)

    # Phase 1: interpret the commands (pure Python) into subpaths, each a start
    # point plus a list of cubic segments (x0, y0, x1, y1, x2, y2, x3, y3).
    subpaths: _Subpaths = []
    segs: list[tuple[float, ...]] | None = None
    x = y = 0.0  # current point
    sx = sy = 0.0  # subpath start
    last_c: tuple[float, float] | None = None  # previous cubic's 2nd control point
    last_q: tuple[float, float] | None = None  # previous quadratic's control point
    cmd: str | None = None
    i = 0
    ntok = len(tokens)

    def line(x0: float, y0: float, x1: float, y1: float) -> tuple[float, ...]:
        dx, dy = (x1 - x0) / 3.0, (y1 - y0) / 3.0
        return (x0, y0, x0 + dx, y0 + dy, x1 - dx, y1 - dy, x1, y1)

    while i < ntok:
        tok = tokens[i]
        if isinstance(tok, str):
            cmd = tok
            i += 1
            if cmd in "Aa":
                raise ValueError("SVG path command 'A' (elliptical arc) is not supported")
        elif cmd is None:
            raise ValueError(f"SVG path data must start with a command, got {d[:20]!r}")
        elif cmd in "Zz":
            raise ValueError(f"SVG path command {cmd!r} takes no arguments")
        upper = cmd.upper()
        n = _NARGS[upper]
        a = tokens[i : i + n]
        if len(a) < n or any(isinstance(v, str) for v in a):
            raise ValueError(f"SVG path command {cmd!r} needs {n} numbers")
        i += n
        ox, oy = (x, y) if cmd.islower() else (0.0, 0.0)
        new_c: tuple[float, float] | None = None
        new_q: tuple[float, float] | None = None

        if upper == "M":
            x, y = ox + a[0], oy + a[1]
            sx, sy = x, y
            segs = []
            subpaths.append(((x, y), segs))
            cmd = "l" if cmd == "m" else "L"
        elif upper == "Z":
            if segs is not None and (x, y) != (sx, sy):
                segs.append(line(x, y, sx, sy))
            x, y = sx, sy
            segs = None  # a later drawing command starts a new subpath here
        else:
            if segs is None:
                segs = []
                subpaths.append(((x, y), segs))
            if upper == "L":
                nx, ny = ox + a[0], oy + a[1]
                segs.append(line(x, y, nx, ny))
            elif upper == "H":
                nx, ny = ox + a[0], y
                segs.append(line(x, y, nx, ny))
            elif upper == "V":
                nx, ny = x, oy + a[0]
                segs.append(line(x, y, nx, ny))
            else:
                if upper == "C":
                    c1 = (ox + a[0], oy + a[1])
                    c2 = (ox + a[2], oy + a[3])
                    nx, ny = ox + a[4], oy + a[5]
                    new_c = c2
                elif upper == "S":
                    c1 = (2 * x - last_c[0], 2 * y - last_c[1]) if last_c is not None else (x, y)
                    c2 = (ox + a[0], oy + a[1])
                    nx, ny = ox + a[2], oy + a[3]
                    new_c = c2
                else:  # quadratic Q / T, elevated to a cubic
                    if upper == "Q":
                        q = (ox + a[0], oy + a[1])
                        nx, ny = ox + a[2], oy + a[3]
                    else:
                        q = (2 * x - last_q[0], 2 * y - last_q[1]) if last_q is not None else (x, y)
                        nx, ny = ox + a[0], oy + a[1]
                    c1 = (x + 2.0 / 3.0 * (q[0] - x), y + 2.0 / 3.0 * (q[1] - y))
                    c2 = (nx + 2.0 / 3.0 * (q[0] - nx), ny + 2.0 / 3.0 * (q[1] - ny))
                    new_q = q
                segs.append((x, y, c1[0], c1[1], c2[0], c2[1], nx, ny))
            x, y = nx, ny
        last_c, last_q = new_c, new_q

    return subpaths


def _polylines(paths: list[_Subpaths], step: float) -> list[list[np.ndarray]]:
    """Resample the subpaths of several paths in one vectorised pass."""
    all_segs = [seg for subpaths in paths for _, segs in subpaths for seg in segs]
    if all_segs:
        pts, counts = _resample(np.asarray(all_segs, dtype=np.float64).reshape(-1, 4, 2), step)
        ends = np.cumsum(counts)
    out: list[list[np.ndarray]] = []
    k = 0  # index of the next segment
    for subpaths in paths:
        polys: list[np.ndarray] = []
        for start, segs in subpaths:
            if segs:
                lo = int(ends[k - 1]) if k else 0
                hi = int(ends[k + len(segs) - 1])
                polys.append(
                    np.concatenate([np.asarray([start], dtype=np.float64), pts[lo:hi]], axis=0)
                )
                k += len(segs)
            else:
                polys.append(np.asarray([start], dtype=np.float64))
        out.append(polys)
    return out


# ---------------------------------------------------------------------------
# characters
# ---------------------------------------------------------------------------
def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


@functools.cache
def _load_cached(path: str, samples_per_unit: float) -> tuple[np.ndarray, ...]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"cannot parse SVG file {path}: {exc}") from None
    parsed: list[_Subpaths] = []
    for elem in root.iter():
        if not isinstance(elem.tag, str) or _local(elem.tag) != "path":
            continue
        d = elem.get("d")
        if d is None:
            continue
        try:
            subpaths = _parse_segments(d)
        except ValueError as exc:
            raise ValueError(f"bad path data in {path}: {exc}") from None
        if subpaths:
            parsed.append(subpaths)
    # a stroke is one pen-down trace: join subpaths if a path has several
    strokes = [
        np.concatenate(polys, axis=0) for polys in _polylines(parsed, _step(samples_per_unit))
    ]
    out = normalize(strokes)
    for s in out:
        s.setflags(write=False)
    return tuple(out)


def load_character(path: str | os.PathLike[str], samples_per_unit: float = 0.5) -> Strokes:
    """Load the strokes of one KanjiVG SVG file.

    Every ``<path>`` element with a ``d`` attribute is one stroke, taken in
    document order (KanjiVG stores strokes in writing order; the XML namespace
    is ignored).  Coordinates keep the SVG orientation (y down, so row = y)
    and the whole character is mapped into the unit box with
    :func:`~sparsecnn.data.strokes.normalize`.  Should a ``d`` attribute contain
    several subpaths they are joined into one stroke.  Parsed files are cached
    in-process (keyed by resolved path and density); copies are returned.

    Parameters
    ----------
    path : str or os.PathLike
        An SVG file.
    samples_per_unit : float
        Point density passed to :func:`parse_svg_path`.

    Returns
    -------
    list of numpy.ndarray
        float64 ``(n_i, 2)`` strokes in ``[0, 1]^2``.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is not valid XML or holds bad path data.
    """
    _step(samples_per_unit)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such SVG file: {p}")
    return [s.copy() for s in _load_cached(str(p.resolve()), float(samples_per_unit))]


# ---------------------------------------------------------------------------
# the KanjiVG collection
# ---------------------------------------------------------------------------
def kanjivg_dir() -> Path:
    """Folder of KanjiVG SVG files installed by the ``kanjivg`` package.

    Returns
    -------
    pathlib.Path
        The ``kanji/`` data folder.

    Raises
    ------
    FileNotFoundError
        If the package (or its data folder) is not installed; the message says
        how to install it.
    """
    try:
        dist = importlib.metadata.distribution("kanjivg")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the KanjiVG data package is not installed; {_INSTALL_HINT}"
        ) from None
    folder = Path(str(dist.locate_file("kanji")))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the kanjivg package is installed but its data folder {folder} is missing; "
            f"{_INSTALL_HINT}"
        )
    return folder


_FILE_RE = re.compile(r"^([0-9a-f]{5})(?:-([A-Za-z0-9]+))?\.svg$")


@functools.lru_cache(maxsize=8)
def _index(folder: str) -> tuple[dict[str, str], dict[str, tuple[tuple[str, str], ...]]]:
    base: dict[str, str] = {}
    variants: dict[str, list[tuple[str, str]]] = {}
    for name in sorted(os.listdir(folder)):
        m = _FILE_RE.match(name)
        if m is None:
            continue
        ch = chr(int(m.group(1), 16))
        full = os.path.join(folder, name)
        if m.group(2) is None:
            base[ch] = full
        else:
            variants.setdefault(ch, []).append((m.group(2), full))
    return base, {k: tuple(v) for k, v in variants.items()}


def _resolve_dir(directory: str | os.PathLike[str] | None) -> str:
    if directory is None:
        return str(kanjivg_dir().resolve())
    p = Path(directory)
    if not p.is_dir():
        raise FileNotFoundError(f"directory {p} is not a folder of KanjiVG files")
    return str(p.resolve())


def kanjivg_index(
    directory: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, str], dict[str, tuple[tuple[str, str], ...]]]:
    """Index a folder of KanjiVG files by character.

    Parameters
    ----------
    directory : str or os.PathLike, optional
        Folder to scan; default :func:`kanjivg_dir`.

    Returns
    -------
    base : dict of str to str
        Character -> path of its base drawing (``XXXXX.svg``).
    variants : dict of str to tuple of (str, str)
        Character -> ``(suffix, path)`` pairs of its variant drawings
        (``XXXXX-suffix.svg``), sorted by file name.  Characters may have
        variants without a base file and vice versa.
    """
    base, variants = _index(_resolve_dir(directory))
    return dict(base), dict(variants)


def _in_ranges(ch: str, ranges: Iterable[tuple[int, int]]) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in ranges)


def load_kanjivg(
    classes: int | None = 100,
    *,
    select: str | Sequence[str] = "first",
    variants: bool = False,
    directory: str | os.PathLike[str] | None = None,
    samples_per_unit: float = 0.5,
) -> StrokeDataset:
    """Load KanjiVG characters as a :class:`StrokeDataset`, one class per character.

    Parameters
    ----------
    classes : int or None
        Number of classes for ``select="first"`` / ``"kana"`` (the first
        ``classes`` characters in code-point order); ``None`` takes all.
        Ignored when ``select`` is an explicit list of characters.
    select : {"first", "kana"} or sequence of str
        Which characters (see the module docstring).  An explicit sequence of
        single characters (or a string, taken character by character) keeps
        the given order; every character needs a base file.
    variants : bool
        If ``True`` the variant drawings (``-Kaisho`` etc.) of the selected
        classes are added as extra samples after the base drawings.  By
        default each class has exactly one sample, its base drawing, and the
        variants can serve as a test set via :func:`load_kanjivg_variants`.
    directory : str or os.PathLike, optional
        Folder of KanjiVG files; default the installed ``kanjivg`` package.
    samples_per_unit : float
        Point density for :func:`parse_svg_path`.

    Returns
    -------
    StrokeDataset
        Sample ``i`` of the base drawings has label ``i``; ``class_names`` are
        the characters.

    Raises
    ------
    FileNotFoundError
        If the data are not installed.
    ValueError
        For an unknown ``select``, a character without a base file, or more
        ``classes`` than available.
    """
    base, var = _index(_resolve_dir(directory))
    if isinstance(select, str) and select in ("first", "kana"):
        ranges = (CJK_RANGE,) if select == "first" else KANA_RANGES
        chars = sorted((c for c in base if _in_ranges(c, ranges)), key=ord)
        if classes is not None:
            if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)):
                raise TypeError(f"classes must be an int or None, got {type(classes).__name__}")
            if classes < 1:
                raise ValueError(f"classes must be >= 1, got {classes}")
            if classes > len(chars):
                raise ValueError(
                    f"classes={classes} but only {len(chars)} characters match select={select!r}"
                )
            chars = chars[: int(classes)]
    elif isinstance(select, str) and len(select) > 1 and select.isascii():
        raise ValueError(f"select must be 'first', 'kana' or a list of characters, got {select!r}")
    elif isinstance(select, (str, Sequence)):
        chars = list(select)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"select must contain single characters, got {c!r}")
        dup = {c for c, n in collections.Counter(chars).items() if n > 1}
        if dup:
            raise ValueError(f"select contains duplicate characters {sorted(dup)}")
        missing = [c for c in chars if c not in base]
        if missing:
            raise ValueError(f"select: no KanjiVG base file for {missing[:10]}")
    else:
        raise TypeError(
            f"select must be a str or a sequence of characters, got {type(select).__name__}"
        )
    if not chars:
        raise ValueError("select: no characters selected")

    samples = [load_character(base[c], samples_per_unit) for c in chars]
    labels = list(range(len(chars)))
    if variants:
        for label, c in enumerate(chars):
            for _suffix, path in var.get(c, ()):
                samples.append(load_character(path, samples_per_unit))
                labels.append(label)
    return StrokeDataset(samples, np.asarray(labels, dtype=np.int64), list(chars))


def load_kanjivg_variants(
    dataset: StrokeDataset,
    *,
    kinds: Sequence[str] | None = None,
    directory: str | os.PathLike[str] | None = None,
    samples_per_unit: float = 0.5,
) -> StrokeDataset:
    """Load the variant drawings of the classes of a KanjiVG dataset.

    These are different drawings of the same characters (``-Kaisho``
    regular-script forms, alternative stroke orders, ...), so they make a
    distinct test set for a model trained on the base drawings.  Classes
    without variants contribute no samples.

    Parameters
    ----------
    dataset : StrokeDataset
        A dataset whose ``class_names`` are single characters (e.g. from
        :func:`load_kanjivg`).
    kinds : sequence of str, optional
        Keep only variant files whose suffix contains one of these strings
        (e.g. ``("Kaisho",)``); default all variants.
    directory : str or os.PathLike, optional
        Folder of KanjiVG files; default the installed ``kanjivg`` package.
    samples_per_unit : float
        Point density for :func:`parse_svg_path`.

    Returns
    -------
    StrokeDataset
        Same ``class_names`` (and hence label meaning) as ``dataset``; samples
        ordered by label, then by file name.
    """
    if not isinstance(dataset, StrokeDataset):
        raise TypeError(f"dataset must be a StrokeDataset, got {type(dataset).__name__}")
    if isinstance(kinds, str):
        kinds = (kinds,)
    _, var = _index(_resolve_dir(directory))
    samples: list[Strokes] = []
    labels: list[int] = []
    for label, name in enumerate(dataset.class_names):
        for suffix, path in var.get(name, ()):
            if kinds is not None and not any(k in suffix for k in kinds):
                continue
            samples.append(load_character(path, samples_per_unit))
            labels.append(label)
    return StrokeDataset(samples, np.asarray(labels, dtype=np.int64), list(dataset.class_names))
