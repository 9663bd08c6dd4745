"""Coordinate hash and rulebooks against a brute-force pure-Python enumeration.

The kernels (``sparsecnn._cpu.build_hash``, ``build_conv_rulebook``,
``build_submanifold_rulebook``) and the cached ``Geometry.conv`` / ``Geometry.submanifold`` must
list exactly the (input site, output site, offset k) triples of design.md:

* valid convolution / pooling (f, s): output o is active iff an input lies in
  ``[o*s, o*s + f)^d``; k is row-major over the input's position relative to ``o*s``;
* submanifold (odd f): the neighbour of output x at offset k sits at ``x - f//2 + offset_k``
  and must be inside the grid.
"""
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsecnn as scn
from sparsecnn import _cpu
from sparsecnn import geometry as geometry_mod
from sparsecnn._cpu import _rulebook
from sparsecnn.geometry import Geometry, check_packable

# --------------------------------------------------------------------------------------------
# brute force


def brute_conv(coords, spatial, f, s):
    """Set of (in_site, out_site, k) for a valid (f, s) window; and the set of output sites."""
    d = len(spatial)
    out_shape = tuple((n - f) // s + 1 for n in spatial)
    triples = set()
    for row in coords.tolist():
        b, p = row[0], row[1:]
        for o in itertools.product(*(range(m) for m in out_shape)):
            rel = [p[j] - o[j] * s for j in range(d)]
            if all(0 <= r < f for r in rel):
                k = 0
                for r in rel:
                    k = k * f + r
                triples.add((tuple(row), (b, *o), k))
    return triples, {t[1] for t in triples}


def brute_submanifold(coords, spatial, f):
    """Set of (in_site, out_site, k) of a submanifold convolution of odd size f."""
    d = len(spatial)
    active = {tuple(r) for r in coords.tolist()}
    half = f // 2
    triples = set()
    for row in coords.tolist():
        b, x = row[0], row[1:]
        for k, off in enumerate(itertools.product(range(f), repeat=d)):
            y = tuple(x[j] - half + off[j] for j in range(d))
            if all(0 <= y[j] < spatial[j] for j in range(d)) and (b, *y) in active:
                triples.add(((b, *y), tuple(row), k))
    return triples


def rulebook_triples(in_coords, out_coords, in_idx, out_idx, offsets):
    """Kernel rulebook -> set of (in_site, out_site, k), checking no pair is listed twice."""
    K = len(offsets) - 1
    ks = np.repeat(np.arange(K), np.diff(offsets))
    ic = in_coords[in_idx].tolist()
    oc = out_coords[out_idx].tolist()
    listed = [(tuple(a), tuple(b), int(k)) for a, b, k in zip(ic, oc, ks, strict=True)]
    assert len(listed) == len(set(listed)), "a pair is listed twice"
    return set(listed)


def check_rulebook_structure(in_idx, out_idx, offsets, K, n_in, n_out):
    """Dtypes, CSR layout, index ranges, and 'each row once per offset'."""
    assert in_idx.dtype == np.int32 and out_idx.dtype == np.int32
    assert offsets.dtype == np.int64
    assert offsets.shape == (K + 1,)
    assert offsets[0] == 0
    assert np.all(np.diff(offsets) >= 0)
    assert offsets[-1] == len(in_idx) == len(out_idx)
    if len(in_idx):
        assert 0 <= in_idx.min() and in_idx.max() < n_in
        assert 0 <= out_idx.min() and out_idx.max() < n_out
    for k in range(K):
        a, b = offsets[k], offsets[k + 1]
        assert len(np.unique(out_idx[a:b])) == b - a, f"output row repeated in offset {k}"
        assert len(np.unique(in_idx[a:b])) == b - a, f"input row repeated in offset {k}"


def random_unique_sites(rng, batch, spatial, mode):
    """Unique int32 coords (n, 1 + d) in a random order: 'empty', 'one', 'all' or a density."""
    total = batch * int(np.prod(spatial))
    n = {"empty": 0, "one": 1, "all": total}.get(mode)
    if n is None:
        n = max(1, int(round(float(mode) * total)))
    flat = rng.choice(total, size=n, replace=False)
    return np.stack(np.unravel_index(flat, (batch, *spatial)), 1).astype(np.int32).reshape(
        n, 1 + len(spatial))


def shape_arr(spatial):
    return np.asarray(spatial, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# hypothesis strategies

MODES = st.sampled_from(["empty", "one", "all", "0.05", "0.3", "0.7"])


@st.composite
def conv_cases(draw):
    d = draw(st.integers(1, 4))
    f = draw(st.integers(1, 4))
    s = draw(st.integers(1, 5))          # s > f included
    max_m = {1: 6, 2: 4, 3: 3, 4: 2}[d]
    m = draw(st.lists(st.integers(1, max_m), min_size=d, max_size=d))
    spatial = tuple(f + s * (mj - 1) for mj in m)
    # keep the brute force cheap
    while int(np.prod(spatial)) > 400:
        spatial = tuple(max(f, n - s) for n in spatial)
    batch = draw(st.integers(1, 3))
    mode = draw(MODES)
    seed = draw(st.integers(0, 2**32 - 1))
    return d, f, s, spatial, batch, mode, seed


@st.composite
def sub_cases(draw):
    d = draw(st.integers(1, 4))
    f = draw(st.sampled_from([1, 3, 5]))
    max_n = {1: 12, 2: 7, 3: 5, 4: 3}[d]
    spatial = tuple(draw(st.lists(st.integers(1, max_n), min_size=d, max_size=d)))
    if d == 4 and f == 5:
        f = 3
    batch = draw(st.integers(1, 3))
    mode = draw(MODES)
    seed = draw(st.integers(0, 2**32 - 1))
    return d, f, spatial, batch, mode, seed


# --------------------------------------------------------------------------------------------
# build_conv_rulebook


def _check_conv_kernel(coords, spatial, f, s):
    d = len(spatial)
    K = f ** d
    res = _rulebook.build_conv_rulebook(coords, shape_arr(spatial), f, s)
    out_coords, in_idx, out_idx, offsets = res[:4]
    out_shape = tuple((n - f) // s + 1 for n in spatial)
    assert out_coords.dtype == np.int32
    assert out_coords.shape == (len(out_coords), 1 + d)
    check_rulebook_structure(in_idx, out_idx, offsets, K, len(coords), len(out_coords))
    # output sites unique, inside the output grid, same batch as their inputs
    assert len({tuple(r) for r in out_coords.tolist()}) == len(out_coords)
    if len(out_coords):
        assert out_coords[:, 1:].min() >= 0
        assert np.all(out_coords[:, 1:] < np.asarray(out_shape))
        np.testing.assert_array_equal(out_coords[out_idx, 0], coords[in_idx, 0])
    expected, expected_out = brute_conv(coords, spatial, f, s)
    assert rulebook_triples(coords, out_coords, in_idx, out_idx, offsets) == expected
    assert {tuple(r) for r in out_coords.tolist()} == expected_out
    # every output has at least one pair
    assert len(np.unique(out_idx)) == len(out_coords)
    return res


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_cases())
def test_conv_rulebook_matches_brute_force(case):
    d, f, s, spatial, batch, mode, seed = case
    coords = random_unique_sites(np.random.default_rng(seed), batch, spatial, mode)
    res = _check_conv_kernel(coords, spatial, f, s)
    # deterministic: the same input gives identical arrays
    again = _rulebook.build_conv_rulebook(coords.copy(), shape_arr(spatial), f, s)
    for a, b in zip(res[:4], again[:4], strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


@pytest.mark.parametrize("d,f,s,spatial,batch,mode", [
    (1, 3, 1, (9,), 1, "all"),
    (1, 2, 5, (12,), 2, "all"),          # s > f: inputs in the gaps belong to no window
    (2, 1, 1, (4, 5), 2, "one"),
    (2, 3, 2, (9, 7), 3, "0.2"),
    (2, 2, 3, (8, 5), 2, "all"),          # s > f
    (3, 2, 2, (4, 6, 4), 2, "0.3"),
    (3, 3, 4, (7, 3, 11), 1, "all"),      # s > f
    (4, 2, 1, (3, 3, 3, 3), 2, "0.4"),
    (4, 3, 3, (3, 6, 3, 3), 1, "all"),
    (2, 2, 2, (6, 6), 4, "empty"),
], ids=lambda v: str(v).replace(" ", ""))
def test_conv_rulebook_cases(d, f, s, spatial, batch, mode, rng):
    coords = random_unique_sites(rng, batch, spatial, mode)
    _check_conv_kernel(coords, spatial, f, s)


def test_conv_rulebook_empty_has_zero_offsets():
    out_coords, in_idx, out_idx, offsets = _rulebook.build_conv_rulebook(
        np.zeros((0, 3), np.int32), shape_arr((5, 5)), 3, 2)[:4]
    assert out_coords.shape == (0, 3)
    assert in_idx.shape == out_idx.shape == (0,)
    np.testing.assert_array_equal(offsets, np.zeros(10, np.int64))
    assert offsets.dtype == np.int64


def test_conv_rulebook_outputs_grouped_by_sample(rng):
    """Samples are independent: outputs are ordered by batch index."""
    coords = random_unique_sites(rng, 5, (9, 9), 0.2)
    out_coords = _rulebook.build_conv_rulebook(coords, shape_arr((9, 9)), 3, 2)[0]
    assert np.all(np.diff(out_coords[:, 0]) >= 0)


def test_conv_rulebook_batch_gaps(rng):
    """Samples with no sites (here 0 and 2 of 4) simply have no outputs."""
    coords = random_unique_sites(rng, 4, (7, 7), 0.3)
    coords = coords[np.isin(coords[:, 0], [1, 3])]
    out_coords = _check_conv_kernel(coords, (7, 7), 3, 2)[0]
    assert set(out_coords[:, 0].tolist()) == {1, 3}


def test_conv_rulebook_private_tables_grow(rng):
    """Isolated sites with a big window: each sample has ~16x more outputs than inputs, so
    its private hash table must grow several times while it is being filled."""
    spatial = (40, 40)
    coords = random_unique_sites(rng, 3, spatial, 0.02)
    coords = coords[np.lexsort(coords.T[::-1])]            # grouped by sample (fast path)
    out_coords = _check_conv_kernel(coords, spatial, 4, 1)[0]
    assert len(out_coords) > 8 * len(coords)


def test_conv_rulebook_same_pairs_grouped_or_not(rng):
    """Rows grouped by sample take a fast path; shuffled rows are grouped first. Both give
    the same set of (offset, input site, output site) triples."""
    spatial = (11, 13)
    coords = random_unique_sites(rng, 4, spatial, 0.3)
    grouped = coords[np.lexsort(coords.T[::-1])]
    a = _check_conv_kernel(coords, spatial, 3, 2)
    b = _check_conv_kernel(grouped, spatial, 3, 2)
    assert (rulebook_triples(coords, *a[:4]) == rulebook_triples(grouped, *b[:4]))


@pytest.mark.parametrize("f,s", [(3, 1), (2, 2), (3, 2), (2, 3), (1, 1)])
def test_conv_rulebook_2d_path_equals_generic(f, s, rng):
    """d == 2 has its own loop. Embedded in d == 3 (a leading dimension of size f, all sites
    at 0 there: one output position, offset numbers unchanged) the generic loop must give
    the very same arrays, order included."""
    spatial = (3 * s + f, 2 * s + f + 1)
    coords = random_unique_sites(rng, 3, spatial, 0.4)
    lifted = np.insert(coords, 1, 0, axis=1)
    a = _rulebook.build_conv_rulebook(coords, shape_arr(spatial), f, s)
    b = _rulebook.build_conv_rulebook(lifted, shape_arr((f,) + spatial), f, s)
    np.testing.assert_array_equal(np.insert(a[0], 1, 0, axis=1), b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])
    np.testing.assert_array_equal(a[3], b[3][:f * f + 1])
    assert (b[3][f * f:] == b[3][-1]).all()


@pytest.mark.parametrize("d,f,s,spatial,batch,mode", [
    (2, 3, 1, (12, 10), 3, "0.2"),
    (2, 2, 2, (8, 8), 2, "all"),
    (3, 2, 1, (5, 4, 6), 2, "0.3"),
    (1, 2, 3, (11,), 2, "0.6"),
    (2, 2, 2, (6, 6), 3, "empty"),
])
def test_conv_rulebook_with_window(d, f, s, spatial, batch, mode, rng):
    """window=True adds build_window's table, filled by the rulebook kernel itself, and
    leaves the other four arrays unchanged."""
    coords = random_unique_sites(rng, batch, spatial, mode)
    plain = _rulebook.build_conv_rulebook(coords, shape_arr(spatial), f, s)
    res = _rulebook.build_conv_rulebook(coords, shape_arr(spatial), f, s, window=True)
    assert len(plain) == 4 and len(res) == 5
    for a, b in zip(plain, res[:4], strict=True):
        np.testing.assert_array_equal(a, b)
    win = res[4]
    assert win.dtype == np.int32 and win.shape == (len(res[0]), f ** d)
    np.testing.assert_array_equal(win, _cpu.build_window(res[1], res[2], res[3], len(res[0])))


def test_geometry_conv_window_request(rng):
    """The CPU backend's rulebook kernel hands its window table to the Rulebook's cache; a
    rulebook without one builds the same table on first use."""
    coords = random_unique_sites(rng, 2, (10, 10), 0.3)
    a = scn.SparseTensor(coords, np.ones((len(coords), 1), np.float32), (10, 10)).geometry
    rb_a, _ = a.conv(2, 2)
    assert rb_a.cache["window"] is not None
    rb_b = geometry_mod.Rulebook(rb_a.in_idx, rb_a.out_idx, rb_a.offsets, rb_a.n_in,
                                 rb_a.n_out, 2, 2)
    assert "window" not in rb_b.cache
    np.testing.assert_array_equal(_cpu.window_of(rb_a), _cpu.window_of(rb_b))


def test_rulebook_input_window_and_fill(rng):
    """input_window[i, k] is the output paired with input i at offset k (-1 if none);
    input_fill is the share of (input, offset) slots that have a pair."""
    coords = random_unique_sites(rng, 2, (9, 9), 0.3)
    g = scn.SparseTensor(coords, np.ones((len(coords), 1), np.float32), (9, 9)).geometry
    rb, _ = g.conv(2, 1)
    iw = _cpu.input_window_of(rb)
    assert iw.shape == (rb.n_in, 4) and iw.dtype == np.int32
    expected = np.full((rb.n_in, 4), -1, np.int32)
    for k in range(4):
        q = slice(rb.offsets[k], rb.offsets[k + 1])
        expected[rb.in_idx[q], k] = rb.out_idx[q]
    np.testing.assert_array_equal(iw, expected)
    assert _cpu.input_window_of(rb) is iw                      # cached
    # stride 1, valid: every input lies in all 4 of its windows, except at the grid's edges
    assert _cpu._ops.input_fill(rb) == (iw >= 0).mean()
    assert 0.75 < _cpu._ops.input_fill(rb) <= 1.0


def test_conv_rulebook_offset_numbering_by_hand():
    """One site at (1, 2) of a 4x4 grid, f=3, s=1: it is in 4 windows with known offsets."""
    coords = np.array([[0, 1, 2]], np.int32)
    out_coords, in_idx, out_idx, offsets = _rulebook.build_conv_rulebook(
        coords, shape_arr((4, 4)), 3, 1)[:4]
    got = rulebook_triples(coords, out_coords, in_idx, out_idx, offsets)
    # window origin o -> relative position (1 - o0, 2 - o1) -> k = 3 * r0 + r1
    assert got == {((0, 1, 2), (0, 0, 0), 5), ((0, 1, 2), (0, 0, 1), 4),
                   ((0, 1, 2), (0, 1, 0), 2), ((0, 1, 2), (0, 1, 1), 1)}


# --------------------------------------------------------------------------------------------
# build_submanifold_rulebook


def _check_sub_kernel(coords, spatial, f):
    d = len(spatial)
    keys, vals, inverse, n_unique = _cpu.build_hash(coords, shape_arr(spatial))
    assert n_unique == len(coords)
    res = _rulebook.build_submanifold_rulebook(coords, shape_arr(spatial), keys, vals, f)
    in_idx, out_idx, offsets = res
    check_rulebook_structure(in_idx, out_idx, offsets, f ** d, len(coords), len(coords))
    assert rulebook_triples(coords, coords, in_idx, out_idx, offsets) == \
        brute_submanifold(coords, spatial, f)
    if len(coords):
        # the centre offset pairs every site with itself
        c = (f ** d) // 2
        a, b = offsets[c], offsets[c + 1]
        np.testing.assert_array_equal(np.sort(in_idx[a:b]), np.arange(len(coords)))
        np.testing.assert_array_equal(in_idx[a:b], out_idx[a:b])
    return res


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sub_cases())
def test_submanifold_rulebook_matches_brute_force(case):
    d, f, spatial, batch, mode, seed = case
    coords = random_unique_sites(np.random.default_rng(seed), batch, spatial, mode)
    res = _check_sub_kernel(coords, spatial, f)
    keys, vals, _, _ = _cpu.build_hash(coords, shape_arr(spatial))
    again = _rulebook.build_submanifold_rulebook(coords, shape_arr(spatial), keys, vals, f)
    for a, b in zip(res, again, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("d,f,spatial,batch,mode", [
    (1, 3, (10,), 2, "all"),
    (1, 5, (3,), 1, "all"),              # window wider than the grid
    (2, 1, (5, 5), 2, "0.5"),
    (2, 3, (6, 7), 3, "0.3"),
    (2, 5, (4, 9), 1, "all"),
    (3, 3, (4, 4, 4), 2, "0.2"),
    (4, 3, (3, 3, 3, 3), 2, "0.3"),
    (2, 3, (5, 5), 2, "one"),
    (2, 3, (5, 5), 2, "empty"),
    (2, 3, (64, 64), 1, "0.3"),          # > 1024 sites: more than one build chunk
], ids=lambda v: str(v).replace(" ", ""))
def test_submanifold_rulebook_cases(d, f, spatial, batch, mode, rng):
    coords = random_unique_sites(rng, batch, spatial, mode)
    _check_sub_kernel(coords, spatial, f)


def test_submanifold_rulebook_does_not_cross_samples():
    """The same position in two samples: neighbours only within a sample."""
    coords = np.array([[0, 1, 1], [1, 1, 2], [1, 1, 1]], np.int32)
    _check_sub_kernel(coords, (3, 3), 3)
    keys, vals, _, _ = _cpu.build_hash(coords, shape_arr((3, 3)))
    in_idx, out_idx, _ = _rulebook.build_submanifold_rulebook(coords, shape_arr((3, 3)), keys,
                                                         vals, 3)
    pairs = set(zip(in_idx.tolist(), out_idx.tolist(), strict=True))
    assert (0, 0) in pairs and (1, 2) in pairs and (2, 1) in pairs
    assert not any((a == 0) != (b == 0) for a, b in pairs)


# --------------------------------------------------------------------------------------------
# build_hash


def _pack(row, spatial):
    key = row[0]
    for c, n in zip(row[1:], spatial, strict=True):
        key = key * n + c
    return key


@settings(max_examples=60, deadline=None)
@given(d=st.integers(1, 4), batch=st.integers(1, 3), n=st.integers(0, 200),
       seed=st.integers(0, 2**32 - 1))
def test_build_hash_duplicates_map_to_first_occurrence(d, batch, n, seed):
    rng = np.random.default_rng(seed)
    spatial = tuple(int(v) for v in rng.integers(1, 5, d))
    # few distinct sites, many duplicates
    coords = np.concatenate([rng.integers(0, batch, (n, 1)),
                             rng.integers(0, spatial, (n, d))], 1).astype(np.int32)
    keys, vals, inverse, n_unique = _cpu.build_hash(coords, shape_arr(spatial))
    assert keys.dtype == np.int64 and vals.dtype == np.int32 and inverse.dtype == np.int32
    assert inverse.shape == (n,)
    rows = [tuple(r) for r in coords.tolist()]
    first = {}
    for r in rows:
        first.setdefault(r, len(first))
    assert n_unique == len(first)
    np.testing.assert_array_equal(inverse, [first[r] for r in rows])
    # the table: power-of-two capacity, load <= 1/2, exactly the unique packed keys
    cap = len(keys)
    assert cap == len(vals) and cap & (cap - 1) == 0 and cap >= 2 * n_unique
    used = keys != -1
    assert used.sum() == n_unique
    table = dict(zip(keys[used].tolist(), vals[used].tolist(), strict=True))
    assert table == {_pack(r, spatial): u for r, u in first.items()}


def test_build_hash_empty():
    keys, vals, inverse, n_unique = _cpu.build_hash(np.zeros((0, 3), np.int32),
                                                    shape_arr((4, 4)))
    assert n_unique == 0 and inverse.shape == (0,)
    assert np.all(keys == -1)


# --------------------------------------------------------------------------------------------
# Geometry and SparseTensor


def _tensor(coords, spatial, batch, C=2, rng=None):
    rng = rng or np.random.default_rng(0)
    return scn.SparseTensor(coords, rng.standard_normal((len(coords), C)), spatial,
                            batch_size=batch)


@pytest.mark.parametrize("d,f,s,spatial,batch,mode", [
    (1, 3, 2, (11,), 2, "0.4"),
    (2, 2, 2, (8, 6), 3, "0.2"),
    (2, 3, 1, (5, 5), 1, "all"),
    (2, 1, 3, (7, 4), 2, "0.5"),
    (3, 2, 1, (4, 3, 5), 2, "one"),
    (4, 2, 2, (4, 4, 2, 4), 1, "0.3"),
    (2, 3, 3, (9, 9), 2, "empty"),
], ids=lambda v: str(v).replace(" ", ""))
def test_geometry_conv_matches_brute_force(d, f, s, spatial, batch, mode, rng):
    coords = random_unique_sites(rng, batch, spatial, mode)
    x = _tensor(coords, spatial, batch, rng=rng)
    rb, out = x.geometry.conv(f, s)
    assert isinstance(out, Geometry)
    assert out.spatial_shape == tuple((n - f) // s + 1 for n in spatial)
    assert out.batch_size == batch
    assert rb.n_in == len(coords) and rb.n_out == out.n_active
    assert rb.kernel_volume == f ** d and rb.n_pairs == len(rb.in_idx)
    check_rulebook_structure(rb.in_idx, rb.out_idx, rb.offsets, f ** d, rb.n_in, rb.n_out)
    expected, expected_out = brute_conv(x.coords, spatial, f, s)
    assert rulebook_triples(x.coords, out.coords, rb.in_idx, rb.out_idx, rb.offsets) == expected
    assert {tuple(r) for r in out.coords.tolist()} == expected_out
    # cached: the same objects again
    rb2, out2 = x.geometry.conv(f, s)
    assert rb2 is rb and out2 is out


@pytest.mark.parametrize("d,f,spatial,batch,mode", [
    (1, 3, (9,), 2, "0.5"), (2, 3, (6, 6), 2, "0.3"), (2, 5, (5, 7), 1, "all"),
    (3, 3, (4, 4, 4), 1, "0.25"), (4, 1, (2, 3, 2, 3), 2, "0.5"), (2, 3, (4, 4), 3, "empty"),
], ids=lambda v: str(v).replace(" ", ""))
def test_geometry_submanifold_matches_brute_force(d, f, spatial, batch, mode, rng):
    coords = random_unique_sites(rng, batch, spatial, mode)
    x = _tensor(coords, spatial, batch, rng=rng)
    rb = x.geometry.submanifold(f)
    assert rb.n_in == rb.n_out == len(coords)
    check_rulebook_structure(rb.in_idx, rb.out_idx, rb.offsets, f ** d, rb.n_in, rb.n_out)
    assert rulebook_triples(x.coords, x.coords, rb.in_idx, rb.out_idx, rb.offsets) == \
        brute_submanifold(x.coords, spatial, f)
    assert x.geometry.submanifold(f) is rb
    assert x.geometry.table is x.geometry.table


def test_layers_reuse_cached_geometry(rng):
    """A network applied twice to the same input reuses every rulebook and output geometry."""
    coords = random_unique_sites(rng, 2, (10, 10), 0.2)
    x = _tensor(coords, (10, 10), 2, C=1, rng=rng)
    conv = scn.Convolution(1, 3, 2, 2, dtype=np.float64)
    sub = scn.SubmanifoldConvolution(3, 3, 3, dtype=np.float64)
    pool = scn.MaxPooling(1, 1)
    y1 = pool(sub(conv(x)))
    y2 = pool(sub(conv(x)))
    assert y1.geometry is y2.geometry
    assert sub(conv(x)).geometry is conv(x).geometry      # submanifold keeps the geometry
    assert x.geometry.conv(2, 2)[1] is conv(x).geometry
    # distinct (f, s) -> distinct cache entries
    assert x.geometry.conv(2, 1)[1] is not x.geometry.conv(2, 2)[1]
    # a new tensor on the same coordinates has its own geometry
    x2 = _tensor(coords, (10, 10), 2, C=1, rng=rng)
    assert x2.geometry is not x.geometry


def test_sparse_tensor_sums_duplicates(rng):
    spatial, batch, C = (4, 5), 2, 3
    n = 60      # 40 grid sites: many duplicates
    coords = np.concatenate([rng.integers(0, batch, (n, 1)),
                             rng.integers(0, spatial, (n, 2))], 1).astype(np.int64)
    feats = rng.standard_normal((n, C))
    x = scn.SparseTensor(coords, feats, spatial)
    uniq = {tuple(r) for r in coords.tolist()}
    assert x.n_active == len(uniq)
    assert len({tuple(r) for r in x.coords.tolist()}) == x.n_active
    assert x.coords.dtype == np.int32
    dense = np.zeros((batch, *spatial, C))
    np.add.at(dense, tuple(coords.T), feats)
    np.testing.assert_allclose(np.moveaxis(x.numpy(), 1, -1), dense, rtol=1e-12, atol=1e-12)
    # the hash kept with the geometry sees the unique sites
    keys, vals = x.geometry.table
    assert (keys != -1).sum() == x.n_active


def test_sparse_tensor_duplicates_then_rulebook(rng):
    """After summing duplicates the sites are unique, so the rulebooks are well-formed."""
    coords = np.array([[0, 1, 1], [0, 1, 1], [0, 2, 3], [0, 2, 3], [0, 2, 3]], np.int32)
    x = scn.SparseTensor(coords, np.ones((5, 1)), (5, 5))
    np.testing.assert_array_equal(np.sort(x.features[:, 0]), [2.0, 3.0])
    rb = x.geometry.submanifold(3)
    check_rulebook_structure(rb.in_idx, rb.out_idx, rb.offsets, 9, 2, 2)
    rb, out = x.geometry.conv(3, 1)
    check_rulebook_structure(rb.in_idx, rb.out_idx, rb.offsets, 9, 2, out.n_active)


# --------------------------------------------------------------------------------------------
# packing overflow


@pytest.mark.parametrize("spatial,batch", [
    ((2**31, 2**31), 1),
    ((2**16,) * 4, 1),
    ((2**20,) * 3, 4),
    ((2**30,), 2**32),
], ids=["2d-2^62", "4d-2^64", "3d-batch4", "1d-huge-batch"])
def test_check_packable_overflow(spatial, batch):
    with pytest.raises(ValueError, match=r"too large for the coordinate hash"):
        check_packable(spatial, batch)


@pytest.mark.parametrize("spatial,batch", [
    ((2**20,) * 3, 3), ((2**31 - 1,), 2**30), ((1,), 1), ((7, 7), 0),
], ids=["3d-batch3", "1d-big", "tiny", "no-batch"])
def test_check_packable_fits(spatial, batch):
    check_packable(spatial, batch)      # does not raise


def test_sparse_tensor_packing_overflow():
    coords = np.array([[0, 1, 2, 3]], np.int32)
    feats = np.ones((1, 1))
    x = scn.SparseTensor(coords, feats, (2**20,) * 3, batch_size=3)
    assert x.n_active == 1
    with pytest.raises(ValueError, match=r"too large for the coordinate hash"):
        scn.SparseTensor(coords, feats, (2**20,) * 3, batch_size=4)
    with pytest.raises(ValueError, match=r"batch_size \* prod\(spatial_shape\)"):
        scn.SparseTensor(np.array([[0, 5, 5]], np.int32), feats, (2**31 - 1, 2**31 - 1),
                         batch_size=2)
