"""The stroke-type labels of examples/segment_strokes.py (the U-Net segmentation example)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import sparsecnn as scn

_PATH = Path(__file__).resolve().parents[1] / "examples" / "segment_strokes.py"
_spec = importlib.util.spec_from_file_location("segment_strokes", _PATH)
seg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seg)

SVG = """<svg xmlns="http://www.w3.org/2000/svg" xmlns:kvg="http://kanjivg.tagaini.net">
<g><path kvg:type="㇑a" d="M50,10 L50,90"/><path d="M10,50 L90,50" kvg:type="㇐"/>
<path kvg:type="㇕b" d="M20,20 L80,20 L80,80"/><path id="no-d"/></g></svg>"""


def test_type_classes():
    assert [seg.type_class(t) for t in ["㇐", "㇐b", "㇑a", "㇒", "㇔", "㇏", "㇕b", "", None]] \
        == [0, 0, 1, 2, 3, 4, 5, seg.IGNORE, seg.IGNORE]


def test_stroke_types_and_labels(tmp_path):
    p = tmp_path / "x.svg"
    p.write_text(SVG, encoding="utf-8")
    types = seg.stroke_types(str(p))
    assert types == ["㇑a", "㇐", "㇕b"]
    strokes = scn.data.kanjivg.load_character(p)
    assert len(strokes) == len(types)
    sites, labels = seg.label_sites(strokes, types, 16)
    assert sites.dtype == np.int32 and labels.dtype == np.int64
    assert len(np.unique(sites[:, 0] * 16 + sites[:, 1])) == len(sites)   # unique sites
    pix, _, idx = scn.data.strokes.rasterize(strokes, 16)
    last = {}
    for (r, c), j in zip(pix.tolist(), idx.tolist(), strict=True):
        last[(r, c)] = seg.type_class(types[j])          # the last stroke drawn wins
    assert dict(zip(map(tuple, sites.tolist()), labels.tolist(), strict=True)) == last
    assert set(labels.tolist()) == {0, 1, 5}


def test_batch_keeps_the_label_order(rng):
    items = [("a", np.array([[3, 1], [0, 2]], np.int32), np.array([4, 2])),
             ("b", np.array([[1, 1]], np.int32), np.array([0]))]
    x, labels = seg.batch(items, 4, "cpu")
    np.testing.assert_array_equal(x.coords, [[0, 3, 1], [0, 0, 2], [1, 1, 1]])
    np.testing.assert_array_equal(labels, [4, 2, 0])


def test_a_real_character():
    try:
        base, _ = scn.data.kanjivg.kanjivg_index()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    path = base["一"]
    types = seg.stroke_types(path)
    assert types == ["㇐"]
    sites, labels = seg.label_sites(scn.data.kanjivg.load_character(path), types, 32)
    assert len(sites) > 10 and set(labels.tolist()) == {0}
