"""Tests of the data pipeline: rendering, signatures, augmentation, SVG, datasets, batching."""

from __future__ import annotations

import gc
import json
import re
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from sparsecnn.data import (
    Batch,
    BatchIterator,
    StrokeDataset,
    apply_affine,
    augment,
    chen_product,
    collate,
    default_scale,
    load_character,
    load_kanjivg,
    load_kanjivg_variants,
    load_samples,
    load_strokes,
    normalize,
    num_feature_channels,
    parse_svg_path,
    path_signature,
    random_affine,
    rasterize,
    render,
    run_signatures,
    save_strokes,
    segment_signature,
    strokes_from_json,
    synthetic_strokes,
)
from sparsecnn.data import kanjivg as kv

FIXTURES = Path(__file__).parent / "fixtures" / "kanjivg"


def line(*pts: tuple[float, float]) -> np.ndarray:
    return np.array(pts, dtype=np.float64)


def eight_connected(coords: np.ndarray) -> bool:
    """True if the pixel set is one 8-connected component."""
    pixels = {tuple(c) for c in coords.tolist()}
    if not pixels:
        return True
    todo = [next(iter(pixels))]
    seen = {todo[0]}
    while todo:
        r, c = todo.pop()
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                q = (r + dr, c + dc)
                if q in pixels and q not in seen:
                    seen.add(q)
                    todo.append(q)
    return len(seen) == len(pixels)


# ---------------------------------------------------------------------------
# strokes: normalisation and rendering
# ---------------------------------------------------------------------------
def test_normalize_unit_box_keeps_aspect_and_centres():
    s = normalize([line((10, 20), (30, 20)), line((20, 25), (20, 30))])
    pts = np.concatenate(s)
    assert pts.min(axis=0) == pytest.approx([0.0, 0.25])
    assert pts.max(axis=0) == pytest.approx([1.0, 0.75])
    # a single point goes to the centre
    assert normalize([line((3, 4))])[0] == pytest.approx(np.array([[0.5, 0.5]]))
    assert normalize([]) == []


def test_as_strokes_errors_name_argument():
    with pytest.raises(TypeError, match="strokes"):
        render(np.zeros((3, 2)), 8)
    with pytest.raises(ValueError, match=r"strokes\[0\]"):
        render([np.zeros((3, 3))], 8)
    with pytest.raises(ValueError, match="no points"):
        render([np.zeros((0, 2))], 8)
    with pytest.raises(ValueError, match="non-finite"):
        render([line((0, np.nan))], 8)
    with pytest.raises(ValueError, match="scale"):
        render([line((0, 0))], 8, 9)
    with pytest.raises(ValueError, match="features"):
        render([line((0, 0))], 8, features="colour")
    with pytest.raises(TypeError, match="size"):
        render([line((0, 0))], 8.0)


def test_diagonal_line_exact_pixels():
    coords, feats = render([line((0, 0), (1, 1))], 5, 5)
    assert coords.tolist() == [[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]]
    assert coords.dtype == np.int32 and feats.dtype == np.float32
    assert feats.shape == (5, 1) and np.all(feats == 1)
    # a long diagonal: one pixel per column, 8-connected
    coords, _ = render([line((0, 0), (1, 1))], 40, 32)
    assert len(coords) == 32 and eight_connected(coords)
    # anti-diagonal in a 7 grid with a 5 pixel box (offset 1)
    coords, _ = render([line((1, 0), (0, 1))], 7, 5)
    assert coords.tolist() == [[1, 5], [2, 4], [3, 3], [4, 2], [5, 1]]


def test_shallow_line_hand_checked():
    # x 0..4, y 0..2 : samples (0,0) (1,.5) (2,1) (3,1.5) (4,2); .5 rounds up
    coords, _ = render([line((0, 0), (1, 0.5))], 5, 5)
    assert coords.tolist() == [[0, 0], [1, 1], [1, 2], [2, 3], [2, 4]]


def test_polyline_corner_and_single_point():
    coords, _ = render([line((0, 0), (1, 0), (1, 1))], 5, 5)
    assert len(coords) == 9  # 5 + 5 - shared corner
    assert eight_connected(coords)
    coords, feats = render([line((0.5, 0.5))], 9, 9)
    assert coords.tolist() == [[4, 4]] and feats.tolist() == [[1.0]]
    # two strokes sharing no pixel, empty sample
    coords, _ = render([line((0, 0)), line((1, 1))], 5, 5)
    assert coords.tolist() == [[0, 0], [4, 4]]
    coords, feats = render([], 5, features="signature")
    assert coords.shape == (0, 2) and feats.shape == (0, 7)


def test_default_scale_and_centring():
    assert default_scale(96) == 64
    coords, _ = render([line((0, 0)), line((1, 1)), line((0.5, 0.5))], 96)
    # box of 64 pixels starting at (96 - 64) // 2 = 16
    assert coords.tolist() == [[16, 16], [48, 48], [79, 79]]
    # row = y, col = x
    coords, _ = render([line((1, 0))], 96)
    assert coords.tolist() == [[16, 79]]


def test_out_of_grid_points_are_clipped():
    coords, _ = render([line((2.0, -1.0))], 10, 8)
    assert coords.tolist() == [[0, 9]]
    coords, _ = render([line((-5, 0.5), (5, 0.5))], 10, 8)
    assert coords[:, 1].min() == 0 and coords[:, 1].max() == 9
    assert len(coords) == 10


def test_random_strokes_connected_sorted_unique():
    rng = np.random.default_rng(1)
    for _ in range(30):
        stroke = rng.uniform(-0.1, 1.1, size=(int(rng.integers(1, 12)), 2))
        for kind in ("presence", "directions", "signature"):
            coords, feats = render([stroke], 48, features=kind)
            assert eight_connected(coords)
            flat = coords[:, 0].astype(np.int64) * 48 + coords[:, 1]
            assert np.all(np.diff(flat) > 0)  # unique and lexicographically sorted
            assert feats.shape == (len(coords), num_feature_channels(kind))
            assert coords.min() >= 0 and coords.max() < 48
        # consecutive pieces move at most one pixel
        pix, _, _ = rasterize([stroke], 48)
        assert np.abs(np.diff(pix, axis=0)).max(initial=0) <= 1


def test_feature_channel_counts():
    s = [line((0.1, 0.2), (0.8, 0.9))]
    assert render(s, 16, features="presence")[1].shape[1] == 1
    assert render(s, 16, features="directions")[1].shape[1] == 9
    assert render(s, 16, features="signature")[1].shape[1] == 7
    assert render(s, 16, features="signature", signature_depth=3)[1].shape[1] == 15
    assert render(s, 16, features="signature", signature_depth=1)[1].shape[1] == 3
    with pytest.raises(ValueError, match="signature_depth"):
        render(s, 16, features="signature", signature_depth=4)


def test_direction_histogram():
    # horizontal (bin 0), downward (bin 2; y points down), diagonal down-right (bin 1)
    cases = [
        ((0, 0.5), (1, 0.5), 0),
        ((0.5, 0), (0.5, 1), 2),
        ((0, 0), (1, 1), 1),
        ((1, 0.5), (0, 0.5), 4),
        ((0.5, 1), (0.5, 0), 6),
    ]
    for p0, p1, b in cases:
        _, f = render([line(p0, p1)], 9, 9, features="directions")
        expected = np.zeros(8)
        expected[b] = 1.0
        assert np.allclose(f[:, 0], 1)
        assert np.allclose(f[:, 1:], expected)
    # corner pixel splits evenly between right and down
    coords, f = render([line((0, 0), (1, 0), (1, 1))], 5, 5, features="directions")
    corner = coords.tolist().index([0, 4])
    assert f[corner, 1:].tolist() == pytest.approx([0.5, 0, 0.5, 0, 0, 0, 0, 0])
    assert np.allclose(f[:, 1:].sum(axis=1), 1)
    # a single point has no direction
    _, f = render([line((0.5, 0.5))], 5, features="directions")
    assert f.tolist() == [[1.0] + [0.0] * 8]


# ---------------------------------------------------------------------------
# signatures
# ---------------------------------------------------------------------------
def test_segment_signature_closed_form():
    d = np.array([0.3, -0.7])
    s = segment_signature(d, 3)
    assert s[0] == 1 and s[1:3] == pytest.approx(d)
    assert s[3:7] == pytest.approx((np.outer(d, d) / 2).ravel())
    assert s[7:15] == pytest.approx((np.einsum("i,j,k->ijk", d, d, d) / 6).ravel())


def test_chen_identity_straight_line_and_polyline():
    rng = np.random.default_rng(2)
    d = rng.normal(size=2)
    # splitting a straight line into pieces and composing gives exp(d)
    fractions = np.array([0.1, 0.25, 0.4, 0.25])
    sig = segment_signature(np.zeros(2), 3)
    for f in fractions:
        sig = chen_product(sig, segment_signature(f * d, 3), 3)
    assert sig == pytest.approx(segment_signature(d, 3))
    # path_signature agrees with run_signatures for a polyline
    pts = np.cumsum(rng.normal(size=(6, 2)), axis=0)
    inc = np.diff(pts, axis=0)
    runs = run_signatures(inc, np.array([True, False, False, False, False]), 3)
    assert runs[0] == pytest.approx(path_signature(pts, 3))
    # level 2 antisymmetric part is the Levy area: for an L-shaped path (1,0)(0,1)
    sig = path_signature(line((0, 0), (1, 0), (1, 1)), 2)
    assert sig[3:7] == pytest.approx([0.5, 1.0, 0.0, 0.5])


def test_rendered_signature_straight_segment_in_one_pixel():
    # a segment of (0.2, 0.1) pixels inside pixel (5, 5) of an 11 x 11 box
    coords, f = render(
        [line((0.5, 0.5), (0.52, 0.51))], 11, 11, features="signature", signature_depth=3
    )
    assert coords.tolist() == [[5, 5]]
    expected = segment_signature(np.array([0.2, 0.1]), 3)
    assert f[0] == pytest.approx(expected.astype(np.float32), rel=1e-5, abs=1e-7)


def test_rendered_signature_chen_and_additivity():
    strokes = [line((0.1, 0.1), (0.9, 0.3), (0.4, 0.8)), line((0.2, 0.9), (0.8, 0.6))]
    size = 32
    coords, f = render(strokes, size, features="signature", signature_depth=3)
    # level 1 is additive: the sum over pixels is the total displacement (pixel units)
    scale = default_scale(size)
    total = sum((s[-1] - s[0]) for s in strokes) * (scale - 1)
    assert f[:, 1:3].sum(axis=0) == pytest.approx(total, rel=1e-5)
    # each pixel visit is the Chen product of its pieces: recompute from rasterize
    pix, inc, stroke_idx = rasterize(strokes, size)
    flat = pix[:, 0] * size + pix[:, 1]
    start = np.r_[True, (flat[1:] != flat[:-1]) | (stroke_idx[1:] != stroke_idx[:-1])]
    run_id = np.cumsum(start) - 1
    expected = {}
    for r in range(run_id[-1] + 1):
        sig = segment_signature(np.zeros(2), 3)
        for d in inc[run_id == r]:
            sig = chen_product(sig, segment_signature(d, 3), 3)
        key = int(flat[run_id == r][0])
        expected[key] = expected.get(key, 0) + sig[1:]
    for (r, c), feat in zip(coords.tolist(), f, strict=True):
        assert feat[1:] == pytest.approx(expected[r * size + c], rel=1e-4, abs=1e-6)
    assert np.all(f[:, 0] == 1)


def test_straight_line_signature_whole_path_via_chen():
    # composing all pieces of a straight stroke (all pixels, in order) gives exp(d)
    stroke = line((0.05, 0.1), (0.95, 0.6))
    pix, inc, _ = rasterize([stroke], 40)
    sig = segment_signature(np.zeros(2), 3)
    for d in inc:
        sig = chen_product(sig, segment_signature(d, 3), 3)
    d_total = (stroke[1] - stroke[0]) * (default_scale(40) - 1)
    assert sig == pytest.approx(segment_signature(d_total, 3))


# ---------------------------------------------------------------------------
# augmentation
# ---------------------------------------------------------------------------
def test_random_affine_composition_and_seeding():
    m1 = random_affine(np.random.default_rng(5))
    m2 = random_affine(np.random.default_rng(5))
    assert m1.shape == (2, 3) and m1.dtype == np.float64
    assert np.array_equal(m1, m2)
    rng = np.random.default_rng(5)
    s, e, h, th = (rng.uniform(-a, a) for a in (0.1, 0.1, 0.2, 0.2))
    t = rng.uniform(-0.05, 0.05, size=2)
    R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    A = R @ np.array([[1, h], [0, 1]]) @ np.diag([1 + e, 1 - e]) @ ((1 + s) * np.eye(2))
    assert m1[:, :2] == pytest.approx(A) and m1[:, 2] == pytest.approx(t)
    # zero amplitudes give the identity
    ident = random_affine(0, scale=0, stretch=0, shear=0, rotation=0, translation=0)
    assert np.array_equal(ident, np.eye(2, 3))
    with pytest.raises(ValueError, match="scale"):
        random_affine(0, scale=1.5)
    with pytest.raises(ValueError, match="rotation"):
        random_affine(0, rotation=-1)
    with pytest.raises(TypeError, match="rng"):
        random_affine("seed")


def test_apply_affine_maps_points_exactly():
    m = np.array([[2.0, 0.5, 0.1], [-0.3, 1.5, -0.2]])
    pts = np.array([[0.5, 0.5], [0.0, 0.0], [1.0, 0.25]])
    out = apply_affine([pts, pts[:1]], m)
    expected = (pts - 0.5) @ m[:, :2].T + 0.5 + m[:, 2]
    assert out[0] == pytest.approx(expected)
    assert out[0][0] == pytest.approx([0.6, 0.3])  # the centre only moves by t
    assert len(out) == 2 and out[1] == pytest.approx(expected[:1])
    with pytest.raises(ValueError, match="matrix"):
        apply_affine([pts], np.eye(2))


def test_augment_seeded_and_structure():
    sample = [line((0.1, 0.1), (0.9, 0.9)), line((0.2, 0.8), (0.8, 0.2), (0.5, 0.5))]
    a = augment(sample, np.random.default_rng(3))
    b = augment(sample, np.random.default_rng(3))
    c = augment(sample, np.random.default_rng(4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.allclose(a[0], c[0])
    assert [s.shape for s in a] == [s.shape for s in sample]
    # without jitter, augment == apply_affine(random_affine) for the same stream
    a = augment(sample, np.random.default_rng(9), stroke_jitter=0.0, rotation=0.5)
    m = random_affine(np.random.default_rng(9), rotation=0.5)
    assert all(np.allclose(x, y) for x, y in zip(a, apply_affine(sample, m), strict=True))
    # jitter translates each stroke rigidly
    a = augment(
        sample, 1, stroke_jitter=0.05, scale=0, stretch=0, shear=0, rotation=0, translation=0
    )
    for x, y in zip(a, sample, strict=True):
        shift = x - y
        assert np.allclose(shift, shift[0]) and np.all(np.abs(shift) <= 0.05)
    with pytest.raises(TypeError, match="wobble"):
        augment(sample, 0, wobble=1.0)


# ---------------------------------------------------------------------------
# SVG paths and KanjiVG
# ---------------------------------------------------------------------------
def test_parse_lines_absolute_relative_and_implicit():
    spu = 1.0
    (p,) = parse_svg_path("M1,2 L4,6", spu)  # length 5 -> 5 intervals
    assert p[0].tolist() == [1, 2] and p[-1].tolist() == [4, 6] and len(p) == 6
    (q,) = parse_svg_path("m1,2 l3,4", spu)
    assert np.allclose(p, q)
    # implicit repeats: after M they are lines; repeated l
    (p,) = parse_svg_path("M0 0 3 0 3 4", spu)
    (q,) = parse_svg_path("m0 0 3 0 0 4", spu)
    (r,) = parse_svg_path("M0,0L3,0L3,4", spu)
    assert np.allclose(p, q) and np.allclose(p, r)
    assert len(p) == 8 and p[3].tolist() == [3, 0]
    # H / V absolute and relative
    (p,) = parse_svg_path("M1 1 H4 V3 h-2 v-1", spu)
    corners = p[[0, 3, 5, 7, 8]]
    assert corners.tolist() == [[1, 1], [4, 1], [4, 3], [2, 3], [2, 2]]
    # Z closes to the subpath start; a new subpath after Z starts there
    parts = parse_svg_path("M0 0 h2 v2 z l1 1", spu)
    assert len(parts) == 2
    assert parts[0][-1].tolist() == [0, 0]
    assert parts[1][0].tolist() == [0, 0] and parts[1][-1].tolist() == [1, 1]
    # lone moveto
    parts = parse_svg_path("M5 5 M1 1 2 1", spu)
    assert parts[0].tolist() == [[5, 5]] and parts[1].tolist() == [[1, 1], [2, 1]]


def test_parse_number_formats():
    (p,) = parse_svg_path("M1.5-2.3L.5.5", 0.01)
    assert p.tolist() == [[1.5, -2.3], [0.5, 0.5]]
    (p,) = parse_svg_path("M1e1,2E-1 l-1.5e0 +3", 0.01)
    assert p == pytest.approx(np.array([[10.0, 0.2], [8.5, 3.2]]))
    (p,) = parse_svg_path("  M 1 , 2\n\tL3 4  ", 0.01)
    assert p.tolist() == [[1, 2], [3, 4]]


def test_parse_errors():
    with pytest.raises(ValueError, match="position"):
        parse_svg_path("M1 2 X3 4")
    with pytest.raises(ValueError, match="needs 6"):
        parse_svg_path("M0 0 C1 2 3")
    with pytest.raises(ValueError, match="start with a command"):
        parse_svg_path("1 2")
    with pytest.raises(ValueError, match="not supported"):
        parse_svg_path("M0 0 A1 1 0 0 1 2 2")
    with pytest.raises(TypeError, match="d must be"):
        parse_svg_path(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="samples_per_unit"):
        parse_svg_path("M0 0", 0)


def _bezier(c: np.ndarray, t: np.ndarray) -> np.ndarray:
    t = t[:, None]
    return (
        (1 - t) ** 3 * c[0] + 3 * (1 - t) ** 2 * t * c[1] + 3 * (1 - t) * t**2 * c[2] + t**3 * c[3]
    )


def _dist_to_curve(points: np.ndarray, ctrl: np.ndarray) -> float:
    dense = _bezier(ctrl, np.linspace(0, 1, 20001))
    return max(np.min(np.hypot(*(dense - p).T)) for p in points)


def test_parse_cubic_arc_length_spacing():
    ctrl = np.array([[0.0, 0.0], [0.0, 40.0], [60.0, -20.0], [60.0, 20.0]])
    (p,) = parse_svg_path("M0 0 C0 40 60 -20 60 20", 0.5)
    assert p[0].tolist() == [0, 0] and p[-1].tolist() == [60, 20]
    gaps = np.hypot(*np.diff(p, axis=0).T)
    assert gaps.max() / gaps.min() < 1.05  # uniform along arc length
    assert gaps.mean() == pytest.approx(2.0, rel=0.05)
    assert _dist_to_curve(p, ctrl) < 1e-2  # points lie on the curve
    # relative form
    (q,) = parse_svg_path("m0 0 c0 40 60 -20 60 20", 0.5)
    assert np.allclose(p, q)


def test_parse_smooth_cubic_reflects_control_point():
    (p,) = parse_svg_path("M0 0 C0 10 10 10 10 0 S20 -10 20 0", 2.0)
    ctrl2 = np.array([[10.0, 0.0], [10.0, -10.0], [20.0, -10.0], [20.0, 0.0]])
    second = p[p[:, 0] >= 10]
    assert _dist_to_curve(second, ctrl2) < 1e-2
    (q,) = parse_svg_path("M0 0 c0 10 10 10 10 0 s10 -10 10 0", 2.0)
    assert np.allclose(p, q)
    # S after a non-cubic: first control point is the current point
    (p,) = parse_svg_path("M0 0 L10 0 S20 10 20 0", 2.0)
    ctrl = np.array([[10.0, 0.0], [10.0, 0.0], [20.0, 10.0], [20.0, 0.0]])
    assert _dist_to_curve(p[p[:, 0] > 10], ctrl) < 1e-2
    # implicit repeat of c
    (a,) = parse_svg_path("M0 0 c1 2 3 2 4 0 1 -2 3 -2 4 0", 1.0)
    (b,) = parse_svg_path("M0 0 c1 2 3 2 4 0 c1 -2 3 -2 4 0", 1.0)
    assert np.allclose(a, b) and a[-1].tolist() == [8, 0]


def test_parse_quadratic():
    (p,) = parse_svg_path("M0 0 Q5 10 10 0 T20 0", 1.0)
    c1 = np.array([[0, 0], [10 / 3, 20 / 3], [20 / 3, 20 / 3], [10, 0]], dtype=float)
    assert _dist_to_curve(p[p[:, 0] <= 10], c1) < 1e-2
    assert p[-1].tolist() == [20, 0] and p[:, 1].min() < -4  # the T half bends the other way


@pytest.mark.parametrize("name", ["04e00.svg", "04e4b.svg", "04e4b-Kaisho.svg"])
def test_fixture_characters(name):
    path = FIXTURES / name
    text = path.read_text(encoding="utf-8")
    assert "Ulrich Apel" in text and "Creative Commons" in text  # licence header kept
    n_paths = sum(1 for e in ET.parse(path).getroot().iter() if e.tag.endswith("}path"))
    strokes = load_character(path)
    assert len(strokes) == n_paths and n_paths >= 1
    pts = np.concatenate(strokes)
    assert pts.min() >= -1e-12 and pts.max() <= 1 + 1e-12
    assert np.isclose(pts.max(axis=0) - pts.min(axis=0), 1.0).any()
    coords, _ = render(strokes, 64)
    for s in strokes:
        assert eight_connected(render([s], 64)[0])
    assert len(coords) > 20


def test_fixture_orientation_and_order():
    # 之: first stroke is the short dot at the top; y points down
    strokes = load_character(FIXTURES / "04e4b.svg")
    assert len(strokes) == 3
    assert strokes[0][:, 1].mean() < strokes[2][:, 1].mean()
    # 一: one horizontal stroke drawn left to right
    (s,) = load_character(FIXTURES / "04e00.svg")
    assert s[0, 0] < s[-1, 0]
    # returned arrays are fresh copies (cache stays intact)
    s[:] = 0
    assert load_character(FIXTURES / "04e00.svg")[0].max() > 0


def test_load_kanjivg_from_fixture_directory():
    ds = load_kanjivg(None, directory=FIXTURES)
    assert ds.class_names == ["一", "之"] and ds.labels.tolist() == [0, 1]
    var = load_kanjivg_variants(ds, directory=FIXTURES)
    assert len(var) == 1 and var.labels.tolist() == [1] and var.class_names == ds.class_names
    assert len(var.samples[0]) == 3
    assert len(load_kanjivg_variants(ds, kinds=("HzFst",), directory=FIXTURES)) == 0
    both = load_kanjivg(2, directory=FIXTURES, variants=True)
    assert both.labels.tolist() == [0, 1, 1]
    sel = load_kanjivg(select=["之"], directory=FIXTURES)
    assert sel.class_names == ["之"] and len(sel) == 1
    with pytest.raises(ValueError, match="only 2"):
        load_kanjivg(3, directory=FIXTURES)
    with pytest.raises(ValueError, match="no KanjiVG base file"):
        load_kanjivg(select="人", directory=FIXTURES)
    with pytest.raises(ValueError, match="select"):
        load_kanjivg(select="second", directory=FIXTURES)
    with pytest.raises(ValueError, match="no characters"):
        load_kanjivg(select="kana", classes=None, directory=FIXTURES)


def test_kanjivg_dir_missing(monkeypatch):
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(kv.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install sparsecnn\[kanji\]"):
        kv.kanjivg_dir()


def _kanjivg_available() -> bool:
    try:
        kv.kanjivg_dir()
    except FileNotFoundError:
        return False
    return True


needs_kanjivg = pytest.mark.skipif(
    not _kanjivg_available(), reason="KanjiVG data not installed (pip install kanjivg)"
)


@needs_kanjivg
def test_installed_kanjivg_first_and_kana():
    ds = load_kanjivg(50)
    assert len(ds) == 50 and ds.class_names[0] == "一"
    assert all(0x4E00 <= ord(c) <= 0x9FFF for c in ds.class_names)
    assert [ord(c) for c in ds.class_names] == sorted(ord(c) for c in ds.class_names)
    assert ds.labels.tolist() == list(range(50))
    kana = load_kanjivg(10, select="kana")
    assert kana.class_names[1] == "あ"
    var = load_kanjivg_variants(ds, kinds=("Kaisho",))
    assert len(var) > 0 and set(var.labels.tolist()) <= set(range(50))
    base, variants = kv.kanjivg_index()
    assert "一" in base and all(
        "Kaisho" in sfx
        for c in ds.class_names[:50]
        for sfx, _ in variants.get(c, ())
        if sfx.startswith("Kaisho")
    )


@needs_kanjivg
def test_installed_kanjivg_loads_quickly():
    t0 = time.perf_counter()
    ds = load_kanjivg(300)
    assert time.perf_counter() - t0 < 5.0
    assert len(ds) == 300 and all(len(s) >= 1 for s in ds.samples)


# ---------------------------------------------------------------------------
# datasets and files
# ---------------------------------------------------------------------------
def small_dataset() -> StrokeDataset:
    samples = [
        [line((0.1, 0.2), (0.9, 0.8))],
        [line((0.5, 0.5))],
        [line((0.0, 0.0), (1.0, 0.0), (1.0, 1.0)), line((0.3, 0.7), (0.6, 0.2))],
    ]
    return StrokeDataset(samples, [2, 0, 1], ["zero", "one", "二"])


def test_dataset_basics():
    ds = small_dataset()
    assert len(ds) == 3 and ds.num_classes == 3 and ds.labels.dtype == np.int64
    strokes, label = ds[2]
    assert label == 1 and len(strokes) == 2
    sub = ds.subset([2, 0])
    assert sub.labels.tolist() == [1, 2] and sub.class_names == ds.class_names
    assert ds[1:].labels.tolist() == [0, 1]
    assert StrokeDataset([[line((0, 0))]], [3]).class_names == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match="labels"):
        StrokeDataset([[line((0, 0))]], [5], ["a"])
    with pytest.raises(ValueError, match="labels"):
        StrokeDataset([[line((0, 0))]], [0, 1])
    with pytest.raises(ValueError, match="unique"):
        StrokeDataset([[line((0, 0))]], [0], ["a", "a"])
    with pytest.raises(IndexError):
        ds[3]


def test_dataset_split():
    ds = synthetic_strokes(4, 10, seed=0)
    a, b = ds.split(0.7, seed=1)
    assert len(a) == 28 and len(b) == 12
    assert np.bincount(a.labels).tolist() == [7, 7, 7, 7]
    a2, _ = ds.split(0.7, seed=1)
    assert np.array_equal(a.labels, a2.labels)
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a.samples, a2.samples, strict=True))
    ids = {id(s) for s in a.samples} | {id(s) for s in b.samples}
    assert len(ids) == 40
    c, d = ds.split(0.25, seed=3, stratify=False)
    assert len(c) == 10 and len(d) == 30
    with pytest.raises(ValueError, match="fraction"):
        ds.split(1.5)


@pytest.mark.parametrize("ext", [".npz", ".jsonl"])
def test_save_load_round_trip(tmp_path, ext):
    ds = small_dataset()
    path = tmp_path / f"data{ext}"
    save_strokes(ds, path)
    back = load_strokes(path)
    assert back.class_names == ds.class_names
    assert np.array_equal(back.labels, ds.labels)
    assert len(back) == len(ds)
    for s1, s2 in zip(ds.samples, back.samples, strict=True):
        assert len(s1) == len(s2)
        for a, b in zip(s1, s2, strict=True):
            assert b.dtype == np.float64 and a.shape == b.shape
            assert np.allclose(a, b, atol=1e-6)
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as data:
            assert data["points"].dtype == np.float32
            assert data["stroke_offsets"].tolist() == [0, 2, 3, 6, 8]
            assert data["sample_offsets"].tolist() == [0, 1, 2, 4]
            assert data["class_names"].dtype.kind == "U"


def test_jsonl_hand_written_without_header(tmp_path):
    path = tmp_path / "hand.jsonl"
    path.write_text(
        '{"label": "b", "strokes": [[[0, 0], [1, 1]]]}\n\n'
        '{"label": "a", "strokes": [[[0.5, 0.5]], [[0, 1], [1, 0]]]}\n',
        encoding="utf-8",
    )
    ds = load_strokes(path)
    assert ds.class_names == ["a", "b"] and ds.labels.tolist() == [1, 0]
    path.write_text('{"label": 2, "strokes": [[[0, 0]]]}\n', encoding="utf-8")
    ds = load_strokes(path)
    assert ds.class_names == ["0", "1", "2"] and ds.labels.tolist() == [2]


@pytest.mark.parametrize(
    "name, content",
    [
        ("bad.npz", b"this is not a zip file"),
        (
            "bad.jsonl",
            b'{"label": 0, "strokes": [[[0, 0]]]}\n{"label": 0, "strokes": [[[0, 0, 0]]]}\n',
        ),
        ("bad2.jsonl", b"{not json}\n"),
        ("bad3.jsonl", b'{"label": 0}\n'),
        ("bad4.jsonl", b'{"class_names": ["a"]}\n{"label": "b", "strokes": [[[0, 0]]]}\n'),
        ("bad5.jsonl", b"\xff\xfe\x00garbage"),
    ],
)
def test_corrupt_files_raise_value_error_naming_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=name):
        load_strokes(path)


# ---------------------------------------------------------------------------
# strokes read from JSON: strict, nothing reshaped, no strings or booleans as numbers
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, where, what",
    [
        ([[1, 2], [3, 4]], r"strokes\[0\]\[0\]", "nesting level is missing"),
        ([[[[1, 2], [3, 4]]]], r"strokes\[0\]\[0\]", "one nesting level too many"),
        ([[["1.5", 2]]], r"strokes\[0\]\[0\]", "a string and a number"),
        ([[[0, 0], [True, 1]]], r"strokes\[0\]\[1\]", "a boolean and a number"),
        ([[[0, 0, 0]]], r"strokes\[0\]\[0\]", "of 3 values"),
        ([[[0, None]]], r"strokes\[0\]\[0\]", "null"),
        ([[]], r"strokes\[0\]", "empty list"),
        ([[[0, 0]], 5], r"strokes\[1\]", "got a number"),
        ({"x": 1}, "strokes", "got an object"),
        ([[[1e308 * 10, 0]]], r"strokes\[0\]", "non-finite"),
        ([[[10**400, 0]]], r"strokes\[0\]", "too large"),
    ],
)
def test_strokes_from_json_refuses_what_it_would_have_to_guess(value, where, what):
    with pytest.raises(ValueError, match=where) as info:
        strokes_from_json(value)
    assert what in str(info.value)


def test_strokes_from_json_keeps_the_structure():
    got = strokes_from_json([[[0, 1], [2.5, 3]], [[4, 5]]])
    assert [s.dtype for s in got] == [np.float64, np.float64]
    assert [s.tolist() for s in got] == [[[0, 1], [2.5, 3]], [[4, 5]]]
    assert strokes_from_json([]) == []


@pytest.mark.parametrize(
    "strokes",
    ['[[["0.5", "0.5"]]]', "[[[true, false]]]", "[[[0, 0], [1, true]]]", "[[0, 0], [1, 1]]",
     "[[[[0, 0], [1, 1]]]]"],
)
def test_load_strokes_jsonl_refuses_strings_booleans_and_wrong_nesting(tmp_path, strokes):
    path = tmp_path / "d.jsonl"
    path.write_text('{"label": 0, "strokes": [[[0, 0]]]}\n'
                    f'{{"label": 0, "strokes": {strokes}}}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.jsonl.*line 2: strokes\["):
        load_strokes(path)


def test_as_strokes_refuses_string_and_boolean_arrays():
    with pytest.raises(TypeError, match=r"samples\[0\]\[0\].*dtype"):
        StrokeDataset([[np.array([["0.5", "1"]])]], [0])
    with pytest.raises(TypeError, match="dtype bool"):
        StrokeDataset([[np.array([[True, False]])]], [0])
    ds = StrokeDataset([[np.array([[1, 2]], dtype=np.int32), [[0.5, 1.5]]]], [0])
    assert ds.samples[0][0].dtype == np.float64


def test_load_samples_formats_agree(tmp_path):
    sample = [[[0, 0], [3, 4]], [[1, 1]]]
    files = {
        "bare.json": json.dumps(sample),
        "object.json": json.dumps({"strokes": sample}),
        "list.json": json.dumps([{"strokes": sample}, {"strokes": sample[:1]}]),
        "lines.jsonl": json.dumps({"class_names": ["a"]}) + "\n"
        + json.dumps({"label": "a", "strokes": sample}) + "\n\n",
    }
    got = {}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        got[name] = [[s.tolist() for s in smp] for smp in load_samples(tmp_path / name)]
    want = [[[[0.0, 0.0], [3.0, 4.0]], [[1.0, 1.0]]]]
    assert got["bare.json"] == got["object.json"] == got["lines.jsonl"] == want
    assert got["list.json"] == want + [want[0][:1]]


@pytest.mark.parametrize(
    "text, what",
    [
        ("{", "not valid JSON"),
        ("[]", "holds no strokes"),
        ('[{"strokes": [[[0, 0]]]}, {"strokes": [[0, 0]]}]', r"sample 1: strokes\[0\]\[0\]"),
        ('[{"strokes": [[[0, 0]]]}, [[[0, 0]]]]', "mixing objects and strokes"),
        ('[{"points": []}]', "without 'strokes'"),
        ("[" * 100000 + "]" * 100000, "JSON"),
    ],
)
def test_load_samples_errors_name_the_file(tmp_path, text, what):
    path = tmp_path / "s.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="s.json") as info:
        load_samples(path)
    assert re.search(what, str(info.value)), str(info.value)
    with pytest.raises(FileNotFoundError):
        load_samples(tmp_path / "missing.json")


def test_corrupt_npz_contents(tmp_path):
    ds = small_dataset()
    path = tmp_path / "d.npz"
    save_strokes(ds, path)
    with np.load(path) as data:
        arrays = dict(data)
    arrays["stroke_offsets"] = arrays["stroke_offsets"][::-1]
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(ValueError, match="broken.npz"):
        load_strokes(tmp_path / "broken.npz")
    del arrays["labels"]
    np.savez(tmp_path / "nolabels.npz", **arrays)
    with pytest.raises(ValueError, match="nolabels.npz"):
        load_strokes(tmp_path / "nolabels.npz")
    np.savez(
        tmp_path / "pickled.npz",
        format=np.array("sparsecnn-strokes"),
        points=np.array([object()], dtype=object),
    )
    with pytest.raises(ValueError, match="pickled.npz"):
        load_strokes(tmp_path / "pickled.npz")
    with pytest.raises(ValueError, match="npz or .jsonl"):
        save_strokes(ds, tmp_path / "d.csv")
    with pytest.raises(FileNotFoundError):
        load_strokes(tmp_path / "missing.npz")


def test_synthetic_strokes_deterministic_and_same_task():
    a = synthetic_strokes(5, 3, seed=7)
    b = synthetic_strokes(5, 3, seed=7)
    c = synthetic_strokes(5, 3, seed=8)
    assert len(a) == 15 and a.labels.tolist() == sorted(a.labels.tolist())
    assert a.class_names[0] == "class_0"
    for x, y in zip(a.samples, b.samples, strict=True):
        assert all(np.array_equal(s, t) for s, t in zip(x, y, strict=True))
    # different seed: different samples of the same prototypes (same stroke counts)
    assert [len(s) for s in a.samples] == [len(s) for s in c.samples]
    assert not np.allclose(a.samples[0][0], c.samples[0][0])
    assert all(2 <= len(s) <= 4 for s in a.samples)
    pts = np.concatenate([p for s in a.samples for p in s])
    assert pts.min() > -0.3 and pts.max() < 1.3


def test_synthetic_classes_are_separable():
    # nearest-prototype classification on rendered images is near perfect
    train = synthetic_strokes(
        6,
        1,
        seed=0,
        augment=dict(scale=0, stretch=0, shear=0, rotation=0, translation=0, stroke_jitter=0),
    )
    test = synthetic_strokes(6, 5, seed=1)

    def image(strokes):
        img = np.zeros((24, 24))
        c, _ = render(strokes, 24)
        img[c[:, 0], c[:, 1]] = 1
        # blur a little so nearby pixels match
        k = img.copy()
        for ax in (0, 1):
            k = k + np.roll(img, 1, ax) + np.roll(img, -1, ax)
        return k.ravel() / np.linalg.norm(k)

    protos = np.stack([image(s) for s in train.samples])
    pred = [int(np.argmax(protos @ image(s))) for s in test.samples]
    assert np.mean(np.array(pred) == test.labels) >= 0.8


# ---------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------
def test_collate():
    r1 = render([line((0, 0), (1, 1))], 8, features="directions")
    r2 = render([line((0.5, 0.5))], 8, features="directions")
    batch = collate([(*r1, 3), (*r2, 1)], (8, 8))
    assert isinstance(batch, Batch)
    assert batch.coords.dtype == np.int32 and batch.coords.shape == (len(r1[0]) + 1, 3)
    assert batch.features.dtype == np.float32 and batch.features.shape[1] == 9
    assert batch.labels.dtype == np.int64 and batch.labels.tolist() == [3, 1]
    assert batch.spatial_shape == (8, 8) and batch.batch_size == 2
    assert batch.coords[-1].tolist() == [1, *r2[0][0].tolist()]
    with pytest.raises(ValueError, match="channels"):
        collate([(*r1, 0), (r2[0], r2[1][:, :1], 0)])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def batches_equal(a, b) -> bool:
    return (
        np.array_equal(a.coords, b.coords)
        and np.array_equal(a.features, b.features)
        and np.array_equal(a.labels, b.labels)
        and a.spatial_shape == b.spatial_shape
        and a.batch_size == b.batch_size
    )


def test_batch_iterator_shapes_and_coverage():
    ds = synthetic_strokes(3, 7, seed=0)  # 21 samples
    it = BatchIterator(ds, 4, size=32, features="signature", seed=1)
    assert len(it) == 6
    seen = []
    for batch in it:
        assert batch.coords.dtype == np.int32 and batch.coords.shape[1] == 3
        assert batch.features.dtype == np.float32 and batch.features.shape == (len(batch.coords), 7)
        assert batch.spatial_shape == (32, 32) and batch.labels.dtype == np.int64
        assert batch.batch_size == len(batch.labels)
        assert set(np.unique(batch.coords[:, 0])) == set(range(batch.batch_size))
        assert batch.coords[:, 1:].min() >= 0 and batch.coords[:, 1:].max() < 32
        key = batch.coords.astype(np.int64) @ np.array([32 * 32, 32, 1])
        assert np.all(np.diff(key) > 0)
        seen.extend(batch.labels.tolist())
    assert sorted(seen) == sorted(ds.labels.tolist())  # every sample once per epoch
    assert [b.batch_size for b in it] == [4, 4, 4, 4, 4, 1]
    dropped = BatchIterator(ds, 4, size=32, drop_last=True)
    assert len(dropped) == 5 and sum(b.batch_size for b in dropped) == 20


def test_batch_iterator_covers_each_sample_once():
    # tag every sample with a unique single-pixel position and track it
    samples = [[line(((i % 10) / 9, (i // 10) / 9))] for i in range(23)]
    ds = StrokeDataset(samples, list(range(23)))
    it = BatchIterator(ds, 5, size=10, scale=10, shuffle=True, seed=3)
    orders = []
    for _ in range(2):
        order = []
        for batch in it:
            order.extend(batch.labels.tolist())
            for b, label in enumerate(batch.labels):
                rc = batch.coords[batch.coords[:, 0] == b, 1:].tolist()
                assert rc == [[label // 10, label % 10]]
        assert sorted(order) == list(range(23))
        orders.append(order)
    assert orders[0] != orders[1]  # reshuffled every epoch
    plain = [
        label for b in BatchIterator(ds, 5, size=10, shuffle=False) for label in b.labels.tolist()
    ]
    assert plain == list(range(23))


def test_batch_iterator_deterministic_with_and_without_thread():
    ds = synthetic_strokes(3, 6, seed=0)
    kwargs = dict(size=24, seed=5, augment=True, features="directions")
    runs = []
    for prefetch in (2, 2, 0):
        it = BatchIterator(ds, 4, prefetch=prefetch, **kwargs)
        runs.append([b for _ in range(2) for b in it])
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        assert all(batches_equal(a, b) for a, b in zip(runs[0], other, strict=True))
    # epochs differ (shuffle + augmentation)
    assert not batches_equal(runs[0][0], runs[0][len(runs[0]) // 2])
    # a different seed differs
    other = list(BatchIterator(ds, 4, prefetch=2, **{**kwargs, "seed": 6}))
    half = len(runs[0]) // 2
    assert not all(batches_equal(a, b) for a, b in zip(runs[0][:half], other, strict=True))
    # set_epoch / batches(epoch) reproduce a given epoch
    it = BatchIterator(ds, 4, **kwargs)
    it.set_epoch(1)
    assert all(
        batches_equal(a, b) for a, b in zip(list(it), runs[0][len(runs[0]) // 2 :], strict=True)
    )
    assert all(
        batches_equal(a, b) for a, b in zip(list(it.batches(0)), runs[0][:half], strict=True)
    )


def test_batch_iterator_augment_dict_and_errors():
    ds = synthetic_strokes(2, 3, seed=0)
    plain = list(BatchIterator(ds, 6, size=24, shuffle=False, augment=False))
    aug = list(BatchIterator(ds, 6, size=24, shuffle=False, augment={"rotation": 0.5}))
    assert not batches_equal(plain[0], aug[0])
    with pytest.raises(TypeError, match="augment"):
        BatchIterator(ds, 2, size=24, augment={"wobble": 1})
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(ds, 0, size=24)
    with pytest.raises(ValueError, match="features"):
        BatchIterator(ds, 2, size=24, features="rgb")
    with pytest.raises(TypeError, match="dataset"):
        BatchIterator([1, 2], 2, size=24)


def _producer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sparsecnn-BatchIterator")]


def _wait_no_producers(timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gc.collect()
        if not _producer_threads():
            return True
        time.sleep(0.01)
    return False


def test_batch_iterator_early_stop_shuts_down_thread():
    ds = synthetic_strokes(4, 10, seed=0)
    loader = BatchIterator(ds, 2, size=24, prefetch=1)
    assert _wait_no_producers()
    # break out of a for loop
    for i, _ in enumerate(loader):
        if i == 1:
            break
    assert _wait_no_producers()
    # explicit close while the producer is blocked on a full queue
    epoch = iter(loader)
    next(epoch)
    time.sleep(0.05)
    assert _producer_threads()
    epoch.close()
    assert not _producer_threads()
    with pytest.raises(StopIteration):
        next(epoch)
    # context manager and a dropped iterator
    with iter(loader) as epoch:
        next(epoch)
    assert not _producer_threads()
    epoch = iter(loader)
    next(epoch)
    del epoch
    assert _wait_no_producers()
    # an exception in the consumer
    with pytest.raises(RuntimeError):
        for _ in loader:
            raise RuntimeError("stop")
    assert _wait_no_producers()


def test_batch_iterator_forwards_producer_errors():
    ds = synthetic_strokes(2, 4, seed=0)
    loader = BatchIterator(ds, 2, size=24, prefetch=2)
    loader.dataset.samples[3] = "not strokes"  # type: ignore[assignment]
    with pytest.raises(TypeError, match="strokes"):
        list(loader)
    assert _wait_no_producers()


def test_batch_to_sparse():
    pytest.importorskip("sparsecnn.tensor")
    ds = synthetic_strokes(2, 2, seed=0)
    batch = next(iter(BatchIterator(ds, 4, size=16, prefetch=0)))
    st = batch.to_sparse()
    assert type(st).__name__ == "SparseTensor"
