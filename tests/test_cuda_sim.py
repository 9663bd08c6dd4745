"""The CUDA kernels run on the CPU through the simulation (sparsecnn/_gpu/cuda_sim.h).

Each kernel is checked against NumPy / sparsecnn._cpu on small inputs with edge cases, and
run with the block/thread schedule forward and reversed: results must be bitwise identical,
and two runs bitwise equal. Deliberately broken kernels (a barrier removed from the real
column-sum kernel, the probes in tests/cuda/sim_probes.cu) show that these checks catch races.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from sparsecnn import _cpu
from sparsecnn._gpu import _launch

pytestmark = pytest.mark.skipif(
    _launch.find_host_compiler() is None,
    reason="no host C++ compiler (g++/clang++ with OpenMP) for the CUDA simulation")

PROBES = Path(__file__).resolve().parent / "cuda" / "sim_probes.cu"
CHUNK = 256  # rows per column-sum chunk: the CPU kernel's SUM_ROWS


def sim(filename):
    return _launch.load_module(filename, simulate=True)


# --------------------------------------------------------------------------- column sums

def column_sums(a, *, reverse=False, block=128, module="column_sums.cu"):
    """Two-pass column sums through the simulated kernels (the future _gpu wrapper)."""
    mod = sim(module)
    n, C = a.shape
    sfx = "f32" if a.dtype == np.float32 else "f64"
    out = np.zeros(C, dtype=a.dtype)
    if n == 0 or C == 0:
        return out
    n_chunks = (n + CHUNK - 1) // CHUNK
    partial = np.empty((n_chunks, C), dtype=a.dtype)
    mod.get_function(f"scnn_column_sums_partial_{sfx}")(
        (n_chunks, (C + 31) // 32), block,
        (a, np.int64(n), np.int32(C), np.int32(CHUNK), partial), reverse=reverse)
    mod.get_function(f"scnn_column_sums_final_{sfx}")(
        ((C + 255) // 256,), 256, (partial, np.int32(n_chunks), np.int32(C), out),
        reverse=reverse)
    return out


COLSUM_SHAPES = [(0, 4), (3, 0), (1, 1), (1, 33), (2, 5), (63, 7), (65, 32), (255, 3),
                 (256, 32), (257, 33), (700, 70), (1030, 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", COLSUM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_column_sums_match_cpu_bitwise(shape, dtype):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    a = (rng.standard_normal(shape) * 10).astype(dtype)
    fwd = column_sums(a)
    rev = column_sums(a, reverse=True)
    assert fwd.dtype == dtype and fwd.shape == (shape[1],)
    assert np.array_equal(fwd.view(np.uint8), rev.view(np.uint8)), "reversed schedule differs"
    assert np.array_equal(fwd.view(np.uint8), _cpu.column_sums(a).view(np.uint8))
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(fwd, a.astype(np.float64).sum(axis=0), rtol=tol,
                               atol=tol * max(1, shape[0]) * 10)


@pytest.mark.parametrize("block", [32, 96, 256, 1024])
def test_column_sums_any_block_size_same_bits(block):
    a = np.random.default_rng(1).standard_normal((600, 40)).astype(np.float32)
    ref = _cpu.column_sums(a)
    assert np.array_equal(column_sums(a, block=block), ref)
    assert np.array_equal(column_sums(a, block=block, reverse=True), ref)


def test_column_sums_deterministic_and_special_values():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((513, 9)).astype(np.float32)
    a[5, 1] = np.inf
    a[7, 2] = np.nan
    a[:, 3] = -0.0  # a column of negative zeros sums to -0.0 on the CPU (no 0 + x)
    runs = [column_sums(a) for _ in range(2)] + [column_sums(a, reverse=True)]
    for r in runs[1:]:
        assert np.array_equal(runs[0].view(np.uint32), r.view(np.uint32))
    assert np.array_equal(runs[0].view(np.uint32), _cpu.column_sums(a).view(np.uint32))
    assert np.signbit(runs[0][3])


def _mutated(tmp_path, which):
    """column_sums.cu with one of its two barriers deleted."""
    src = (_launch.KERNEL_DIR / "column_sums.cu").read_text()
    marker = {"tile_complete": "the tile is complete",
              "before_overwrite": "before the tile is overwritten"}[which]
    line = re.compile(r"^\s*__syncthreads\(\);\s*//.*" + re.escape(marker) + r".*$", re.M)
    new, count = line.subn("", src)
    assert count == 1, f"barrier '{marker}' not found in column_sums.cu"
    path = tmp_path / f"column_sums_no_{which}.cu"
    path.write_text(new)
    return path


def test_missing_reuse_barrier_caught_only_by_reversed_schedule(tmp_path):
    """Deleting the barrier before the shared tile is refilled: with 32 columns each thread
    reloads only its own column, so the forward schedule still gives the right answer; the
    reversed one lets the last threads refill the tile before the first have read it."""
    path = _mutated(tmp_path, "before_overwrite")
    a = np.random.default_rng(3).standard_normal((200, 32)).astype(np.float32)
    ref = _cpu.column_sums(a)
    fwd = column_sums(a, module=path)
    rev = column_sums(a, module=path, reverse=True)
    assert np.array_equal(fwd, ref)          # the race is hidden in this order...
    assert not np.array_equal(fwd, rev)      # ...and the comparison exposes it
    # with 7 columns the reload crosses columns: then the forward order is already wrong
    b = np.random.default_rng(4).standard_normal((200, 7)).astype(np.float32)
    assert not np.array_equal(column_sums(b, module=path), _cpu.column_sums(b))


def test_missing_tile_barrier_caught_by_result_check(tmp_path):
    """Deleting the barrier after the tile is staged: forward, thread c sums column c before
    the later threads have stored their part of it. Reversed, those threads run first, so this
    bug hides there: each order catches what the other hides."""
    path = _mutated(tmp_path, "tile_complete")
    a = np.random.default_rng(5).standard_normal((300, 40)).astype(np.float64)
    ref = _cpu.column_sums(a)
    fwd = column_sums(a, module=path)
    assert not np.array_equal(fwd, ref)
    assert not np.array_equal(fwd, column_sums(a, module=path, reverse=True))


# --------------------------------------------------------------------------- hash

def _bits(n):
    bits = 4
    while (1 << bits) < 2 * n:
        bits += 1
    return bits


def build_hash(coords, spatial_shape, *, reverse=False, bits=None, block=64):
    """build_hash through the simulated kernels; returns keys, vals, inverse, n_unique, full."""
    mod = sim("hash.cu")
    n, d = coords.shape[0], coords.shape[1] - 1
    bits = _bits(n) if bits is None else bits
    cap = 1 << bits
    keys = np.full(cap, -1, dtype=np.int64)
    vals = np.full(cap, -1, dtype=np.int32)
    inverse = np.empty(n, dtype=np.int32)
    if n == 0:
        return keys, vals, inverse, 0, False
    first = np.full(cap, np.iinfo(np.int32).max, dtype=np.int32)
    slot_of = np.empty(n, dtype=np.int32)
    full = np.zeros(1, dtype=np.int32)
    grid = ((n + block - 1) // block,)
    shape = np.ascontiguousarray(spatial_shape, dtype=np.int64)
    mod.get_function("scnn_hash_insert")(
        grid, block, (coords, np.int32(n), np.int32(d), shape, keys, np.int64(cap),
                      np.int32(64 - bits), first, slot_of, full), reverse=reverse)
    if full[0]:
        return keys, vals, inverse, -1, True
    flag = np.empty(n, dtype=np.int32)
    mod.get_function("scnn_hash_first_flags")(grid, block, (slot_of, first, np.int32(n), flag),
                                              reverse=reverse)
    rank = (np.cumsum(flag, dtype=np.int32) - flag).astype(np.int32)
    mod.get_function("scnn_hash_number")(
        grid, block, (slot_of, first, rank, np.int32(n), inverse, vals), reverse=reverse)
    return keys, vals, inverse, int(flag.sum()), False


def lookup(keys, vals, queries, *, reverse=False, block=64):
    mod = sim("hash.cu")
    cap = keys.shape[0]
    out = np.empty(len(queries), dtype=np.int32)
    if len(queries):
        mod.get_function("scnn_hash_lookup")(
            ((len(queries) + block - 1) // block,), block,
            (keys, vals, np.int64(cap), np.int32(64 - (cap.bit_length() - 1)),
             queries, np.int32(len(queries)), out), reverse=reverse)
    return out


def pack(coords, spatial_shape):
    key = coords[:, 0].astype(np.int64)
    for j, s in enumerate(spatial_shape):
        key = key * int(s) + coords[:, 1 + j]
    return key


def table_items(keys, vals):
    occ = keys != -1
    return sorted(zip(keys[occ].tolist(), vals[occ].tolist()))


def random_coords(rng, n, spatial_shape, batch, dup_frac):
    d = len(spatial_shape)
    base = np.empty((max(n, 1), 1 + d), dtype=np.int32)
    base[:, 0] = rng.integers(0, batch, len(base))
    for j, s in enumerate(spatial_shape):
        base[:, 1 + j] = rng.integers(0, s, len(base))
    c = base[:n].copy()
    k = int(n * dup_frac)
    if k and n > 1:
        c[rng.integers(0, n, k)] = c[rng.integers(0, n, k)]  # duplicates, anywhere
    return np.ascontiguousarray(c)


HASH_CASES = [  # (n, spatial_shape, batch, duplicate fraction)
    (0, (8, 8), 1, 0.0), (1, (8, 8), 1, 0.0), (2, (1, 1), 1, 0.0), (65, (5, 7), 2, 0.3),
    (300, (16, 16), 3, 0.5), (500, (6, 5, 4), 2, 0.2), (1000, (40, 40), 4, 0.1),
]


@pytest.mark.parametrize("case", HASH_CASES, ids=lambda c: f"n{c[0]}-d{len(c[1])}")
def test_hash_matches_cpu(case):
    n, shape, batch, dup = case
    rng = np.random.default_rng(n + 7)
    coords = random_coords(rng, n, shape, batch, dup)
    shape64 = np.array(shape, dtype=np.int64)
    ckeys, cvals, cinv, cn = _cpu.build_hash(coords, shape64)
    runs = [build_hash(coords, shape64, reverse=r) for r in (False, True, False)]
    for keys, vals, inv, nu, full in runs:
        assert not full
        assert nu == cn
        assert np.array_equal(inv, cinv)  # numbering by first occurrence: the CPU's, exactly
        assert keys.shape == ckeys.shape
        assert table_items(keys, vals) == table_items(ckeys, cvals)
    # queries: every key present, absent keys, the empty marker
    present = pack(coords, shape) if n else np.empty(0, np.int64)
    total = batch * int(np.prod(shape))
    absent = np.setdiff1d(np.arange(total, dtype=np.int64), present)[:50]
    queries = np.concatenate([present, absent, [-1, total + 5]]).astype(np.int64)
    expect = np.concatenate([cinv, np.full(len(absent) + 2, -1)]).astype(np.int32)
    for keys, vals, *_ in runs:
        for r in (False, True):
            assert np.array_equal(lookup(keys, vals, queries, reverse=r), expect)


def test_hash_near_full_and_full_tables():
    rng = np.random.default_rng(11)
    shape = np.array([64, 64], dtype=np.int64)
    # 16 distinct sites in a 16-slot table (load 1.0), each given 3 times: long probe chains
    # that wrap around the end of the table
    sites = random_coords(rng, 200, (64, 64), 1, 0.0)
    _, idx = np.unique(pack(sites, shape), return_index=True)
    distinct = sites[np.sort(idx)[:17]]
    coords = np.ascontiguousarray(np.concatenate([distinct[:16]] * 3)[rng.permutation(48)])
    ref = {k: i for i, k in reversed(list(enumerate(pack(coords, shape))))}
    first_rows = sorted(ref.values())
    for r in (False, True):
        keys, vals, inv, nu, full = build_hash(coords, shape, reverse=r, bits=4)
        assert not full and nu == 16 and (keys != -1).all()
        expect_inv = np.array([first_rows.index(ref[k]) for k in pack(coords, shape)])
        assert np.array_equal(inv, expect_inv)
        absent = np.array([pack(distinct[16:17], shape)[0], 4095], dtype=np.int64)
        q = np.concatenate([pack(coords, shape), absent])
        assert np.array_equal(lookup(keys, vals, q, reverse=r),
                              np.concatenate([expect_inv, [-1, -1]]))
    # 17 distinct sites cannot fit: reported, not an endless probe
    over = np.ascontiguousarray(distinct[:17])
    *_, full = build_hash(over, shape, bits=4)
    assert full


# --------------------------------------------------------------------------- probes

def test_tree_reduction_with_barriers_and_broken_barrier():
    mod = sim(PROBES)
    k = mod.get_function("probe_tree_sum")
    x = np.random.default_rng(6).integers(-1000, 1000, 1000).astype(np.int32)
    for block in (32, 128, 1024):
        nb = (len(x) + block - 1) // block
        expect = np.add.reduceat(x, np.arange(0, len(x), block)).astype(np.int32)
        outs = []
        for reverse in (False, True):
            out = np.empty(nb, dtype=np.int32)
            k((nb,), block, (x, np.int32(len(x)), np.int32(0), out), reverse=reverse)
            outs.append(out)
            assert np.array_equal(out, expect)
        broken = np.empty(nb, dtype=np.int32)
        k((nb,), block, (x, np.int32(len(x)), np.int32(1), broken))
        assert not np.array_equal(broken, expect), "a missing barrier went unnoticed"


def test_early_exit_before_barrier():
    k = sim(PROBES).get_function("probe_early_exit")
    x = np.arange(100, dtype=np.int32) * 3
    for reverse in (False, True):
        out = np.full(100, -1, dtype=np.int32)
        k((2,), 64, (x, np.int32(100), out), reverse=reverse)
        expect = x.copy()
        idx = np.arange(100)
        ok = ((idx % 64) != 63) & (idx + 1 < 100)
        expect[ok] = x[idx[ok] + 1]
        assert np.array_equal(out, expect)


def test_inter_thread_race_differs_when_reversed():
    k = sim(PROBES).get_function("probe_last_writer")
    outs = []
    for reverse in (False, True):
        out = np.zeros(1, dtype=np.int32)
        k((1,), 64, (out,), reverse=reverse)
        outs.append(int(out[0]))
    assert outs == [63, 0]


def test_divergent_barrier_is_reported():
    k = sim(PROBES).get_function("probe_divergent_barrier")
    out = np.zeros(64, dtype=np.int32)
    with pytest.raises(_launch.SimError, match="different __syncthreads"):
        k((3,), 64, (out,))
    # the fibers abandoned at the barrier are usable again
    tree = sim(PROBES).get_function("probe_tree_sum")
    x = np.ones(64, dtype=np.int32)
    res = np.zeros(1, dtype=np.int32)
    tree((1,), 64, (x, np.int32(64), np.int32(0), res))
    assert res[0] == 64


def test_indices_in_three_dimensions():
    k = sim(PROBES).get_function("probe_indices")
    grid, block = (3, 2, 2), (4, 2, 3)
    nb, tpb = 12, 24
    out = np.full((nb * tpb, 6), -1, dtype=np.int32)
    k(grid, block, (out,), reverse=True)
    bz, by, bx, tz, ty, tx = np.meshgrid(*(np.arange(v) for v in (2, 2, 3, 3, 2, 4)),
                                         indexing="ij")
    expect = np.stack([a.ravel() for a in (bx, by, bz, tx, ty, tz)], axis=1)
    assert np.array_equal(out, expect)


def test_atomics():
    k = sim(PROBES).get_function("probe_atomics")
    rng = np.random.default_rng(8)
    x = rng.integers(0, 40, 777).astype(np.int32)
    n = len(x)
    results = []
    for reverse in (False, True, False):
        ci = np.array([0, 0, 10**9, -(10**9), 0, 0], dtype=np.int32)
        cu = np.array([0, 2**32 - 1, 0], dtype=np.uint32)
        cull = np.array([0, 2**64 - 1, 0], dtype=np.uint64)
        cll = np.array([2**62, -(2**62)], dtype=np.int64)
        cf = np.zeros(1, dtype=np.float32)
        cd = np.zeros(1, dtype=np.float64)
        owner = np.full(8, -1, dtype=np.int32)
        k(((n + 127) // 128,), 128, (x, np.int32(n), ci, cu, cull, cll, cf, cd, owner),
          reverse=reverse)
        s = int(x.sum())
        assert ci.tolist() == [s, -s, x.min(), x.max(),
                               np.bitwise_or.reduce(1 << (x & 31)).item(), 7]
        assert cu.tolist() == [s, x.min(), x.max()]
        assert cull.tolist() == [s << 33, int(x.min()) << 33, int(x.max()) << 33]
        assert cll.tolist() == [-(int(x.max()) << 33), -(int(x.min()) << 33)]
        assert cf[0] == s and cd[0] == s
        for v in range(8):  # each slot was claimed by some thread holding such a value
            rows = np.flatnonzero((x & 7) == v)
            assert (owner[v] in rows) if len(rows) else owner[v] == -1
        results.append(ci.copy())
    assert all(np.array_equal(results[0], r) for r in results)


# --------------------------------------------------------------------------- the launcher

def test_argument_checks():
    mod = sim("column_sums.cu")
    k = mod.get_function("scnn_column_sums_final_f32")
    part = np.zeros((2, 3), dtype=np.float32)
    out = np.zeros(3, dtype=np.float32)
    ok = (part, np.int32(2), np.int32(3), out)
    k(1, 32, ok)
    with pytest.raises(TypeError, match=r"argument 1 \(int32 n_chunks\).*Python int"):
        k(1, 32, (part, 2, np.int32(3), out))
    with pytest.raises(TypeError, match="needs dtype float32, got float64"):
        k(1, 32, (part.astype(np.float64), np.int32(2), np.int32(3), out))
    with pytest.raises(TypeError, match="takes 4 arguments"):
        k(1, 32, ok[:3])
    with pytest.raises(TypeError, match="needs a numpy array"):
        k(1, 32, (part, np.int32(2), np.int32(3), [0.0] * 3))
    with pytest.raises(ValueError, match="C-contiguous"):
        k(1, 32, (np.zeros((3, 2), np.float32).T, np.int32(2), np.int32(3), out))
    ro = out.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        k(1, 32, (part, np.int32(2), np.int32(3), ro))
    ro_in = part.copy()
    ro_in.flags.writeable = False
    k(1, 32, (ro_in, np.int32(2), np.int32(3), out))  # const pointer: read-only is fine
    with pytest.raises(ValueError, match=">= 1"):
        k(0, 32, ok)
    with pytest.raises(ValueError, match="1024 threads"):
        k(1, 2048, ok)
    with pytest.raises(AttributeError, match="no kernel"):
        mod.get_function("nope")
    assert mod.get_function("scnn_column_sums_final_f32") is k


def test_parse_kernels():
    sigs = _launch.parse_kernels(
        'extern "C" __global__ void f(const float* __restrict__ a, long long n,\n'
        '  unsigned long long* k, double x) {}\n'
        '// extern "C" __global__ void commented(int a) {}\n'
        'extern "C" __global__ void g() {}\n')
    assert list(sigs) == ["f", "g"]
    a, n, k, x = sigs["f"]
    assert (a.pointer, a.const, a.dtype) == (True, True, np.float32)
    assert (n.pointer, n.dtype) == (False, np.int64)
    assert (k.pointer, k.const, k.dtype) == (True, False, np.uint64)
    assert (x.pointer, x.dtype) == (False, np.float64)
    with pytest.raises(ValueError, match="portable subset"):
        _launch.parse_kernels('extern "C" __global__ void h(float2 v) {}')


def test_reverse_from_environment(monkeypatch):
    k = sim(PROBES).get_function("probe_last_writer")
    out = np.zeros(1, dtype=np.int32)
    monkeypatch.setenv("SPARSECNN_CUDA_SIM_REVERSE", "1")
    k((1,), 16, (out,))
    assert out[0] == 0
    monkeypatch.setenv("SPARSECNN_CUDA_SIM_REVERSE", "0")
    k((1,), 16, (out,))
    assert out[0] == 15


def test_simulation_env_selects_sim_module(monkeypatch):
    monkeypatch.setenv("SPARSECNN_CUDA_SIM", "1")
    assert _launch.simulation_requested()
    assert isinstance(_launch.load_module("hash.cu"), _launch.SimModule)


def test_cupy_launcher_interface_with_a_stub(monkeypatch):
    """The CuPy launcher, without CuPy: a stub module records what would reach CuPy."""
    import sys
    import types

    calls = []

    class StubArray:
        def __init__(self, a):
            self.dtype, self.shape, self.flags = a.dtype, a.shape, a.flags

    class StubRawModule:
        def __init__(self, code, options):
            calls.append(("module", options, "scnn_hash_lookup" in code))

        def get_function(self, name):
            return lambda grid, block, args, shared_mem=0: calls.append(
                ("launch", name, grid, block, args, shared_mem))

    stub = types.ModuleType("cupy")
    stub.ndarray, stub.RawModule = StubArray, StubRawModule
    monkeypatch.setitem(sys.modules, "cupy", stub)
    mod = _launch.CupyModule(_launch.KERNEL_DIR / "hash.cu")
    k = mod.get_function("scnn_hash_lookup")
    keys = StubArray(np.zeros(16, np.int64))
    vals = StubArray(np.zeros(16, np.int32))
    q = StubArray(np.zeros(3, np.int64))
    out = StubArray(np.zeros(3, np.int32))
    k(1, 64, (keys, vals, np.int64(16), np.int32(60), q, np.int32(3), out))
    assert calls[0] == ("module", (*_launch.NVRTC_OPTIONS, f"-I{_launch.KERNEL_DIR}"), True)
    _, name, grid, block, args, shm = calls[1]
    assert (name, grid, block, shm) == ("scnn_hash_lookup", (1, 1, 1), (64, 1, 1), 0)
    assert args[0] is keys and args[2].dtype == np.int64 and args[3].dtype == np.int32
    k(1, 64, (keys, vals, 16, np.int32(60), q, np.int32(3), out))  # int -> int64, as CuPy
    with pytest.raises(TypeError, match=r"argument 3 \(int32 shift\) needs numpy.int32"):
        k(1, 64, (keys, vals, np.int64(16), 60, q, np.int32(3), out))
    with pytest.raises(TypeError, match="needs a cupy array"):
        k(1, 64, (np.zeros(16, np.int64), vals, np.int64(16), np.int32(60), q, np.int32(3),
                  out))
