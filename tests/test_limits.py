"""Extremes of every size argument: the right answer or a clear error, never a crash.

Each layer (Convolution, SubmanifoldConvolution, MaxPooling, AveragePooling) in d = 1..4
meets one active site on the largest grids the coordinate hash allows, windows covering
the whole grid, strides near 2**31 on axes longer than 2**30, strides beyond int32 and
batch indices near 2**31. The answers are checked against a hand computation for one site
(ground state 0). The cases run in a subprocess per layer, so that a crash in a kernel
fails the test instead of killing the run; the subprocess prints one line per case.
Also: scratch memory of large windows and far batch indices (peak RSS in a subprocess),
the window table rule, the pair-list paths against the window paths, and every checked
scratch allocation of the kernels (a test hook makes the n-th one fail).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import _cpu
from sparsecnn._cpu import _conv, _pool, _rulebook

ROOT = Path(__file__).resolve().parent.parent
I32 = 2**31 - 1
# the largest grid side the packed int64 keys allow for d (batch_size * N**d < 2**62)
NMAX = {1: I32, 2: I32, 3: 2**20, 4: 2**15}
LAYERS = ("Convolution", "SubmanifoldConvolution", "MaxPooling", "AveragePooling")
V = np.array([2.0, -3.0])        # the one site's features (C = 2)


def _cases(layer: str, d: int) -> list[dict]:
    """(name, N, f, s, site, batch, batch_size, error) for one layer and dimension; error is
    None (check the value) or a text the ValueError must contain."""
    n = NMAX[d]
    sub = layer == "SubmanifoldConvolution"
    out = []

    def add(name, N, f, s, site, batch=0, batch_size=None, error=None):
        out.append(dict(name=name, N=N, f=f, s=s, site=site, batch=batch,
                        batch_size=batch_size, error=error))

    if sub:
        add("f=1 far corner", n, 1, 1, n - 1)
        add("f=3 far corner", n, 3, 1, n - 1)
        add("f=5 next to the far corner", n, 5, 1, n - 2)
        add("f=3 origin", n, 3, 1, 0)
        add("f=3 batch index 2**31 - 2", 4, 3, 1, 3, batch=I32 - 1, batch_size=I32)
        return out
    add("f=1 s=N-1 far corner", n, 1, n - 1, n - 1)
    add("f=1 s=N-1 origin", n, 1, n - 1, 0)
    even = n - (n % 2)
    add("f=2 s=2 far corner", even, 2, 2, even - 1)
    if n > 2**30:       # strides near 2**31 on axes longer than 2**30
        add("f=3 s=2**31-4", n, 3, n - 3, n - 1)
        w = 2**12 if layer == "Convolution" else 2**20     # a convolution's weight is K deep
        if w ** d <= 2**24:
            add("f=s=2**20 far corner", (I32 // w) * w, w, w, (I32 // w) * w - 1)
        elif layer != "Convolution":
            add("f=s=2**20", (I32 // w) * w, w, w, 0, error=f"pool_size**dim = {w}**{d}")
    # a window covering the whole grid: up to 2**24 positions (2**16 for a convolution,
    # whose weight holds one matrix per position), beyond that a clear error
    big = 2**16 if layer == "Convolution" else 2**24
    side = int(round(big ** (1 / d)))
    while (side + 1) ** d <= big:
        side += 1
    while side ** d > big:
        side -= 1
    add("global window", side, side, side, side // 3)
    add("global window, stride 2**31 - 1", 4, 4, I32, 3)
    add("stride beyond int32", 4, 4, 2**31, 3, error="stride must be <= 2**31 - 1, got 2147483648")
    add("stride 2**40", 4, 4, 2**40, 3, error="stride")
    if layer != "Convolution":
        add("window volume beyond 2**24", side + 1, side + 1, side + 1, 0,
            error=f"pool_size**dim = {side + 1}**{d}")
        if d == 2:
            add("MaxPooling(65536) on 65536**2", 65536, 65536, 65536, 5, error="2**24")
    add("batch index 2**31 - 2", 4, 2, 2, 3, batch=I32 - 1, batch_size=I32)
    return out


def _expected(layer, c, weight):
    """Output coordinates and features of the one site (ground 0, bias 0), by hand."""
    d = len(c["shape"])
    p, f, s = c["site"], c["f"], c["s"]
    if layer == "SubmanifoldConvolution":
        K = f ** d
        return [[c["batch"], *[p] * d]], [V @ weight[(K - 1) // 2]]
    o = p // s
    assert o * s <= p < o * s + f     # the cases put the site in exactly one window
    j = p - o * s                     # its position in the window, in every dimension
    k = sum(j * f ** (d - 1 - i) for i in range(d))
    K = f ** d
    if layer == "MaxPooling":
        val = V if K == 1 else np.maximum(V, 0)
    elif layer == "AveragePooling":
        val = V / K
    else:
        val = V @ weight[k]
    return [[c["batch"], *[o] * d]], [val]


def run_cases(layer: str) -> None:
    """Subprocess side: every case of the layer, one JSON line each."""
    for d in (1, 2, 3, 4):
        for c in _cases(layer, d):
            c["shape"] = (c["N"],) * d
            res = dict(layer=layer, d=d, name=c["name"])
            print(json.dumps({**res, "started": True}), flush=True)
            try:
                x = scn.SparseTensor(np.array([[c["batch"], *[c["site"]] * d]]), V[None],
                                     c["shape"], batch_size=c["batch_size"])
                weight = None
                if layer == "Convolution":
                    m = scn.Convolution(2, 3, c["f"], c["s"], dim=d, dtype=np.float64, seed=1)
                    weight = m.weight.data
                elif layer == "SubmanifoldConvolution":
                    m = scn.SubmanifoldConvolution(2, 3, c["f"], dim=d, dtype=np.float64,
                                                   seed=1)
                    weight = m.weight.data
                elif layer == "MaxPooling":
                    m = scn.MaxPooling(c["f"], c["s"], dim=d)
                else:
                    m = scn.AveragePooling(c["f"], c["s"], dim=d)
                y = m(x)
                if c["error"] is not None:
                    res["fail"] = f"no error, expected one about {c['error']!r}"
                else:
                    coords, feats = _expected(layer, c, weight)
                    if y.coords.tolist() != coords:
                        res["fail"] = f"coords {y.coords.tolist()} != {coords}"
                    elif not np.allclose(y.features, feats, rtol=1e-12, atol=1e-12):
                        res["fail"] = f"features {y.features.tolist()} != {feats}"
            except ValueError as e:
                if c["error"] is None or c["error"] not in str(e):
                    res["fail"] = f"ValueError {e}"
            except Exception as e:  # noqa: BLE001 - reported to the test
                res["fail"] = f"{type(e).__name__}: {e}"
            print(json.dumps(res), flush=True)


def _subprocess(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("layer", LAYERS)
def test_extremes_right_answer_or_clear_error(layer):
    out = _subprocess(f"from tests.test_limits import run_cases; run_cases({layer!r})")
    lines = [json.loads(s) for s in out.stdout.splitlines() if s.startswith("{")]
    done = [r for r in lines if "started" not in r]
    if out.returncode != 0:
        last = lines[-1] if lines else None
        pytest.fail(f"{layer}: the subprocess died (rc {out.returncode}) in case {last}: "
                    f"{out.stderr[-2000:]}")
    fails = [r for r in done if "fail" in r]
    assert not fails, fails
    assert len(done) == sum(len(_cases(layer, d)) for d in (1, 2, 3, 4))


# -- the checks before any work -------------------------------------------------------------
def test_window_rule_agrees_with_the_kernel(rng):
    """The rulebook kernel fills the window table exactly when window_of would build one."""
    from sparsecnn._cpu import _ops
    assert _rulebook.window_fits(10**6, 16, 10**6)         # K <= 16: always
    assert not _rulebook.window_fits(2, 2**20, 1000)
    for f, N in [(2, 8), (64, 64), (1025, 1025)]:
        x = scn.SparseTensor(np.array([[0, 0, 0], [0, N - 1, N - 1]], np.int32),
                             np.ones((2, 1), np.float32), (N, N))
        rb, _ = x.geometry.conv(f, f, "MaxPooling")
        fits = _rulebook.window_fits(rb.n_out, rb.kernel_volume, rb.n_pairs)
        assert (rb.cache["window"] is not None) == fits
        rebuilt = _ops.window_of(type(rb)(rb.in_idx, rb.out_idx, rb.offsets, rb.n_in,
                                          rb.n_out, f, f))
        assert (rebuilt is None) == (not fits)
        if fits:
            np.testing.assert_array_equal(rebuilt, rb.cache["window"])


def _one_site(shape, batch=0, batch_size=None):
    return scn.SparseTensor(np.array([[batch] + [0] * len(shape)]), np.ones((1, 1)), shape,
                            batch_size=batch_size)


def test_submanifold_window_volume_refused_before_any_work():
    x = _one_site((2**20, 2**20))
    with pytest.raises(ValueError, match=r"filter_size\*\*dim = 4097\*\*2 = 16785409 exceeds"):
        x.geometry.submanifold(4097)
    with pytest.raises(ValueError, match=r"filter_size\*\*dim = 65537\*\*2"):
        x.geometry.submanifold(65537)


def test_convolution_window_volume_refused_before_any_work():
    x = _one_site((2**16, 2**16))
    with pytest.raises(ValueError, match=r"Convolution: filter_size\*\*dim = 65536\*\*2"):
        x.geometry.conv(65536, 65536, "Convolution")


def test_too_many_pairs_refused_before_any_work():
    """128 sites, each in 64**4 = 2**24 windows: 2**31 pairs, more than int32 indexes."""
    rng = np.random.default_rng(0)
    c = np.unique(rng.integers(0, 2**15, (128, 4)), axis=0)
    c = np.column_stack([np.zeros(len(c), int), c])
    x = scn.SparseTensor(c, np.ones((len(c), 1)), (2**15,) * 4)
    with pytest.raises(ValueError, match=r"give up to \d+ \(input, output\) pairs; at most"):
        x.geometry.conv(64, 1, "MaxPooling")


@pytest.mark.parametrize("s", [0, -1])
def test_stride_and_size_must_be_positive(s):
    x = _one_site((4, 4))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        x.geometry.conv(2, s, "MaxPooling")
    with pytest.raises(ValueError, match="pool_size must be >= 1"):
        x.geometry.conv(s, 2, "MaxPooling")


# -- scratch memory: grows with the work, not with the address space -----------------------
PEAK = """
import json, resource, sys, time
import numpy as np
import sparsecnn as scn

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

def vmsize():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

{setup}
# a budget on the address space too: an old-style scratch of gigabytes fails fast instead of
# filling the machine
resource.setrlimit(resource.RLIMIT_AS, (vmsize() + {as_limit}, resource.RLIM_INFINITY))
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")      # reset the peak RSS to the current RSS
base = hwm()
{run}
print(json.dumps({{"peak": hwm() - base}}))
"""

GLOBAL = """
rng = np.random.default_rng(0)
idx = rng.choice(10**6, 1000, replace=False)
c1 = np.column_stack([np.zeros(1000, int), idx // 1000, idx % 1000])
f1 = rng.standard_normal((1000, 3))
B = {B}
c = np.concatenate([c1 + [[b, 0, 0]] for b in range(B)])
f = np.concatenate([f1 * (b + 1) for b in range(B)])
x = scn.SparseTensor(c, f, (1000, 1000), requires_grad=True)
"""


def _peak(setup, run, as_limit=2**30):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure peak RSS")
    out = _subprocess(PEAK.format(setup=setup, run=run, as_limit=as_limit))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


MB = 2**20


@pytest.mark.parametrize("layer", ["MaxPooling", "AveragePooling"])
def test_far_batch_index_costs_no_scratch(layer):
    """One site at batch index 10**7: scratch by the samples present (was ~1 GB)."""
    setup = ("x = scn.SparseTensor(np.array([[10**7, 3, 3]]), np.array([[2.0, -3.0]]), "
             "(8, 8), batch_size=10**7 + 1, requires_grad=True)")
    run = f"""
y = scn.{layer}(2)(x)
assert y.coords.tolist() == [[10**7, 1, 1]], y.coords
want = [2.0, 0.0] if "{layer}" == "MaxPooling" else [0.5, -0.75]
assert np.allclose(y.features, [want]), y.features
y.features.sum()
"""
    assert _peak(setup, run) < 50 * MB


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("layer", ["MaxPooling", "AveragePooling"])
def test_global_pooling_of_a_large_grid(layer, B):
    """MaxPooling(1000) on 1000 x 1000 with 1000 sites per sample: K = 10**6 window
    positions; the rulebook scratch was n * K (8 GB). Forward and backward, checked
    against the direct computation. B = 2: the window table (2 x 10**6) is not built."""
    run = f"""
y = scn.{layer}(1000)(x)
mx = "{layer}" == "MaxPooling"
want = np.stack([np.maximum(f1 * (b + 1), 0).max(0) if mx else (f1 * (b + 1)).sum(0) / 10**6
                 for b in range(B)])
assert np.allclose(y.features, want, rtol=1e-12, atol=1e-15), (y.features, want)
gy = np.random.default_rng(1).standard_normal(y.features.shape)
y.backward((gy, np.zeros(3)))
g = x.grad
if mx:
    arg = [np.argmax(f1 * (b + 1), axis=0) for b in range(B)]
    gw = np.zeros_like(f)
    for b in range(B):
        for ch in range(3):
            if (f1[:, ch] * (b + 1)).max() > 0:
                gw[b * 1000 + arg[b][ch], ch] = gy[b, ch]
else:
    gw = np.concatenate([np.repeat(gy[b][None] / 10**6, 1000, 0) for b in range(B)])
assert np.allclose(g, gw, rtol=1e-12, atol=1e-15)
"""
    assert _peak(GLOBAL.format(B=B), run) < 100 * MB


def test_convolution_with_a_big_filter():
    """Convolution(2, 2, 999) on 1000 x 1000 with 1000 sites: K ~ 10**6 offsets, 4 outputs;
    forward and backward against the direct sum (the window table, 4 x 10**6, is not built:
    the kernels go by offset over the pairs)."""
    setup = GLOBAL.format(B=1) + """
w = np.random.default_rng(2).standard_normal((999**2, 3, 2))
weight = scn.Parameter(w.copy())
"""
    run = """
from sparsecnn import functional as F
y = F.convolution(x, weight, None, 999, 1)
got = dict(zip(map(tuple, y.coords.tolist()), y.features))
for oy in (0, 1):
    for ox in (0, 1):
        acc = np.zeros(2)
        for (b, py, px), v in zip(c.tolist(), f):
            if oy <= py < oy + 999 and ox <= px < ox + 999:
                acc += v @ w[(py - oy) * 999 + (px - ox)]
        key = (0, oy, ox)
        if key in got:
            assert np.allclose(got[key], acc), (got[key], acc)
        else:
            assert not acc.any()
y.backward((np.ones(y.features.shape), np.zeros(2)))
gx = x.grad
want = np.zeros_like(f)
for i, (b, py, px) in enumerate(c.tolist()):
    for oy, ox in map(tuple, y.coords[:, 1:].tolist()):
        if oy <= py < oy + 999 and ox <= px < ox + 999:
            want[i] += w[(py - oy) * 999 + (px - ox)].sum(1)
assert np.allclose(gx, want)
"""
    # the weight and its gradient are 2 x 48 MB; the rulebook's scratch must stay small
    assert _peak(setup, run) < 200 * MB


# -- the pair-list paths give the window paths' results --------------------------------------
def _random_rulebook(rng, d=2, f=3, s=2, n=400, B=2):
    """Sites at ~90% density (some windows full, some with gaps) and its rulebook."""
    N = 9 if (9 - f) % s == 0 else 8
    c = np.unique(np.column_stack([rng.integers(0, B, n)]
                                  + [rng.integers(0, N, n) for _ in range(d)]), axis=0)
    x = scn.SparseTensor(c, rng.standard_normal((len(c), 5)), (N,) * d)
    rb, _ = x.geometry.conv(f, s, "MaxPooling")
    return x, rb


@pytest.mark.parametrize("slope", [None, 0.1])
@pytest.mark.parametrize("fs", [(3, 2), (2, 2), (3, 1)])
def test_maxpool_from_pairs_equals_from_window(fs, slope, rng):
    x, rb = _random_rulebook(rng, f=fs[0], s=fs[1])
    assert (np.bincount(rb.out_idx) == fs[0] ** 2).any()     # some windows have no gap
    assert (np.bincount(rb.out_idx) < fs[0] ** 2).any()
    g = rng.standard_normal(5) + 3      # the ground wins where it is a candidate
    a = _pool.maxpool_forward(x.features, g, rb.in_idx, rb.out_idx, rb.offsets, rb.n_out,
                             window=_cpu.window_of(rb), negative_slope=slope)
    b = _pool.maxpool_forward(x.features, g, rb.in_idx, rb.out_idx, rb.offsets, rb.n_out,
                             negative_slope=slope)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("cin", [1, 2, 5])
def test_conv_forward_from_pairs_equals_from_window(cin, rng):
    x, rb = _random_rulebook(rng)
    feats = rng.standard_normal((x.n_active, cin))
    w = rng.standard_normal((9, cin, 3))
    bias, g = rng.standard_normal(3), rng.standard_normal(cin)
    a = _conv.conv_forward(feats, w, bias, g, rb.in_idx, rb.out_idx, rb.offsets, rb.n_out,
                          window=_cpu.window_of(rb))
    b = _conv.conv_forward(feats, w, bias, g, rb.in_idx, rb.out_idx, rb.offsets, rb.n_out)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grouped", [True, False])
def test_rulebook_layouts_agree(grouped, rng):
    """by_offset=False (pairs sorted by offset, for large windows) builds the same rulebook
    as the grouped layout, samples in order or not, d = 1..4."""
    for d in (1, 2, 3, 4):
        for f, s in [(2, 2), (3, 2), (3, 1), (1, 1), (4, 4)]:
            N = 9 if (9 - f) % s == 0 else 8
            if (N - f) % s:
                continue
            c = np.unique(np.column_stack([rng.integers(0, 3, 30)]
                                          + [rng.integers(0, N, 30) for _ in range(d)]),
                          axis=0).astype(np.int32)
            if not grouped:
                c = np.ascontiguousarray(c[rng.permutation(len(c))])
            sh = np.full(d, N, np.int64)
            a = _rulebook.build_conv_rulebook(c, sh, f, s, window=True, by_offset=True)
            b = _rulebook.build_conv_rulebook(c, sh, f, s, window=True, by_offset=False)
            for u, v in zip(a, b):
                np.testing.assert_array_equal(u, v)
            if f % 2:
                keys, vals, _, _ = _cpu.build_hash(c, sh)
                a = _rulebook.build_submanifold_rulebook(c, sh, keys, vals, f, by_offset=True)
                b = _rulebook.build_submanifold_rulebook(c, sh, keys, vals, f, by_offset=False)
                for u, v in zip(a, b):
                    np.testing.assert_array_equal(u, v)


def test_fused_conv_pool_falls_back_when_the_windows_are_too_large(rng):
    """Convolution + MaxPooling in a Sequential fuse only with both window tables; a pooling
    window far larger than its pairs runs the unfused pair: the same values."""
    c = np.unique(rng.integers(0, 1025, (200, 2)), axis=0)
    c = np.column_stack([rng.integers(0, 2, len(c)), c])
    c = np.unique(c, axis=0)
    x = scn.SparseTensor(c, rng.standard_normal((len(c), 2)), (1025, 1025))
    conv = scn.Convolution(2, 3, 1, 1, dtype=np.float64, seed=0)
    pool = scn.MaxPooling(1025)
    net = scn.Sequential(conv, pool)
    y = net(x)
    rb, mid = x.geometry.conv(1, 1, "Convolution")
    prb, _ = mid.conv(1025, 1025, "MaxPooling")
    assert _cpu.window_of(prb) is None          # 2 x 1025**2 entries for ~200 pairs: not built
    ref = pool(conv(x))
    np.testing.assert_array_equal(y.features, ref.features)
    np.testing.assert_array_equal(y.coords, ref.coords)


# -- every scratch allocation is checked ----------------------------------------------------
def _kernel_calls(rng):
    """(module, call) for every kernel path that allocates scratch with malloc."""
    x, rb = _random_rulebook(rng, f=3, s=2)
    x22, rb22 = _random_rulebook(rng, f=2, s=2)
    n_in, n_out = x.n_active, rb.n_out
    f5 = x.features
    f2 = np.ascontiguousarray(f5[:, :2])
    g5, g2 = np.zeros(5), np.zeros(2)
    w5, w2 = rng.standard_normal((9, 5, 3)), rng.standard_normal((9, 2, 3))
    b3 = np.zeros(3)
    gy = rng.standard_normal((n_out, 3))
    gp = rng.standard_normal((n_out, 5))
    out, arg = _pool.maxpool_forward(f5, g5, rb.in_idx, rb.out_idx, rb.offsets, n_out)
    iw = _cpu.build_window(rb.out_idx, rb.in_idx, rb.offsets, n_in)
    o22, a22 = _pool.maxpool_forward(x22.features, g5, rb22.in_idx, rb22.out_idx,
                                    rb22.offsets, rb22.n_out)
    sh = np.asarray(x.spatial_shape, np.int64)
    crd = x.coords
    shuffled = np.ascontiguousarray(crd[::-1])
    rb1, mid = x.geometry.conv(1, 1, "Convolution")
    pw = _cpu.window_of(mid.conv(3, 3, "MaxPooling")[0])    # 9 x 9 grid: 3 x 3 windows
    keys, vals = x.geometry.table
    return [
        (_rulebook, lambda: _rulebook.build_conv_rulebook(crd, sh, 3, 2, window=True)),
        (_rulebook, lambda: _rulebook.build_conv_rulebook(shuffled, sh, 3, 2, by_offset=False)),
        (_pool, lambda: _pool.maxpool_backward(gp, arg, rb.in_idx, rb.out_idx, rb.offsets,
                                              n_in)),
        (_pool, lambda: _pool.maxpool_backward(
            rng.standard_normal(o22.shape), a22, rb22.in_idx, rb22.out_idx, rb22.offsets,
            x22.n_active, window=_cpu.window_of(rb22), negative_slope=0.1, output=o22)),
        (_conv, lambda: _conv.conv_forward(f2, w2, b3, g2, rb.in_idx, rb.out_idx,
                                           rb.offsets, n_out, window=_cpu.window_of(rb))),
        (_conv, lambda: _conv.conv_forward(f5, w5, b3, g5, rb.in_idx, rb.out_idx,
                                           rb.offsets, n_out, window=_cpu.window_of(rb))),
        (_conv, lambda: _conv.conv_forward(f5, w5, b3, g5, rb.in_idx, rb.out_idx,
                                           rb.offsets, n_out)),
        (_conv, lambda: _conv.conv_backward(f2, w2, g2, gy, rb.in_idx, rb.out_idx,
                                            rb.offsets, grad_input=False,
                                            window=_cpu.window_of(rb))),
        (_conv, lambda: _conv.conv_backward(f5, w5, g5, gy, rb.in_idx, rb.out_idx,
                                            rb.offsets)),
        (_conv, lambda: _conv.conv_backward(f5, w5, g5, gy, rb.in_idx, rb.out_idx,
                                            rb.offsets, input_window=iw)),
        (_conv, lambda: _conv.conv_maxpool_forward(
            f2, rng.standard_normal((1, 2, 3)), b3, g2, _cpu.window_of(rb1), pw, np.zeros(3))),
        (_conv, lambda: _conv.conv_maxpool_forward(
            f5, rng.standard_normal((1, 5, 3)), b3, g5, _cpu.window_of(rb1), pw, np.zeros(3))),
        (_rulebook, lambda: _rulebook.build_submanifold_rulebook(crd, sh, keys, vals, 3)),
    ]


def test_every_allocation_failure_raises_memory_error(rng):
    """The n-th scratch allocation of a kernel fails (test hook), for every n until the call
    needs no more: each time MemoryError, never a crash or a silent result."""
    failures = 0
    for mod, call in _kernel_calls(rng):
        call()                                  # works without the hook
        for nth in range(1, 200):
            mod._fail_alloc(nth)
            try:
                call()
            except MemoryError:
                # the hooked allocation failed (two threads may both have counted it down)
                assert mod._fail_alloc(0) <= 0
                failures += 1
                continue
            assert mod._fail_alloc(0) > 0, f"allocation {nth} failed silently in {call}"
            break
    assert failures >= 20
