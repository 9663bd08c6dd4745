"""Data pipeline for online handwriting: strokes, rendering, augmentation, datasets.

Public API
----------
Strokes and rendering (:mod:`sparsecnn.data.strokes`)
    :func:`normalize`, :func:`render`, :func:`rasterize`,
    :func:`num_feature_channels`, :func:`segment_signature`,
    :func:`run_signatures`,
    :func:`chen_product`, :func:`path_signature`
Augmentation (:mod:`sparsecnn.data.augment`)
    :func:`random_affine`, :func:`apply_affine`, :func:`augment`
Datasets (:mod:`sparsecnn.data.dataset`)
    :class:`StrokeDataset`, :func:`save_strokes`, :func:`load_strokes`,
    :func:`load_samples`, :func:`strokes_from_json`,
    :func:`synthetic_strokes`, :class:`Batch`, :func:`collate`,
    :class:`BatchIterator`
KanjiVG (:mod:`sparsecnn.data.kanjivg`)
    :func:`parse_svg_path`, :func:`load_character`, :func:`kanjivg_dir`,
    :func:`load_kanjivg`, :func:`load_kanjivg_variants`
"""

from .augment import apply_affine, augment, random_affine
from .dataset import (
    Batch,
    BatchIterator,
    StrokeDataset,
    collate,
    load_samples,
    load_strokes,
    save_strokes,
    strokes_from_json,
    synthetic_strokes,
)
from .kanjivg import (
    kanjivg_dir,
    kanjivg_index,
    load_character,
    load_kanjivg,
    load_kanjivg_variants,
    parse_svg_path,
)
from .strokes import (
    FEATURE_KINDS,
    Strokes,
    as_strokes,
    chen_product,
    default_scale,
    normalize,
    num_feature_channels,
    path_signature,
    rasterize,
    render,
    run_signatures,
    segment_signature,
)

__all__ = [
    "FEATURE_KINDS",
    "Strokes",
    "as_strokes",
    "normalize",
    "default_scale",
    "rasterize",
    "render",
    "num_feature_channels",
    "segment_signature",
    "run_signatures",
    "chen_product",
    "path_signature",
    "random_affine",
    "apply_affine",
    "augment",
    "StrokeDataset",
    "save_strokes",
    "load_strokes",
    "load_samples",
    "strokes_from_json",
    "synthetic_strokes",
    "Batch",
    "collate",
    "BatchIterator",
    "parse_svg_path",
    "load_character",
    "kanjivg_dir",
    "kanjivg_index",
    "load_kanjivg",
    "load_kanjivg_variants",
]
