"""The CUDA backend's float kernels (sparsecnn._gpu._float) against sparsecnn._cpu, simulated.

Rulebooks come from real geometries built by the CPU (SparseTensor(...).geometry.conv /
.submanifold) in d = 1, 2, 3, with several filter sizes, strides, channel counts and densities
(no site, one site, some, all); their arrays are copied to the simulated device. Every GPU
result is computed with the block/thread schedule forward and reversed and twice: the results
must be bitwise identical. Then: integers exactly equal to the CPU's; max-pooling values and
argmax bitwise (a max is exact); other floats to rtol 1e-5 (fp32) / 1e-12 (fp64) (atol: the
same times the array's largest magnitude); the tiled
kernels bitwise equal to the one-thread-per-value reference kernels (same order of operations).
"""
from __future__ import annotations

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import _cpu as C
from sparsecnn._gpu import _float as G
from sparsecnn._gpu import _launch
from sparsecnn._gpu._arrays import SimArray, to_sim
from sparsecnn.geometry import Rulebook

pytestmark = pytest.mark.skipif(
    _launch.find_host_compiler() is None,
    reason="no host C++ compiler (g++/clang++ with OpenMP) for the CUDA simulation")

RTOL = {np.float32: 1e-5, np.float64: 1e-12}

# (d, N, kind, f, s): kind "conv" (valid, (N - f) % s == 0) or "sub" (submanifold, s = 1)
GEOMS = [
    (1, 9, "conv", 3, 2), (1, 8, "conv", 2, 2), (1, 7, "sub", 3, 1),
    (2, 7, "conv", 3, 2), (2, 6, "conv", 2, 2), (2, 5, "conv", 2, 1), (2, 6, "sub", 3, 1),
    (3, 4, "conv", 2, 2), (3, 4, "sub", 3, 1),
]
DENSITIES = [0.0, "one", 0.35, 1.0]


def gid(g):
    return f"d{g[0]}N{g[1]}{g[2]}{g[3]}s{g[4]}"


def sites(rng, batch, spatial, density):
    total = batch * int(np.prod(spatial))
    n = 1 if density == "one" else int(round(density * total))
    flat = rng.choice(total, size=n, replace=False)
    return np.stack(np.unravel_index(flat, (batch, *spatial)), 1).astype(np.int32)


def case(geom, density, seed=0, batch=2):
    """(CPU rulebook, the same on the simulated device, its output geometry)."""
    d, N, kind, f, s = geom
    rng = np.random.default_rng(seed)
    coords = sites(rng, batch, (N,) * d, density)
    x = scn.SparseTensor(coords, np.zeros((len(coords), 1)), (N,) * d, batch_size=batch)
    if kind == "sub":
        rb, out_geom = x.geometry.submanifold(f), x.geometry
    else:
        rb, out_geom = x.geometry.conv(f, s)
    return rb, dev_rb(rb), out_geom


def dev_rb(rb):
    return Rulebook(to_sim(rb.in_idx), to_sim(rb.out_idx), to_sim(rb.offsets), rb.n_in,
                    rb.n_out, rb.filter_size, rb.stride)


def host(a):
    return None if a is None else (a.get() if isinstance(a, SimArray) else np.asarray(a))


def runs(monkeypatch, fn):
    """fn() forward twice and reversed once; all bitwise identical; returns host copies."""
    res = []
    for rev in (False, False, True):
        monkeypatch.setenv("SPARSECNN_CUDA_SIM_REVERSE", "1" if rev else "0")
        out = fn()
        res.append(tuple(host(o) for o in (out if isinstance(out, tuple) else (out,))))
    for r in res[1:]:
        for a, b in zip(res[0], r):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and a.shape == b.shape
                assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), \
                    "not bitwise identical across runs / the reversed schedule"
    monkeypatch.setenv("SPARSECNN_CUDA_SIM_REVERSE", "0")
    return res[0] if len(res[0]) > 1 else res[0][0]


def bits_equal(a, b):
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                                                 np.ascontiguousarray(b).view(np.uint8))


def close(a, b, dtype):
    """rtol 1e-5 (fp32) / 1e-12 (fp64), and the same times the array's largest magnitude as
    atol (sums that cancel are not relatively accurate in either backend)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    r = RTOL[dtype]
    scale = float(np.max(np.abs(b), initial=1.0)) if np.isfinite(b).all() else 1.0
    np.testing.assert_allclose(a, b, rtol=r, atol=r * scale)


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------- windows, sums

@pytest.mark.parametrize("density", DENSITIES, ids=str)
@pytest.mark.parametrize("geom", GEOMS, ids=gid)
def test_build_window_equals_cpu(geom, density, monkeypatch):
    rb, drb, _ = case(geom, density)
    win = runs(monkeypatch, lambda: G.build_window(drb.in_idx, drb.out_idx, drb.offsets,
                                                   drb.n_out))
    iwin = runs(monkeypatch, lambda: G.build_window(drb.out_idx, drb.in_idx, drb.offsets,
                                                    drb.n_in))
    assert win.dtype == np.int32 and iwin.dtype == np.int32
    assert np.array_equal(win, C.build_window(rb.in_idx, rb.out_idx, rb.offsets, rb.n_out))
    assert np.array_equal(iwin, C.build_window(rb.out_idx, rb.in_idx, rb.offsets, rb.n_in))


def test_window_cached_on_the_rulebook():
    _, drb, _ = case(GEOMS[3], 0.35)
    G.maxpool_forward(to_sim(np.ones((drb.n_in, 2), np.float32)),
                      to_sim(np.zeros(2, np.float32)), drb)
    w = drb.cache["gpu_window"]
    assert isinstance(w, SimArray)
    G.avgpool_forward(to_sim(np.ones((drb.n_in, 2), np.float32)),
                      to_sim(np.zeros(2, np.float32)), drb)
    assert drb.cache["gpu_window"] is w


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (5, 33), (300, 7), (513, 40)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_column_sums_bitwise_equal_to_cpu(shape, dtype, monkeypatch):
    a = randn(np.random.default_rng(shape[0]), shape, dtype)
    got = runs(monkeypatch, lambda: G.column_sums(to_sim(a)))
    assert bits_equal(got, C.column_sums(a))


# --------------------------------------------------------------------------- convolution

CONV_CASES = [(g, dens, cin, cout) for g in GEOMS for dens in DENSITIES
              for cin, cout in ([(1, 3), (5, 40)] if dens == 0.35 else [(3, 2)])]


def conv_data(rb, cin, cout, dtype, seed):
    rng = np.random.default_rng(seed)
    K = rb.kernel_volume
    return (randn(rng, (rb.n_in, cin), dtype), randn(rng, (K, cin, cout), dtype),
            randn(rng, cout, dtype), randn(rng, cin, dtype), randn(rng, (rb.n_out, cout), dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("geom,density,cin,cout", CONV_CASES,
                         ids=lambda v: gid(v) if isinstance(v, tuple) else str(v))
def test_conv_forward_backward_match_cpu(geom, density, cin, cout, dtype, monkeypatch):
    rb, drb, _ = case(geom, density, seed=cin)
    x, W, row, g, gy = conv_data(rb, cin, cout, dtype, seed=7)
    dx, dW, drow, dg, dgy = (to_sim(v) for v in (x, W, row, g, gy))
    ref = C.conv_forward(x, W, row, g, rb)
    out = runs(monkeypatch, lambda: G.conv_forward(dx, dW, drow, dg, drb))
    close(out, ref, dtype)
    simple = runs(monkeypatch, lambda: G.conv_forward_simple(dx, dW, drow, dg, drb))
    assert bits_equal(out, simple), "tiled and simple forward differ"

    rgx, rgw = C.conv_backward(x, W, g, gy, rb)
    gx, gw = runs(monkeypatch, lambda: G.conv_backward(dx, dW, dg, dgy, drb))
    close(gx, rgx, dtype)
    close(gw, rgw, dtype)
    sgx, sgw = runs(monkeypatch, lambda: G.conv_backward_simple(dx, dW, dg, dgy, drb))
    assert bits_equal(gx, sgx), "tiled and simple input gradient differ"
    assert bits_equal(gw, sgw)
    none, gw2 = runs(monkeypatch, lambda: G.conv_backward(dx, dW, dg, dgy, drb,
                                                          grad_input=False))
    assert none is None and bits_equal(gw2, gw)


def test_conv_wide_channels_several_tiles(monkeypatch):
    """More rows, input and output channels than one tile (64 x 32, 16 reduced at a time)."""
    rb, drb, _ = case((2, 9, "sub", 3, 1), 0.6, seed=3)
    assert rb.n_out > 64
    x, W, row, g, gy = conv_data(rb, 37, 70, np.float32, seed=11)
    dx, dW, drow, dg, dgy = (to_sim(v) for v in (x, W, row, g, gy))
    out = runs(monkeypatch, lambda: G.conv_forward(dx, dW, drow, dg, drb))
    close(out, C.conv_forward(x, W, row, g, rb),
          np.float32)
    assert bits_equal(out, host(G.conv_forward_simple(dx, dW, drow, dg, drb)))
    gx, gw = runs(monkeypatch, lambda: G.conv_backward(dx, dW, dg, dgy, drb))
    rgx, rgw = C.conv_backward(x, W, g, gy, rb)
    close(gx, rgx, np.float32)
    close(gw, rgw, np.float32)
    assert bits_equal(gx, host(G.conv_backward_simple(dx, dW, dg, dgy, drb)[0]))


def test_weight_gradient_split_into_several_partials(monkeypatch):
    """Enough pairs per offset for several fixed chunks (S > 1) and their ordered sum."""
    rb, drb, _ = case((2, 20, "sub", 3, 1), 1.0, seed=2)
    K = rb.kernel_volume
    assert rb.n_pairs > 2 * K * G.WGRAD_CHUNK      # S >= 3
    x, W, _, g, gy = conv_data(rb, 2, 3, np.float64, seed=8)
    none, gw = runs(monkeypatch, lambda: G.conv_backward(to_sim(x), to_sim(W), to_sim(g),
                                                         to_sim(gy), drb, grad_input=False))
    assert none is None
    close(gw, C.conv_backward(x, W, g, gy, rb)[1], np.float64)


def test_conv_zero_ground_mode_row_is_the_bias(monkeypatch):
    """row = bias, g_in = 0 (zero-ground mode): outputs start from the bias."""
    rb, drb, _ = case((2, 6, "conv", 2, 2), 0.35, seed=1)
    x, W, b, _, _ = conv_data(rb, 4, 6, np.float64, seed=2)
    g0 = np.zeros(4)
    out = runs(monkeypatch, lambda: G.conv_forward(to_sim(x), to_sim(W), to_sim(b),
                                                   to_sim(g0), drb))
    win = C.window_of(rb)
    expect = np.tile(b, (rb.n_out, 1))
    for o in range(rb.n_out):
        for k in range(win.shape[1]):
            if win[o, k] >= 0:
                expect[o] += x[win[o, k]] @ W[k]
    close(out, expect, np.float64)


# --------------------------------------------------------------------------- conv + max-pool

CMP_CASES = [((2, 10, "conv", 3, 1), 2), ((2, 11, "conv", 3, 1), 3), ((1, 13, "conv", 2, 1), 4),
             ((3, 5, "conv", 2, 1), 2), ((2, 9, "sub", 3, 1), 3)]


@pytest.mark.parametrize("slope", [None, 0.0, 1 / 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("density", [0.0, "one", 0.3, 1.0], ids=str)
@pytest.mark.parametrize("geom,p", CMP_CASES, ids=lambda v: gid(v) if isinstance(v, tuple)
                         else f"p{v}")
def test_conv_maxpool_forward_matches_cpu(geom, p, density, dtype, slope, monkeypatch):
    rb, drb, mid = case(geom, density, seed=p)
    N_mid = mid.spatial_shape[0]
    assert (N_mid - p) % p == 0, "a case whose pool does not fit its grid"
    prb, _ = mid.conv(p, p, "MaxPooling")
    dprb = dev_rb(prb)
    cin, cout = (2, 5) if p != 3 else (6, 33)
    x, W, row, g, _ = conv_data(rb, cin, cout, dtype, seed=5)
    pg = randn(np.random.default_rng(9), cout, dtype)
    args = [to_sim(v) for v in (x, W, row, g)]
    out, arg = runs(monkeypatch, lambda: G.conv_maxpool_forward(*args, drb, dprb, to_sim(pg),
                                                                negative_slope=slope))
    rout, rarg = C.conv_maxpool_forward(x, W, row, g, rb, prb, pg, negative_slope=slope)
    close(out, rout, dtype)
    assert np.array_equal(arg, rarg)
    sout, sarg = runs(monkeypatch, lambda: G.conv_maxpool_forward_simple(
        *args, drb, dprb, to_sim(pg), negative_slope=slope))
    assert bits_equal(out, sout) and np.array_equal(arg, sarg)
    # = maxpool_forward(conv_forward(...)) on the device, bitwise
    mid_feats = G.conv_forward(*args, drb)
    uout, uarg = G.maxpool_forward(mid_feats, to_sim(pg), dprb, negative_slope=slope)
    assert bits_equal(out, host(uout)) and np.array_equal(arg, host(uarg))


@pytest.mark.parametrize("slope", [None, 0.5])
def test_conv_maxpool_ties_integer_valued(slope, monkeypatch):
    """Integer data: every sum is exact in both backends, and ties are frequent (between
    candidates and with the ground): the earlier candidate wins, the ground first."""
    rb, drb, mid = case((2, 10, "conv", 3, 1), 0.3, seed=6)
    prb, _ = mid.conv(2, 2, "MaxPooling")
    rng = np.random.default_rng(1)
    x = rng.integers(-1, 2, (rb.n_in, 2)).astype(np.float32)
    W = rng.integers(-1, 2, (rb.kernel_volume, 2, 5)).astype(np.float32)
    row = rng.integers(-1, 2, 5).astype(np.float32)
    g = rng.integers(-1, 2, 2).astype(np.float32)
    pg = rng.integers(-1, 2, 5).astype(np.float32)
    args = [to_sim(v) for v in (x, W, row, g)]
    out, arg = runs(monkeypatch, lambda: G.conv_maxpool_forward(
        *args, drb, dev_rb(prb), to_sim(pg), negative_slope=slope))
    rout, rarg = C.conv_maxpool_forward(x, W, row, g, rb, prb, pg, negative_slope=slope)
    assert bits_equal(out, rout) and np.array_equal(arg, rarg)
    sout, sarg = G.conv_maxpool_forward_simple(*args, drb, dev_rb(prb), to_sim(pg),
                                               negative_slope=slope)
    assert bits_equal(out, host(sout)) and np.array_equal(arg, host(sarg))


def test_conv_maxpool_ground_minus_inf(monkeypatch):
    """pool_ground = -inf (active sites only): the ground never wins."""
    rb, drb, mid = case((2, 10, "conv", 3, 1), 0.2, seed=4)
    prb, _ = mid.conv(2, 2, "MaxPooling")
    x, W, row, g, _ = conv_data(rb, 3, 4, np.float32, seed=3)
    pg = np.full(4, -np.inf, np.float32)
    out, arg = runs(monkeypatch, lambda: G.conv_maxpool_forward(
        to_sim(x), to_sim(W), to_sim(row), to_sim(g), drb, dev_rb(prb), to_sim(pg)))
    assert (arg >= 0).all() and np.isfinite(out).all()
    rout, rarg = C.conv_maxpool_forward(x, W, row, g, rb, prb, pg)
    close(out, rout, np.float32)
    assert np.array_equal(arg, rarg)


# --------------------------------------------------------------------------- pooling

POOL_GEOMS = [g for g in GEOMS if g[2] == "conv"]


def pool_features(rng, n, c, dtype, ties):
    if ties:   # few distinct values: ties between inputs and with the ground
        return rng.integers(-2, 3, (n, c)).astype(dtype)
    return randn(rng, (n, c), dtype)


@pytest.mark.parametrize("slope", [None, 0.0, 0.25])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("density", DENSITIES, ids=str)
@pytest.mark.parametrize("geom", POOL_GEOMS, ids=gid)
def test_maxpool_matches_cpu(geom, density, dtype, ties, slope, monkeypatch):
    rb, drb, _ = case(geom, density, seed=3)
    rng = np.random.default_rng(4)
    Cn = 5
    x = pool_features(rng, rb.n_in, Cn, dtype, ties)
    g = pool_features(rng, 1, Cn, dtype, ties)[0]
    gy = randn(rng, (rb.n_out, Cn), dtype)
    out, arg = runs(monkeypatch, lambda: G.maxpool_forward(to_sim(x), to_sim(g), drb,
                                                           negative_slope=slope))
    rout, rarg = C.maxpool_forward(x, g, rb, negative_slope=slope)
    assert bits_equal(out, rout) and np.array_equal(arg, rarg)
    if density == 1.0 and geom[3] == geom[4]:
        assert (arg >= 0).all()       # no gap: the ground is no candidate
    gx, gg = runs(monkeypatch, lambda: G.maxpool_backward(
        to_sim(gy), to_sim(arg), drb, negative_slope=slope,
        output=to_sim(out) if slope is not None else None))
    rgx, rgg = C.maxpool_backward(gy, rarg, rb, negative_slope=slope,
                                  output=rout if slope is not None else None)
    close(gx, rgx, dtype)
    close(gg, rgg, dtype)


def test_maxpool_ground_gradient_counts_only_windows_with_a_gap(monkeypatch):
    """argmax -1 in a full window (all inputs -inf) is no ground win: no ground gradient."""
    rb, drb, _ = case((1, 8, "conv", 2, 2), 1.0)
    x = np.full((rb.n_in, 1), -np.inf)
    out, arg = G.maxpool_forward(to_sim(x), to_sim(np.zeros(1)), drb)
    assert (host(arg) == -1).all() and np.isneginf(host(out)).all()
    gx, gg = G.maxpool_backward(to_sim(np.ones((rb.n_out, 1))), arg, drb)
    assert host(gg)[0] == 0 and (host(gx) == 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("density", DENSITIES, ids=str)
@pytest.mark.parametrize("geom", POOL_GEOMS, ids=gid)
def test_avgpool_matches_cpu(geom, density, dtype, monkeypatch):
    rb, drb, _ = case(geom, density, seed=5)
    rng = np.random.default_rng(6)
    Cn = 3
    x, g, gy = randn(rng, (rb.n_in, Cn), dtype), randn(rng, Cn, dtype), \
        randn(rng, (rb.n_out, Cn), dtype)
    out = runs(monkeypatch, lambda: G.avgpool_forward(to_sim(x), to_sim(g), drb))
    close(out, C.avgpool_forward(x, g, rb), dtype)
    gx, gg = runs(monkeypatch, lambda: G.avgpool_backward(to_sim(gy), drb))
    rgx, rgg = C.avgpool_backward(gy, rb)
    close(gx, rgx, dtype)
    close(gg, rgg, dtype)


# --------------------------------------------------------------------------- device rules

def test_results_stay_on_the_device_and_host_arrays_are_refused():
    rb, drb, _ = case(GEOMS[3], 0.35)
    x, W, row, g, _ = conv_data(rb, 2, 3, np.float32, seed=0)
    out = G.conv_forward(to_sim(x), to_sim(W), to_sim(row), to_sim(g), drb)
    assert isinstance(out, SimArray) and out.device == "cuda"
    with pytest.raises(TypeError):
        G.conv_forward(to_sim(x), W, to_sim(row), to_sim(g), drb)   # host weight
    with pytest.raises(TypeError):
        G.conv_forward(to_sim(x), to_sim(W.astype(np.float64)), to_sim(row), to_sim(g), drb)
