"""Stroke datasets, their on-disk formats, synthetic data and batching.

On-disk formats (chosen by the file extension in :func:`save_strokes` /
:func:`load_strokes`):

``.npz`` (NumPy archive, no pickled objects; read with ``allow_pickle=False``)
    ``format``          unicode scalar, ``"sparsecnn-strokes"``
    ``version``         int64 scalar, ``1``
    ``points``          float32 ``(P, 2)``: all ``(x, y)`` points, concatenated
                        sample by sample and stroke by stroke
    ``stroke_offsets``  int64 ``(S + 1,)``: stroke ``j`` is
                        ``points[stroke_offsets[j]:stroke_offsets[j + 1]]``
    ``sample_offsets``  int64 ``(N + 1,)``: sample ``i`` consists of strokes
                        ``sample_offsets[i]`` to ``sample_offsets[i + 1] - 1``
    ``labels``          int64 ``(N,)``
    ``class_names``     unicode ``(K,)``

    Points are stored in float32, so a round trip is exact to about 1e-7
    relative precision.

``.jsonl`` (JSON lines, UTF-8)
    An optional first line ``{"class_names": ["a", "b", ...]}``, then one
    object per sample::

        {"label": 3, "strokes": [[[x, y], [x, y], ...], [[x, y], ...]]}

    ``label`` is a class index or a class name.  :func:`save_strokes` writes
    the header and class *names*.  Without a header, integer labels get class
    names ``"0" .. str(max)`` and string labels become the sorted set of names
    found.  Blank lines are ignored.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .augment import as_rng
from .augment import augment as augment_strokes
from .strokes import FEATURE_KINDS, Strokes, as_strokes, normalize, num_feature_channels, render

if TYPE_CHECKING:  # pragma: no cover
    from sparsecnn.tensor import SparseTensor

__all__ = [
    "StrokeDataset",
    "save_strokes",
    "load_strokes",
    "load_samples",
    "strokes_from_json",
    "synthetic_strokes",
    "Batch",
    "collate",
    "BatchIterator",
    "NPZ_FORMAT",
]

NPZ_FORMAT = "sparsecnn-strokes"
_NPZ_VERSION = 1


# ---------------------------------------------------------------------------
# dataset
# ---------------------------------------------------------------------------
class StrokeDataset:
    """An in-memory list of labelled stroke samples.

    Parameters
    ----------
    samples : sequence of stroke samples
        Each sample is a list of float64 ``(n_i, 2)`` arrays (validated and
        copied with :func:`~sparsecnn.data.strokes.as_strokes`).
    labels : array_like of int, shape (N,)
        Class index of each sample, in ``[0, len(class_names))``.
    class_names : sequence of str, optional
        Unique class names; default ``["0", "1", ..., str(max(labels))]``.

    Attributes
    ----------
    samples : list of list of numpy.ndarray
        The stroke samples.
    labels : numpy.ndarray
        int64 array of shape ``(N,)``.
    class_names : list of str
        Name of each class index.
    """

    def __init__(
        self,
        samples: Sequence[Sequence[np.ndarray]],
        labels: Sequence[int] | np.ndarray,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if isinstance(samples, (str, bytes, np.ndarray)) or not isinstance(samples, Sequence):
            raise TypeError(
                f"samples must be a list of stroke samples, got {type(samples).__name__}"
            )
        self.samples: list[Strokes] = [
            as_strokes(s, name=f"samples[{i}]") for i, s in enumerate(samples)
        ]
        lab = np.asarray(labels)
        if lab.ndim != 1 or lab.shape[0] != len(self.samples):
            raise ValueError(f"labels must have shape ({len(self.samples)},), got {lab.shape}")
        if lab.size and not np.issubdtype(lab.dtype, np.integer):
            raise TypeError(f"labels must be integers, got dtype {lab.dtype}")
        self.labels: np.ndarray = lab.astype(np.int64)
        if class_names is None:
            k = int(self.labels.max()) + 1 if self.labels.size else 0
            class_names = [str(i) for i in range(k)]
        if isinstance(class_names, (str, bytes)):
            raise TypeError("class_names must be a sequence of str, not a single string")
        names = list(class_names)
        for n in names:
            if not isinstance(n, str):
                raise TypeError(f"class_names must contain str, got {type(n).__name__}")
        if len(set(names)) != len(names):
            raise ValueError("class_names must be unique")
        self.class_names: list[str] = names
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= len(names)):
            raise ValueError(
                f"labels must lie in [0, {len(names)}), got range "
                f"[{self.labels.min()}, {self.labels.max()}]"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes ``K = len(class_names)``."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(
        self, index: int | slice | Sequence[int] | np.ndarray
    ) -> tuple[Strokes, int] | StrokeDataset:
        """``ds[i]`` -> ``(strokes, label)``; a slice or index array -> a subset."""
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            i = int(index)
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} out of range for dataset of length {len(self)}")
            return self.samples[i], int(self.labels[i])
        if isinstance(index, slice):
            return self.subset(np.arange(len(self))[index])
        return self.subset(index)

    def __iter__(self) -> Iterator[tuple[Strokes, int]]:
        for i in range(len(self)):
            yield self.samples[i], int(self.labels[i])

    def __repr__(self) -> str:
        return f"StrokeDataset({len(self)} samples, {self.num_classes} classes)"

    def subset(self, indices: Sequence[int] | np.ndarray) -> StrokeDataset:
        """Dataset of the samples at ``indices`` (same ``class_names``).

        Parameters
        ----------
        indices : array_like of int or bool mask
            Positions to keep, in the order given.
        """
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"boolean indices must have shape ({len(self)},), got {idx.shape}")
            idx = np.nonzero(idx)[0]
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise TypeError("indices must be a 1-D array of integers")
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"indices out of range for dataset of length {len(self)}")
        return StrokeDataset._trusted(
            [self.samples[int(i)] for i in idx], self.labels[idx], self.class_names
        )

    @classmethod
    def _trusted(
        cls, samples: list[Strokes], labels: np.ndarray, class_names: list[str]
    ) -> StrokeDataset:
        obj = cls.__new__(cls)
        obj.samples = list(samples)
        obj.labels = np.asarray(labels, dtype=np.int64).copy()
        obj.class_names = list(class_names)
        return obj

    def split(
        self, fraction: float, seed: int = 0, *, stratify: bool = True
    ) -> tuple[StrokeDataset, StrokeDataset]:
        """Randomly split into two datasets.

        Parameters
        ----------
        fraction : float
            Share of samples in the first part, in ``[0, 1]``.
        seed : int
            Seed of the permutation.
        stratify : bool
            If true, every class is split separately (``round(fraction *
            count)`` of its samples go to the first part), keeping the class
            proportions; otherwise ``round(fraction * N)`` random samples.

        Returns
        -------
        first, second : StrokeDataset
            Disjoint subsets covering the dataset, each in original order.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)):
            raise TypeError(f"fraction must be a float, got {type(fraction).__name__}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        rng = as_rng(seed, "seed")
        mask = np.zeros(len(self), dtype=bool)
        if stratify:
            for c in np.unique(self.labels):
                members = np.nonzero(self.labels == c)[0]
                take = int(round(fraction * members.size))
                mask[rng.permutation(members)[:take]] = True
        else:
            take = int(round(fraction * len(self)))
            mask[rng.permutation(len(self))[:take]] = True
        return self.subset(mask), self.subset(~mask)


# ---------------------------------------------------------------------------
# on-disk formats
# ---------------------------------------------------------------------------
def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".jsonl"):
        raise ValueError(f"path must end in .npz or .jsonl, got {str(path)!r}")
    return suffix


def save_strokes(dataset: StrokeDataset, path: str | os.PathLike[str]) -> None:
    """Write a dataset to ``.npz`` or ``.jsonl`` (chosen by the extension).

    See the module docstring for both formats.

    Parameters
    ----------
    dataset : StrokeDataset
        Data to write.
    path : str or os.PathLike
        Target file; its extension must be ``.npz`` or ``.jsonl``.
    """
    if not isinstance(dataset, StrokeDataset):
        raise TypeError(f"dataset must be a StrokeDataset, got {type(dataset).__name__}")
    path = Path(path)
    if _suffix(path) == ".npz":
        strokes = [s for sample in dataset.samples for s in sample]
        lengths = np.array([len(s) for s in strokes], dtype=np.int64)
        counts = np.array([len(sample) for sample in dataset.samples], dtype=np.int64)
        points = np.concatenate(strokes, axis=0) if strokes else np.zeros((0, 2))
        with open(path, "wb") as fh:
            np.savez_compressed(
                fh,
                format=np.array(NPZ_FORMAT),
                version=np.array(_NPZ_VERSION, dtype=np.int64),
                points=points.astype(np.float32),
                stroke_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                sample_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                labels=dataset.labels.astype(np.int64),
                class_names=np.array(dataset.class_names, dtype=np.str_).reshape(-1),
            )
    else:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"class_names": dataset.class_names}, ensure_ascii=False) + "\n")
            for sample, label in zip(dataset.samples, dataset.labels, strict=True):
                obj = {
                    "label": dataset.class_names[int(label)],
                    "strokes": [s.tolist() for s in sample],
                }
                fh.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")


def load_strokes(path: str | os.PathLike[str]) -> StrokeDataset:
    """Read a dataset written by :func:`save_strokes` (or by hand, for ``.jsonl``).

    Parameters
    ----------
    path : str or os.PathLike
        A ``.npz`` or ``.jsonl`` file.

    Returns
    -------
    StrokeDataset
        Points as float64.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the extension is unknown or the file is corrupt or inconsistent
        (the message names the file).
    """
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        if suffix == ".npz":
            return _load_npz(path)
        return _load_jsonl(path)
    except (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        OSError,
        EOFError,
        zipfile.BadZipFile,
        UnicodeDecodeError,
        RecursionError,
    ) as exc:
        raise ValueError(f"corrupt or invalid stroke file {str(path)!r}: {exc}") from exc


def _load_npz(path: Path) -> StrokeDataset:
    with np.load(path, allow_pickle=False) as data:
        required = {"format", "points", "stroke_offsets", "sample_offsets", "labels", "class_names"}
        missing = required - set(data.files)
        if missing:
            raise ValueError(f"missing arrays {sorted(missing)}")
        if str(data["format"]) != NPZ_FORMAT:
            raise ValueError(f"format marker is {str(data['format'])!r}, expected {NPZ_FORMAT!r}")
        if "version" in data.files and int(data["version"]) > _NPZ_VERSION:
            raise ValueError(f"unsupported version {int(data['version'])}")
        points = np.asarray(data["points"], dtype=np.float64)
        so = data["stroke_offsets"]
        sa = data["sample_offsets"]
        labels = data["labels"]
        names = data["class_names"]
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (P, 2), got {points.shape}")
    for name, off, end in (
        ("stroke_offsets", so, points.shape[0]),
        ("sample_offsets", sa, so.shape[0] - 1),
    ):
        if off.ndim != 1 or off.size == 0 or not np.issubdtype(off.dtype, np.integer):
            raise ValueError(f"{name} must be a non-empty 1-D integer array")
        if off[0] != 0 or off[-1] != end or np.any(np.diff(off) < 0):
            raise ValueError(f"{name} is not a valid offset array")
    if np.any(np.diff(so) == 0):
        raise ValueError("stroke_offsets describes an empty stroke")
    if labels.shape != (sa.size - 1,):
        raise ValueError(f"labels must have shape ({sa.size - 1},), got {labels.shape}")
    if names.dtype.kind != "U" or names.ndim != 1:
        raise ValueError("class_names must be a 1-D unicode array")
    strokes = np.split(points, so[1:-1]) if so.size > 1 else []
    samples = [strokes[sa[i] : sa[i + 1]] for i in range(sa.size - 1)]
    return StrokeDataset(samples, labels, [str(n) for n in names])


_JSON_NUMBER = (int, float)  # what json.loads gives for numbers; bool is not one


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, _JSON_NUMBER):
        return "a number"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    return "a list" if isinstance(value, list) else type(value).__name__


def strokes_from_json(value: Any, name: str = "strokes") -> Strokes:
    """A stroke sample from parsed JSON, checked strictly.

    The sample must be a list of strokes, each a non-empty list of ``[x, y]``
    points whose coordinates are finite JSON numbers.  Nothing is reshaped: a
    missing or extra nesting level is an error, and strings (``"1.5"``) and
    booleans are not taken as numbers.  :func:`load_strokes` (``.jsonl``) and
    :func:`load_samples` read strokes with this function.

    Parameters
    ----------
    value : object
        What :func:`json.loads` returned for the sample.
    name : str
        Name of the sample in error messages.

    Returns
    -------
    list of numpy.ndarray
        float64 ``(n_i, 2)`` arrays.

    Raises
    ------
    ValueError
        Naming the first offending stroke or point and what was found there.
    """
    if not isinstance(value, list):
        raise ValueError(
            f"{name} must be a list of strokes [[x, y], ...], got {_json_kind(value)}"
        )
    out: Strokes = []
    for j, stroke in enumerate(value):
        if not isinstance(stroke, list) or not stroke:
            what = "an empty list" if isinstance(stroke, list) else _json_kind(stroke)
            raise ValueError(
                f"{name}[{j}] must be a stroke, a non-empty list of [x, y] points, got {what}"
            )
        for k, pt in enumerate(stroke):
            if (
                type(pt) is list
                and len(pt) == 2
                and type(pt[0]) in _JSON_NUMBER
                and type(pt[1]) in _JSON_NUMBER
            ):
                continue
            if isinstance(pt, _JSON_NUMBER) and not isinstance(pt, bool):
                hint = (
                    " (a nesting level is missing: a sample is a list of strokes, "
                    "a stroke a list of [x, y] points)"
                )
            elif isinstance(pt, list) and pt and isinstance(pt[0], list):
                hint = " of lists (one nesting level too many)"
            elif isinstance(pt, list) and len(pt) == 2:
                hint = f" holding {_json_kind(pt[0])} and {_json_kind(pt[1])}"
            elif isinstance(pt, list):
                hint = f" of {len(pt)} values"
            else:
                hint = ""
            raise ValueError(
                f"{name}[{j}][{k}] must be a point [x, y] of two numbers, got "
                f"{_json_kind(pt)}{hint}"
            )
        try:
            arr = np.array(stroke, dtype=np.float64)
        except OverflowError:
            raise ValueError(f"{name}[{j}] holds a number too large for float64") from None
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}[{j}] contains non-finite coordinates")
        out.append(arr)
    return out


def load_samples(path: str | os.PathLike[str]) -> list[Strokes]:
    """Unlabelled stroke samples (e.g. to classify) from a ``.json`` or ``.jsonl`` file.

    ``.json`` holds one sample ``[[[x, y], ...], ...]``, one object
    ``{"strokes": sample}``, or a list of such objects.  ``.jsonl`` holds one
    object with ``"strokes"`` per line (the format of :func:`load_strokes`;
    labels and a ``class_names`` line are ignored).  Strokes are checked with
    :func:`strokes_from_json`, as training data are.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is not valid JSON, holds no sample, or a sample is not a
        list of strokes (the message names the file and the sample).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".jsonl":
            docs = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"line {lineno}: invalid JSON ({exc.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"line {lineno}: expected a JSON object")
                if "strokes" in obj or "class_names" not in obj:
                    docs.append((f"line {lineno}", obj))
        else:
            doc = json.loads(text)
            if isinstance(doc, list) and doc and all(isinstance(d, dict) for d in doc):
                docs = [(f"sample {i}", d) for i, d in enumerate(doc)]
            elif isinstance(doc, list) and any(isinstance(d, dict) for d in doc):
                raise ValueError("a list mixing objects and strokes")
            else:
                docs = [("", doc)]
        samples = []
        for w, d in docs:
            if isinstance(d, dict):
                if "strokes" not in d:
                    raise ValueError(f"{w}: an object without 'strokes'")
                d = d["strokes"]
            try:
                samples.append(strokes_from_json(d))
            except ValueError as exc:
                raise ValueError(f"{w}: {exc}" if w else str(exc)) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON ({exc.msg}, line {exc.lineno} "
                         f"column {exc.colno})") from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{where} is not readable JSON: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not samples or all(len(smp) == 0 for smp in samples):
        raise ValueError(f"{where} holds no strokes")
    return samples


def _load_jsonl(path: Path) -> StrokeDataset:
    class_names: list[str] | None = None
    raw_labels: list[Any] = []
    samples: list[list[Any]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"line {lineno}: expected a JSON object")
            if "strokes" not in obj:
                if "class_names" in obj and class_names is None and not samples:
                    class_names = obj["class_names"]
                    if not isinstance(class_names, list) or not all(
                        isinstance(n, str) for n in class_names
                    ):
                        raise ValueError(f"line {lineno}: class_names must be a list of strings")
                    continue
                raise ValueError(f"line {lineno}: missing 'strokes'")
            if "label" not in obj:
                raise ValueError(f"line {lineno}: missing 'label'")
            label = obj["label"]
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise ValueError(f"line {lineno}: label must be an int or a str")
            try:
                samples.append(strokes_from_json(obj["strokes"]))
            except ValueError as exc:
                raise ValueError(f"line {lineno}: {exc}") from None
            raw_labels.append(label)
    kinds = {type(x) for x in raw_labels}
    if len(kinds) > 1:
        raise ValueError("labels mix integers and names")
    if class_names is None:
        if kinds == {str}:
            class_names = sorted(set(raw_labels))
        else:
            class_names = [str(i) for i in range(max(raw_labels, default=-1) + 1)]
    if kinds == {str}:
        lookup = {n: i for i, n in enumerate(class_names)}
        unknown = sorted({x for x in raw_labels if x not in lookup})
        if unknown:
            raise ValueError(f"labels {unknown[:5]} not in class_names")
        labels = [lookup[x] for x in raw_labels]
    else:
        labels = raw_labels
    return StrokeDataset(samples, np.asarray(labels, dtype=np.int64).reshape(-1), class_names)


# ---------------------------------------------------------------------------
# synthetic data
# ---------------------------------------------------------------------------
def _random_stroke(rng: np.random.Generator, points: int) -> np.ndarray:
    """A smooth random stroke: a cubic Bezier through random control points."""
    ctrl = rng.uniform(0.0, 1.0, size=(4, 2))
    t = np.linspace(0.0, 1.0, points)[:, None]
    u = 1.0 - t
    return u**3 * ctrl[0] + 3 * u * u * t * ctrl[1] + 3 * u * t * t * ctrl[2] + t**3 * ctrl[3]


def synthetic_strokes(
    n_classes: int,
    n_per_class: int,
    seed: int = 0,
    *,
    points_per_stroke: int = 24,
    prototype_seed: int = 0,
    augment: Mapping[str, float] | None = None,
) -> StrokeDataset:
    """A small synthetic handwriting-like dataset.

    Class ``k`` has a prototype of 2-4 smooth random strokes (cubic Bezier
    curves) drawn from ``numpy.random.default_rng([prototype_seed, k])`` and
    normalised to the unit box.  Samples are copies of the prototypes
    distorted with :func:`~sparsecnn.data.augment.augment` using a generator
    seeded with ``seed``.  Because prototypes depend only on
    ``prototype_seed``, datasets made with different ``seed`` values are
    independent draws of the *same* task (e.g. a train and a test set).
    Samples are ordered class by class.

    Parameters
    ----------
    n_classes, n_per_class : int
        Number of classes (``>= 1``) and samples per class (``>= 0``).
    seed : int
        Seed of the sample distortions.
    points_per_stroke : int
        Points per stroke (``>= 2``).
    prototype_seed : int
        Seed of the class prototypes.
    augment : mapping, optional
        Keyword arguments for :func:`~sparsecnn.data.augment.augment`; default
        ``dict(scale=0.08, stretch=0.08, shear=0.15, rotation=0.15,
        translation=0.04, stroke_jitter=0.02)``.

    Returns
    -------
    StrokeDataset
        ``n_classes * n_per_class`` samples; class names ``"class_0"`` ...
    """
    for name, value, minimum in (
        ("n_classes", n_classes, 1),
        ("n_per_class", n_per_class, 0),
        ("points_per_stroke", points_per_stroke, 2),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    kwargs = dict(
        scale=0.08, stretch=0.08, shear=0.15, rotation=0.15, translation=0.04, stroke_jitter=0.02
    )
    if augment is not None:
        kwargs.update(augment)
    rng = as_rng(seed, "seed")
    samples: list[Strokes] = []
    labels: list[int] = []
    for k in range(int(n_classes)):
        crng = np.random.default_rng([int(prototype_seed), k])
        n_strokes = int(crng.integers(2, 5))
        proto = normalize([_random_stroke(crng, int(points_per_stroke)) for _ in range(n_strokes)])
        for _ in range(int(n_per_class)):
            samples.append(augment_strokes(proto, rng, **kwargs))
            labels.append(k)
    return StrokeDataset._trusted(
        samples, np.asarray(labels, dtype=np.int64), [f"class_{k}" for k in range(int(n_classes))]
    )


# ---------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------
class Batch(NamedTuple):
    """A rendered mini-batch in sparse coordinate format.

    Attributes
    ----------
    coords : numpy.ndarray
        int32 ``(N, 3)``: ``(batch index, row, col)`` of every active pixel,
        sorted lexicographically.
    features : numpy.ndarray
        float32 ``(N, C)``.
    labels : numpy.ndarray
        int64 ``(B,)``.
    spatial_shape : tuple of int
        ``(size, size)``.
    batch_size : int
        ``B`` (number of samples in this batch).
    """

    coords: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    spatial_shape: tuple[int, int]
    batch_size: int

    def to_sparse(self) -> SparseTensor:
        """Wrap the batch as a :class:`sparsecnn.tensor.SparseTensor`."""
        from sparsecnn.tensor import SparseTensor

        return SparseTensor(
            self.coords, self.features, self.spatial_shape, batch_size=self.batch_size
        )


def collate(
    samples_rendered: Sequence[tuple[np.ndarray, np.ndarray, int]],
    spatial_shape: tuple[int, int] | None = None,
) -> Batch:
    """Stack rendered samples into a :class:`Batch`.

    Parameters
    ----------
    samples_rendered : sequence of (coords, feats, label)
        ``coords`` int ``(n_i, 2)`` (row, col) and ``feats`` ``(n_i, C)`` as
        returned by :func:`~sparsecnn.data.strokes.render`; ``label`` an int.
        All samples need the same ``C``.
    spatial_shape : (int, int), optional
        Grid shape; default ``(max row + 1, max col + 1)`` over the batch
        (pass it explicitly: a batch rarely touches the last row).

    Returns
    -------
    Batch
        Sample ``i`` gets batch index ``i``; if every sample's coords are
        sorted, so are the batch coords.
    """
    if isinstance(samples_rendered, (str, bytes)) or not isinstance(samples_rendered, Sequence):
        raise TypeError("samples_rendered must be a sequence of (coords, feats, label) tuples")
    if len(samples_rendered) == 0:
        raise ValueError("samples_rendered must not be empty")
    coords_list, feats_list, labels = [], [], []
    channels = None
    for i, item in enumerate(samples_rendered):
        if len(item) != 3:
            raise ValueError(f"samples_rendered[{i}] must be (coords, feats, label)")
        c, f, lab = item
        c = np.asarray(c)
        f = np.asarray(f)
        if c.ndim != 2 or c.shape[1] != 2 or f.ndim != 2 or f.shape[0] != c.shape[0]:
            raise ValueError(
                f"samples_rendered[{i}]: coords must be (n, 2) and feats (n, C), "
                f"got {c.shape} and {f.shape}"
            )
        if channels is None:
            channels = f.shape[1]
        elif f.shape[1] != channels:
            raise ValueError(
                f"samples_rendered[{i}] has {f.shape[1]} channels, expected {channels}"
            )
        coords_list.append(
            np.concatenate(
                [np.full((c.shape[0], 1), i, dtype=np.int32), c.astype(np.int32)], axis=1
            )
        )
        feats_list.append(f.astype(np.float32, copy=False))
        labels.append(int(lab))
    coords = np.concatenate(coords_list, axis=0)
    feats = np.concatenate(feats_list, axis=0)
    if spatial_shape is None:
        if coords.shape[0]:
            spatial_shape = (int(coords[:, 1].max()) + 1, int(coords[:, 2].max()) + 1)
        else:
            spatial_shape = (1, 1)
    spatial_shape = (int(spatial_shape[0]), int(spatial_shape[1]))
    return Batch(
        coords, feats, np.asarray(labels, dtype=np.int64), spatial_shape, len(samples_rendered)
    )


_DEFAULT_AUGMENT: dict[str, float] = {}


class _Stop:
    """Sentinel put on the queue when the producer is done."""


def _put(q: queue.Queue[Any], stop: threading.Event, item: Any) -> bool:
    """Put ``item`` on ``q`` unless ``stop`` gets set while waiting."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _produce(
    owner: BatchIterator,
    epoch: int,
    plan: list[np.ndarray],
    q: queue.Queue[Any],
    stop: threading.Event,
) -> None:
    # A plain function (not a method of _EpochIterator) so that the thread holds
    # no reference to the epoch iterator, which can then be garbage collected
    # (and its thread stopped) when the consumer drops it.
    try:
        for b, indices in enumerate(plan):
            if stop.is_set():
                return
            if not _put(q, stop, owner._make_batch(epoch, b, indices)):
                return
        _put(q, stop, _Stop)
    except BaseException as exc:  # forwarded to the consumer
        _put(q, stop, exc)


class _EpochIterator:
    """Iterator over the batches of one epoch, optionally produced by a thread."""

    def __init__(self, owner: BatchIterator, epoch: int) -> None:
        self._owner = owner
        self._epoch = epoch
        self._plan = owner._plan(epoch)
        self._next_index = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue[Any] | None = None
        self._stop = threading.Event()
        if owner.prefetch > 0 and self._plan:
            self._queue = queue.Queue(maxsize=owner.prefetch)
            self._thread = threading.Thread(
                target=_produce,
                args=(owner, epoch, self._plan, self._queue, self._stop),
                name=f"sparsecnn-BatchIterator-epoch{epoch}",
                daemon=True,
            )
            self._thread.start()

    def __iter__(self) -> _EpochIterator:
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        if self._thread is None:
            if self._next_index >= len(self._plan):
                self.close()
                raise StopIteration
            b = self._next_index
            self._next_index += 1
            return self._owner._make_batch(self._epoch, b, self._plan[b])
        assert self._queue is not None
        item = self._queue.get()
        if item is _Stop:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def __len__(self) -> int:
        return len(self._plan)

    def close(self) -> None:
        """Stop the producer thread (if any) and wait for it to finish."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._thread is not None:
            assert self._queue is not None
            # unblock a producer waiting on a full queue
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
            self._thread = None

    def __enter__(self) -> _EpochIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


class BatchIterator:
    """Render a :class:`StrokeDataset` into sparse mini-batches, epoch after epoch.

    Each ``iter(batch_iterator)`` runs one epoch and advances the epoch
    counter.  Batch order, augmentation and rendering depend only on
    ``(seed, epoch, batch index)``: the sample order of epoch ``e`` is a
    permutation from ``default_rng([seed, e])`` (identity if not shuffled) and
    batch ``b`` is augmented with ``default_rng([seed, e, b])``, so results are
    identical with or without the background thread.

    With ``prefetch > 0`` batches are produced by a background thread into a
    queue of at most ``prefetch`` batches, overlapping data preparation with
    the consumer's compute.  Stopping early (``break``, an exception,
    ``close()``, or dropping the epoch iterator) stops and joins the thread.

    Parameters
    ----------
    dataset : StrokeDataset
        Samples in the unit box.
    batch_size : int
        Samples per batch (``>= 1``).
    size : int
        Grid side; batches have ``spatial_shape == (size, size)``.
    scale : int, optional
        Character box in pixels (default ``(2 * size) // 3``), see
        :func:`~sparsecnn.data.strokes.render`.
    shuffle : bool
        Shuffle the sample order every epoch.
    seed : int
        Seed of shuffling and augmentation.
    augment : bool or mapping
        ``False``: no augmentation; ``True``: :func:`~sparsecnn.data.augment.augment`
        with its defaults; a mapping: keyword arguments for it.
    features : {"presence", "directions", "signature"}
        Pixel features, see :func:`~sparsecnn.data.strokes.render`.
    signature_depth : int
        Depth for ``features="signature"``.
    drop_last : bool
        Drop the last incomplete batch.
    prefetch : int
        Queue length of the background thread; ``0`` renders synchronously.
    normalize : bool
        Re-normalise each sample to the unit box with
        :func:`~sparsecnn.data.strokes.normalize` before augmentation.  Off by
        default: :func:`~sparsecnn.data.kanjivg.load_kanjivg` and
        :func:`synthetic_strokes` already give unit-box samples; turn it on for
        raw coordinates (e.g. a hand-made ``.jsonl`` file).
    start_epoch : int
        Value of the epoch counter for the first ``iter()``.
    shard : (rank, size), optional
        Data-parallel training: every planned batch of n samples is cut into ``size`` fixed
        contiguous slices (:func:`sparsecnn.distributed.shard_bounds`) and only slice
        ``rank`` is augmented and rendered, exactly as the whole batch would render those
        samples (the batch's generator is advanced past the samples before the slice). An
        empty slice (a batch smaller than ``size``) is given as ``None``.
    """

    def __init__(
        self,
        dataset: StrokeDataset,
        batch_size: int,
        *,
        size: int,
        scale: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        augment: bool | Mapping[str, float] = False,
        features: str = "presence",
        signature_depth: int = 2,
        drop_last: bool = False,
        prefetch: int = 2,
        normalize: bool = False,
        start_epoch: int = 0,
        shard: tuple[int, int] | None = None,
    ) -> None:
        if not isinstance(dataset, StrokeDataset):
            raise TypeError(f"dataset must be a StrokeDataset, got {type(dataset).__name__}")
        for name, value, minimum in (
            ("batch_size", batch_size, 1),
            ("size", size, 1),
            ("prefetch", prefetch, 0),
            ("seed", seed, 0),
            ("start_epoch", start_epoch, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        if features not in FEATURE_KINDS:
            raise ValueError(f"features must be one of {FEATURE_KINDS}, got {features!r}")
        self.channels = num_feature_channels(features, signature_depth)
        if augment is True:
            self.augment_kwargs: dict[str, float] | None = dict(_DEFAULT_AUGMENT)
        elif augment is False or augment is None:
            self.augment_kwargs = None
        elif isinstance(augment, Mapping):
            self.augment_kwargs = dict(augment)
            augment_strokes([np.zeros((1, 2))], 0, **self.augment_kwargs)  # validate early
        else:
            raise TypeError(
                "augment must be a bool or a dict of augment() arguments, "
                f"got {type(augment).__name__}"
            )
        # validate size/scale once
        render([np.zeros((1, 2))], int(size), scale)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.size = int(size)
        self.scale = scale
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.features = features
        self.signature_depth = signature_depth
        self.drop_last = bool(drop_last)
        self.prefetch = int(prefetch)
        self.normalize = bool(normalize)
        self.epoch = int(start_epoch)
        if shard is not None:
            r, n = (int(v) for v in shard)
            if not 0 <= r < n:
                raise ValueError(f"shard must be (rank, size) with 0 <= rank < size, got {shard}")
            shard = (r, n)
        self.shard = shard

    @property
    def spatial_shape(self) -> tuple[int, int]:
        """``(size, size)``."""
        return (self.size, self.size)

    def __len__(self) -> int:
        """Number of batches per epoch."""
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used by the next ``iter()``."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def _plan(self, epoch: int) -> list[np.ndarray]:
        n = len(self.dataset)
        order = (
            np.random.default_rng([self.seed, epoch]).permutation(n)
            if self.shuffle
            else np.arange(n)
        )
        return [
            order[i : i + self.batch_size]
            for i in range(0, len(self) * self.batch_size, self.batch_size)
        ]

    def render_sample(
        self, strokes: Strokes, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Normalise (if enabled), augment (if ``rng`` is given and augmentation is on), render."""
        if self.normalize:
            strokes = normalize(strokes)
        if rng is not None and self.augment_kwargs is not None:
            strokes = augment_strokes(strokes, rng, **self.augment_kwargs)
        return render(
            strokes,
            self.size,
            self.scale,
            features=self.features,  # type: ignore[arg-type]
            signature_depth=self.signature_depth,
        )

    def _make_batch(self, epoch: int, b: int, indices: np.ndarray) -> Batch | None:
        rng = (
            np.random.default_rng([self.seed, epoch, b])
            if self.augment_kwargs is not None
            else None
        )
        if self.shard is not None:
            r, size = self.shard
            lo, hi = (r * len(indices)) // size, ((r + 1) * len(indices)) // size
            if rng is not None:   # draw what the samples before the slice would draw
                for i in indices[:lo]:
                    strokes = self.dataset.samples[int(i)]
                    if self.normalize:
                        strokes = normalize(strokes)
                    augment_strokes(strokes, rng, **self.augment_kwargs)
            indices = indices[lo:hi]
            if len(indices) == 0:
                return None
        rendered = []
        for i in indices:
            coords, feats = self.render_sample(self.dataset.samples[int(i)], rng)
            rendered.append((coords, feats, int(self.dataset.labels[int(i)])))
        return collate(rendered, self.spatial_shape)

    def batches(self, epoch: int) -> _EpochIterator:
        """Iterator over the batches of a given epoch (does not touch the counter)."""
        return _EpochIterator(self, int(epoch))

    def __iter__(self) -> _EpochIterator:
        it = _EpochIterator(self, self.epoch)
        self.epoch += 1
        return it
