"""Coordinate hash and rulebooks on the device (sparsecnn/_gpu/_geometry.py, kernels/rulebook.cu)
against the CPU kernels: every output array equal (np.array_equal, same dtype and shape) to
sparsecnn._cpu's, under the simulation with the block/thread schedule forward and reversed and
on a rerun, and with CuPy where a GPU is present (marked gpu).

Geometries come from the library (SparseTensor(...).geometry and its .conv outputs), plus edge
cases: no sites, one site, sites on the grid boundary, samples without sites, rows not grouped
by sample, d = 1..4, f = 1..4, s = 1..3 (s > f included), K up to 81, 2**20 per axis with few
sites, submanifold f = 1, 3, 5. Two mutated kernels show that the checks catch a wrong order.
"""
from __future__ import annotations

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import _cpu
from sparsecnn._cpu import _rulebook
from sparsecnn._gpu import _geometry as G
from sparsecnn._gpu import _launch
from sparsecnn._gpu._arrays import SimArray, to_sim


def _has_gpu():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


KINDS = [pytest.param("sim", marks=pytest.mark.skipif(
             _launch.find_host_compiler() is None, reason="no host C++ compiler for the "
             "CUDA simulation")),
         pytest.param("cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(
             not _has_gpu(), reason="needs CuPy and a CUDA device")])]


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def dev(a, kind, dtype=None):
    a = np.ascontiguousarray(a, dtype=dtype)
    if kind == "sim":
        return to_sim(a)
    import cupy
    return cupy.asarray(a)


def host(a):
    return a.get()


def schedules(kind, monkeypatch, call):
    """call() under the forward schedule, reversed, and forward again (CuPy: three runs)."""
    out = []
    for reverse in ((False, True, False) if kind == "sim" else (False, False, False)):
        monkeypatch.setenv("SPARSECNN_CUDA_SIM_REVERSE", "1" if reverse else "0")
        out.append(call())
    monkeypatch.delenv("SPARSECNN_CUDA_SIM_REVERSE")
    return out


def assert_same(cpu_results, dev_results, kind, what):
    assert len(cpu_results) == len(dev_results), what
    for j, (c, g) in enumerate(zip(cpu_results, dev_results)):
        if isinstance(c, int):
            assert isinstance(g, int) and g == c, f"{what}: result {j}"
            continue
        assert (type(g) is SimArray) if kind == "sim" else type(g).__module__.startswith("cupy")
        h = host(g)
        assert h.dtype == c.dtype and h.shape == c.shape, f"{what}: result {j} {h.dtype} " \
            f"{h.shape} vs {c.dtype} {c.shape}"
        assert np.array_equal(h, c), f"{what}: result {j} differs"


# --------------------------------------------------------------------------------- geometries

def random_sites(rng, n, spatial, batch, *, shuffle=False, skip_samples=()):
    """n distinct sites (fewer if the grid is small), rows grouped by sample unless shuffled."""
    d = len(spatial)
    samples = [b for b in range(batch) if b not in skip_samples]
    c = np.empty((n, 1 + d), dtype=np.int64)
    c[:, 0] = rng.choice(samples, n) if n else 0
    for j, m in enumerate(spatial):
        c[:, 1 + j] = rng.integers(0, m, n)
    c = np.unique(c, axis=0)
    c = c[rng.permutation(len(c))] if shuffle else c
    return np.ascontiguousarray(c.astype(np.int32))


def library_geometry(coords, spatial, batch=None):
    """The coords of the library's own geometry of these sites (validated, as layers see them)."""
    feats = np.ones((len(coords), 1), dtype=np.float32)
    t = scn.SparseTensor(coords, feats, spatial, batch_size=batch)
    return t.geometry


def boundary_sites(spatial, batch):
    """Every corner of the grid in every sample: the window clipping at both ends."""
    d = len(spatial)
    rows = []
    for b in range(batch):
        for m in range(2 ** d):
            rows.append([b] + [(spatial[j] - 1) * ((m >> j) & 1) for j in range(d)])
    return np.unique(np.array(rows, dtype=np.int32), axis=0)


CONV_CASES = [  # (spatial, f, s, n sites, batch)
    ((16,), 1, 1, 10, 2), ((16,), 2, 2, 12, 1), ((17,), 3, 2, 14, 3), ((19,), 4, 3, 9, 2),
    ((31,), 3, 1, 30, 2),
    ((9, 9), 3, 1, 40, 2), ((15, 15), 3, 2, 60, 3), ((16, 16), 2, 2, 80, 2),
    ((16, 16), 4, 2, 50, 2), ((13, 13), 4, 3, 40, 2), ((13, 13), 1, 3, 40, 2),
    ((14, 14), 2, 3, 40, 1), ((12, 12), 4, 1, 30, 2),
    ((7, 7, 7), 3, 1, 40, 2), ((8, 8, 8), 2, 2, 60, 2), ((9, 9, 9), 3, 3, 50, 2),
    ((10, 10, 10), 4, 2, 40, 1),
    ((5, 5, 5, 5), 3, 1, 25, 2), ((6, 6, 6, 6), 2, 2, 40, 2), ((7, 7, 7, 7), 3, 2, 30, 1),
]


def _conv_id(c):
    return f"d{len(c[0])}-f{c[1]}-s{c[2]}-n{c[3]}"


def check_conv(kind, monkeypatch, coords, spatial, f, s, what=""):
    shape = np.array(spatial, dtype=np.int64)
    ref = _rulebook.build_conv_rulebook(coords, shape, f, s, window=True)
    dc, ds = dev(coords, kind), dev(shape, kind)
    for window in (True, False):
        runs = schedules(kind, monkeypatch,
                         lambda w=window: G.conv_rulebook(dc, ds, f, s, window=w))
        for r in runs:
            assert_same(ref if window else ref[:4], r, kind, f"{what} window={window}")
    return ref


@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv_rulebook_equals_cpu(kind, monkeypatch, rng, case):
    spatial, f, s, n, batch = case
    geo = library_geometry(random_sites(rng, n, spatial, batch), spatial)
    ref = check_conv(kind, monkeypatch, geo.coords, spatial, f, s, _conv_id(case))
    # the next layer: the output geometry as input (where the output grid allows a window)
    out_spatial = tuple((m - f) // s + 1 for m in spatial)
    f2 = 2 if all(m >= 2 and m % 2 == 0 for m in out_spatial) else 1
    if len(ref[0]):
        check_conv(kind, monkeypatch, np.ascontiguousarray(ref[0]), out_spatial, f2, f2, "next")


@pytest.mark.parametrize("spatial,f,s", [((9, 9), 3, 2), ((8, 8, 8), 2, 2), ((7,), 3, 1)])
def test_conv_rows_not_grouped_by_sample(kind, monkeypatch, rng, spatial, f, s):
    coords = random_sites(rng, 60, spatial, 4, shuffle=True)
    assert (np.diff(coords[:, 0]) < 0).any()
    check_conv(kind, monkeypatch, coords, spatial, f, s)


@pytest.mark.parametrize("spatial,f,s", [((9, 9), 3, 2), ((7, 7, 7), 3, 1), ((10,), 4, 3)])
def test_conv_boundary_and_empty_samples(kind, monkeypatch, rng, spatial, f, s):
    corners = boundary_sites(spatial, 3)
    check_conv(kind, monkeypatch, corners, spatial, f, s, "corners")
    # samples 1 and 3 of 5 have no sites, and the last sample has sites
    coords = random_sites(rng, 40, spatial, 5, skip_samples=(1, 3))
    coords = np.unique(np.concatenate([coords, corners[corners[:, 0] == 0]]), axis=0)
    check_conv(kind, monkeypatch, coords, spatial, f, s, "empty samples")


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_conv_no_sites_and_one_site(kind, monkeypatch, d):
    spatial = (7,) * d
    for f, s in ((3, 2), (1, 1), (1, 3), (4, 3)):
        check_conv(kind, monkeypatch, np.empty((0, 1 + d), np.int32), spatial, f, s, "empty")
        check_conv(kind, monkeypatch, np.array([[0] + [3] * d], np.int32), spatial, f, s, "one")
        check_conv(kind, monkeypatch, np.array([[2] + [6] * d], np.int32), spatial, f, s, "last")


def test_conv_sites_no_window_covers(kind, monkeypatch):
    """f = 1, s = 2 on odd coordinates: n > 0 inputs, no output at all."""
    coords = np.array([[0, 1, 3], [1, 5, 5], [1, 7, 1]], dtype=np.int32)
    ref = check_conv(kind, monkeypatch, coords, (9, 9), 1, 2)
    assert len(ref[0]) == 0 and len(ref[1]) == 0


def test_conv_large_grid_few_sites(kind, monkeypatch, rng):
    spatial = (2**20, 2**20)
    coords = random_sites(rng, 30, spatial, 3)
    coords[:4, 1:] = [[0, 0], [2**20 - 1, 2**20 - 1], [0, 2**20 - 1], [1, 1]]
    coords = np.unique(coords, axis=0).astype(np.int32)
    check_conv(kind, monkeypatch, coords, spatial, 2, 2)
    check_conv(kind, monkeypatch, coords, (2**20 + 1, 2**20 + 1), 3, 1)
    # d = 3 at 2**20 per axis: keys up to 2**62 / 2 with batch 2
    c3 = random_sites(rng, 20, (2**20,) * 3, 2)
    check_conv(kind, monkeypatch, c3, (2**20,) * 3, 2, 2)


def test_conv_fully_active(kind, monkeypatch):
    spatial = (6, 6)
    grid = np.stack(np.meshgrid(np.arange(2), np.arange(6), np.arange(6), indexing="ij"), -1)
    coords = np.ascontiguousarray(grid.reshape(-1, 3).astype(np.int32))
    for f, s in ((3, 1), (2, 2), (4, 2)):
        check_conv(kind, monkeypatch, coords, spatial, f, s)


# --------------------------------------------------------------------------------- hash

def check_hash(kind, monkeypatch, coords, spatial):
    shape = np.array(spatial, dtype=np.int64)
    ckeys, cvals, cinv, cn = _cpu.build_hash(coords, shape)
    dc, ds = dev(coords, kind), dev(shape, kind)
    for keys, vals, inv, nu in schedules(kind, monkeypatch, lambda: G.build_hash(dc, ds)):
        assert isinstance(nu, int) and nu == cn
        assert_same((ckeys, cinv), (keys, inv), kind, "hash")
        v = host(vals)
        assert v.dtype == np.int32 and v.shape == cvals.shape
        occupied = ckeys != -1
        assert np.array_equal(v[occupied], cvals[occupied])   # the CPU leaves the rest unset
        assert (v[~occupied] == -1).all()
    return keys, vals


def pack(coords, spatial):
    key = coords[:, 0].astype(np.int64)
    for j, m in enumerate(spatial):
        key = key * int(m) + coords[:, 1 + j]
    return key


def home_slot(keys, bits):
    return ((keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - bits))


@pytest.mark.parametrize("n,spatial,batch", [(0, (8, 8), 1), (1, (8, 8), 1), (2, (1, 1), 2),
                                             (40, (5, 7), 2), (300, (16, 16), 3),
                                             (200, (6, 5, 4), 2), (100, (9, 9, 9, 9), 2),
                                             (50, (2**20,) * 2, 4)])
def test_hash_equals_cpu_slot_by_slot(kind, monkeypatch, rng, n, spatial, batch):
    coords = random_sites(rng, n, spatial, batch, shuffle=True)
    if len(coords) > 1:   # duplicates, anywhere: numbered by first occurrence
        extra = coords[rng.integers(0, len(coords), len(coords) // 2)]
        coords = np.concatenate([coords, extra])[rng.permutation(len(coords) + len(extra))]
    check_hash(kind, monkeypatch, np.ascontiguousarray(coords), spatial)


def test_hash_long_clusters_match_cpu_layout(kind, monkeypatch, rng):
    """Sites whose keys share a few home slots: long probe chains, displacements, wrap-around
    at the end of the table; the layout is still the CPU's, slot by slot."""
    spatial = (64, 64)
    cand = random_sites(rng, 3000, spatial, 1)
    n = 60
    bits = 7                                  # the CPU's capacity for 60 distinct sites
    homes = home_slot(pack(cand, spatial), bits)
    pick = np.concatenate([np.flatnonzero(homes == h)[:12] for h in (0, 1, 126, 127, 60)])
    rest = np.setdiff1d(np.arange(len(cand)), pick)[: n - len(pick)]
    coords = cand[np.concatenate([pick, rest])]
    coords = np.ascontiguousarray(coords[rng.permutation(len(coords))])
    assert len(np.unique(pack(coords, spatial))) == n
    keys, _ = check_hash(kind, monkeypatch, coords, spatial)
    assert keys.shape == (1 << bits,)


# f = 5 in 4-D (K = 625) is left out: covered in d <= 3 and by f = 3 in d = 4
@pytest.mark.parametrize("f,spatial,n,batch", [
    (f, *case) for case in [((20,), 15, 2), ((12, 12), 60, 2), ((6, 6, 6), 60, 2),
                            ((4, 4, 4, 4), 40, 2), ((2**20, 2**20), 30, 2)]
    for f in (1, 3, 5) if not (len(case[0]) == 4 and f == 5)])
def test_submanifold_rulebook_equals_cpu(kind, monkeypatch, rng, f, spatial, n, batch):
    coords = library_geometry(random_sites(rng, n, spatial, batch), spatial).coords
    if spatial[0] == 2**20:   # clusters, so that neighbours exist on the huge grid
        coords = np.unique(np.concatenate([coords, coords + [0, 1, 0], coords + [0, 0, 1]]),
                           axis=0)
        coords = np.ascontiguousarray(np.minimum(coords, 2**20 - 1).astype(np.int32))
        coords = np.unique(coords, axis=0)
    check_submanifold(kind, monkeypatch, coords, spatial, f)


def check_submanifold(kind, monkeypatch, coords, spatial, f):
    shape = np.array(spatial, dtype=np.int64)
    ckeys, cvals, _, _ = _cpu.build_hash(coords, shape)
    ref = _rulebook.build_submanifold_rulebook(coords, shape, ckeys, cvals, f)
    dc, ds = dev(coords, kind), dev(shape, kind)
    gkeys, gvals, _, _ = G.build_hash(dc, ds)
    for r in schedules(kind, monkeypatch,
                       lambda: G.submanifold_rulebook(dc, ds, gkeys, gvals, f)):
        assert_same(ref, r, kind, f"submanifold f={f}")
    # the CPU's own table on the device gives the same
    r = G.submanifold_rulebook(dc, ds, dev(ckeys, kind), dev(cvals, kind), f)
    assert_same(ref, r, kind, "submanifold, CPU table")


@pytest.mark.parametrize("d", [1, 2, 3])
def test_submanifold_edge_cases(kind, monkeypatch, rng, d):
    spatial = (6,) * d
    for f in (1, 3, 5):
        check_submanifold(kind, monkeypatch, np.empty((0, 1 + d), np.int32), spatial, f)
        check_submanifold(kind, monkeypatch, np.array([[1] + [5] * d], np.int32), spatial, f)
        check_submanifold(kind, monkeypatch, boundary_sites(spatial, 2), spatial, f)
        full = np.stack(np.meshgrid(*[np.arange(6)] * d, indexing="ij"), -1).reshape(-1, d)
        full = np.concatenate([np.zeros((len(full), 1), int), full], 1).astype(np.int32)
        check_submanifold(kind, monkeypatch, full, spatial, 3)
        check_submanifold(kind, monkeypatch,
                          random_sites(rng, 40, spatial, 4, skip_samples=(0, 2)), spatial, f)


# --------------------------------------------------------------------------------- contract

def test_host_reads_one_per_call_and_none_when_empty(kind):
    spatial = (9, 9)
    coords = random_sites(np.random.default_rng(5), 50, spatial, 2)
    dc, ds = dev(coords, kind), dev(np.array(spatial, np.int64), kind)
    G.host_reads = 0
    keys, vals, _, _ = G.build_hash(dc, ds)
    assert G.host_reads == 1
    G.conv_rulebook(dc, ds, 3, 2, window=True)
    assert G.host_reads == 2
    G.submanifold_rulebook(dc, ds, keys, vals, 3)
    assert G.host_reads == 3
    empty = dev(np.empty((0, 3), np.int32), kind)
    G.build_hash(empty, ds)
    G.conv_rulebook(empty, ds, 3, 2)
    G.submanifold_rulebook(empty, ds, keys, vals, 3)
    assert G.host_reads == 3


def test_refusals(kind):
    coords = np.array([[0, 1, 2]], np.int32)
    shape = np.array([4, 4], np.int64)
    with pytest.raises(TypeError, match="device"):
        G.build_hash(coords, dev(shape, kind))
    with pytest.raises(TypeError, match="device"):
        G.conv_rulebook(dev(coords, kind), shape, 3, 1)
    # packed keys that would overflow int64: refused as geometry.check_packable refuses them
    big = dev(np.array([2**31, 2**31], np.int64), kind)
    wide = dev(np.array([[3, 5, 7]], np.int32), kind)
    for call in (lambda: G.build_hash(wide, big), lambda: G.conv_rulebook(wide, big, 2, 2),
                 lambda: G.submanifold_rulebook(wide, big, dev(np.full(16, -1), kind),
                                                      dev(np.zeros(16, np.int32), kind), 3)):
        with pytest.raises(ValueError, match="too large for the coordinate hash"):
            call()


# --------------------------------------------------------------------------------- mutations

MUTATIONS = {
    # whichever thread writes last wins instead of the first appearance: the output order
    # follows the schedule
    "last_writer": ("atomicMin(gmin + h, (int)t);", "atomicExch(gmin + h, (int)t);"),
    # a displaced priority is dropped instead of carried on: the table loses sites
    "no_displacement": ("if (old > carried) carried = old;", ""),
    # the pair's place within its offset taken without the earlier inputs' pairs
    "no_pair_scan": ("offsets[k] + before[p * K + k]", "offsets[k] + 0 * before[p * K + k]"),
}


@pytest.mark.skipif(_launch.find_host_compiler() is None, reason="no host C++ compiler")
@pytest.mark.parametrize("which", sorted(MUTATIONS))
def test_mutated_kernel_is_caught(tmp_path, monkeypatch, which):
    old, new = MUTATIONS[which]
    src = (_launch.KERNEL_DIR / "rulebook.cu").read_text()
    assert src.count(old) == 1
    path = tmp_path / f"rulebook_{which}.cu"
    path.write_text(src.replace(old, new))
    monkeypatch.setattr(G, "_module", lambda name, xp: _launch.load_module(
        path if name == "rulebook.cu" else name, simulate=True))
    rng = np.random.default_rng(9)
    coords = random_sites(rng, 80, (9, 9), 2)
    with pytest.raises(AssertionError):
        check_conv("sim", monkeypatch, coords, (9, 9), 3, 2)
        check_hash("sim", monkeypatch, coords, (9, 9))


def test_coordinates_near_int32_max(kind, monkeypatch):
    """d = 1 on a grid of 2**31 - 1: window bounds and neighbours computed without overflow."""
    top = 2**31 - 2
    coords = np.array([[0, 0], [0, 1], [0, top - 1], [0, top], [1, top - 3], [1, top]],
                      dtype=np.int32)
    spatial = (2**31 - 1,)
    check_conv(kind, monkeypatch, coords, spatial, 3, 1)
    check_conv(kind, monkeypatch, coords, spatial, 1, 2)
    for f in (1, 3, 5):
        check_submanifold(kind, monkeypatch, coords, spatial, f)
