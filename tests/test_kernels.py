"""Each kernel of ``sparsecnn._cpu`` called directly, against a plain NumPy loop over the
rulebook's offsets: random rulebooks (from the rulebook kernels or built by hand), float32 and
float64, few (< 4, the direct path) and many (>= 4, the BLAS path) input channels, more than
256 pairs per offset (forward chunks) and more than 8192 (backward chunks), empty rulebooks,
zero outputs, ties and the ground candidate in max pooling."""
import numpy as np
import pytest

from sparsecnn import _cpu
from sparsecnn._cpu import _conv, _pool, _rulebook

# --------------------------------------------------------------------------------------------
# NumPy references (float64, one offset at a time)


def _pairs(offsets):
    for k in range(len(offsets) - 1):
        yield k, slice(int(offsets[k]), int(offsets[k + 1]))


def ref_conv_forward(features, weight, bias, ground, in_idx, out_idx, offsets, n_out):
    x = features.astype(np.float64) - ground.astype(np.float64)
    out = np.tile(bias.astype(np.float64), (n_out, 1))
    for k, sl in _pairs(offsets):
        np.add.at(out, out_idx[sl], x[in_idx[sl]] @ weight[k].astype(np.float64))
    return out


def ref_conv_backward(features, weight, ground, grad_out, in_idx, out_idx, offsets):
    x = features.astype(np.float64) - ground.astype(np.float64)
    gy = grad_out.astype(np.float64)
    gx = np.zeros(features.shape)
    gw = np.zeros(weight.shape)
    for k, sl in _pairs(offsets):
        np.add.at(gx, in_idx[sl], gy[out_idx[sl]] @ weight[k].astype(np.float64).T)
        gw[k] = x[in_idx[sl]].T @ gy[out_idx[sl]]
    return gx, gw


def ref_maxpool_forward(features, ground, in_idx, out_idx, offsets, n_out):
    """Candidates in order: the ground (if the window is not full), then offsets 0..K-1;
    a later candidate wins only if strictly greater."""
    K = len(offsets) - 1
    C = features.shape[1]
    count = np.bincount(out_idx, minlength=n_out)
    full = count == K
    out = np.where(full[:, None], -np.inf, ground[None, :]).astype(np.float64)
    arg = np.full((n_out, C), -1, np.int64)
    for _k, sl in _pairs(offsets):
        o, i = out_idx[sl], in_idx[sl]
        assert len(np.unique(o)) == len(o)
        v = features[i].astype(np.float64)
        better = v > out[o]
        out[o] = np.where(better, v, out[o])
        arg[o] = np.where(better, i[:, None], arg[o])
    return out, arg


def ref_maxpool_backward(grad_out, argmax, n_in):
    gx = np.zeros((n_in, grad_out.shape[1]))
    gg = np.zeros(grad_out.shape[1])
    for o in range(grad_out.shape[0]):
        for c in range(grad_out.shape[1]):
            if argmax[o, c] == -1:
                gg[c] += grad_out[o, c]
            else:
                gx[argmax[o, c], c] += grad_out[o, c]
    return gx, gg


def ref_avgpool_forward(features, ground, in_idx, out_idx, offsets, n_out):
    K = len(offsets) - 1
    g = ground.astype(np.float64)
    out = np.tile(g, (n_out, 1))
    for _, sl in _pairs(offsets):
        np.add.at(out, out_idx[sl], (features[in_idx[sl]].astype(np.float64) - g) / K)
    return out


def ref_avgpool_backward(grad_out, in_idx, out_idx, offsets, n_in):
    K = len(offsets) - 1
    gy = grad_out.astype(np.float64)
    gx = np.zeros((n_in, grad_out.shape[1]))
    for _, sl in _pairs(offsets):
        np.add.at(gx, in_idx[sl], gy[out_idx[sl]] / K)
    missing = K - np.bincount(out_idx, minlength=grad_out.shape[0])
    return gx, missing @ gy / K


# --------------------------------------------------------------------------------------------
# rulebooks


def hand_rulebook(rng, K, n_in, n_out, per_offset):
    """Random valid rulebook: in offset k, per_offset[k] distinct outputs, each paired with a
    distinct input row; like a real window, an (input, output) pair occurs in one offset only
    (input = perm[(output + shift_k) % n_in] with distinct shifts)."""
    assert n_out <= n_in
    perm = rng.permutation(n_in)
    shifts = rng.choice(n_in, K, replace=False)
    ins, outs, offsets = [], [], [0]
    for k in range(K):
        o = rng.choice(n_out, per_offset[k], replace=False)
        outs.append(o)
        ins.append(perm[(o + shifts[k]) % n_in])
        offsets.append(offsets[-1] + per_offset[k])
    return (np.concatenate(ins).astype(np.int32), np.concatenate(outs).astype(np.int32),
            np.asarray(offsets, np.int64))


def sites(rng, batch, spatial, density):
    total = batch * int(np.prod(spatial))
    flat = rng.choice(total, max(1, int(density * total)), replace=False)
    return np.stack(np.unravel_index(flat, (batch, *spatial)), 1).astype(np.int32)


def geometry_rulebook(rng, kind, d, f, s, N, batch, density):
    """(in_idx, out_idx, offsets, n_in, n_out) from the rulebook kernels."""
    coords = sites(rng, batch, (N,) * d, density)
    shape = np.full(d, N, np.int64)
    if kind == "sub":
        keys, vals, _, _ = _cpu.build_hash(coords, shape)
        i, o, off = _rulebook.build_submanifold_rulebook(coords, shape, keys, vals, f)
        return i, o, off, len(coords), len(coords)
    oc, i, o, off = _rulebook.build_conv_rulebook(coords, shape, f, s)[:4]
    return i, o, off, len(coords), len(oc)


RULEBOOKS = {
    # name: builder(rng) -> (in_idx, out_idx, offsets, n_in, n_out)
    "conv2d-f3s2": lambda r: geometry_rulebook(r, "conv", 2, 3, 2, 21, 2, 0.3),
    "conv3d-f2s1": lambda r: geometry_rulebook(r, "conv", 3, 2, 1, 7, 2, 0.2),
    "conv1d-f2s3": lambda r: geometry_rulebook(r, "conv", 1, 2, 3, 29, 3, 0.6),
    "sub2d-f3-dense": lambda r: geometry_rulebook(r, "sub", 2, 3, 1, 30, 1, 0.9),
    "conv2d-f2s2-big": lambda r: geometry_rulebook(r, "conv", 2, 2, 2, 60, 1, 0.7),
    "hand-300-per-offset": lambda r: (*hand_rulebook(r, 3, 700, 600, [300, 257, 513]),
                                      700, 600),
    "hand-9000-per-offset": lambda r: (*hand_rulebook(r, 2, 12000, 10000, [9000, 8193]),
                                       12000, 10000),
    "hand-uneven": lambda r: (*hand_rulebook(r, 4, 50, 40, [0, 40, 1, 0]), 50, 40),
}

TOL = {np.float32: dict(rtol=3e-5, atol=3e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}
DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]


def _check_index_arrays(rb):
    in_idx, out_idx, offsets, n_in, n_out = rb
    assert in_idx.dtype == out_idx.dtype == np.int32 and offsets.dtype == np.int64
    assert offsets[-1] == len(in_idx)


# --------------------------------------------------------------------------------------------
# convolution


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cin,cout", [(1, 1), (2, 4), (3, 5), (4, 2), (9, 6)],
                         ids=["cin1", "cin2-direct", "cin3-direct", "cin4-blas", "cin9-blas"])
@pytest.mark.parametrize("rb_name", list(RULEBOOKS))
def test_conv_forward_backward(rb_name, cin, cout, dtype, rng):
    rb = RULEBOOKS[rb_name](rng)
    _check_index_arrays(rb)
    in_idx, out_idx, offsets, n_in, n_out = rb
    K = len(offsets) - 1
    x = rng.standard_normal((n_in, cin)).astype(dtype)
    w = rng.standard_normal((K, cin, cout)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    g = rng.standard_normal(cin).astype(dtype)
    y = _conv.conv_forward(x, w, b, g, in_idx, out_idx, offsets, n_out)
    assert y.dtype == dtype and y.shape == (n_out, cout)
    np.testing.assert_allclose(y, ref_conv_forward(x, w, b, g, in_idx, out_idx, offsets,
                                                   n_out), **TOL[dtype])
    gy = rng.standard_normal((n_out, cout)).astype(dtype)
    gx, gw = _conv.conv_backward(x, w, g, gy, in_idx, out_idx, offsets)
    assert gx.dtype == gw.dtype == dtype
    assert gx.shape == (n_in, cin) and gw.shape == (K, cin, cout)
    rgx, rgw = ref_conv_backward(x, w, g, gy, in_idx, out_idx, offsets)
    np.testing.assert_allclose(gx, rgx, **TOL[dtype])
    # the weight gradient sums up to 9000 products: scale the tolerance with the sum
    scale = np.sqrt(max(np.diff(offsets).max(), 1)) if dtype == np.float32 else 1.0
    np.testing.assert_allclose(gw, rgw, rtol=TOL[dtype]["rtol"] * scale,
                               atol=TOL[dtype]["atol"] * scale)
    # without the input gradient: no grad_features, the same weight gradient bit for bit
    none, gw2 = _conv.conv_backward(x, w, g, gy, in_idx, out_idx, offsets, grad_input=False)
    assert none is None
    np.testing.assert_array_equal(gw2, gw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cin,cout", [(4, 3), (9, 6), (33, 17)])
@pytest.mark.parametrize("rb_name", list(RULEBOOKS))
def test_conv_forward_window_path(rb_name, cin, cout, dtype, rng):
    """With the window the forward goes by chunks of outputs (each row accumulated once):
    the per-offset result up to rounding (BLAS may round a row differently by its place in
    a block), and deterministic."""
    in_idx, out_idx, offsets, n_in, n_out = RULEBOOKS[rb_name](rng)
    K = len(offsets) - 1
    x = rng.standard_normal((n_in, cin)).astype(dtype)
    w = rng.standard_normal((K, cin, cout)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    g = rng.standard_normal(cin).astype(dtype)
    win = _cpu.build_window(in_idx, out_idx, offsets, n_out)
    y = _conv.conv_forward(x, w, b, g, in_idx, out_idx, offsets, n_out, window=win)
    assert y.dtype == dtype and y.shape == (n_out, cout)
    np.testing.assert_allclose(y, ref_conv_forward(x, w, b, g, in_idx, out_idx, offsets,
                                                   n_out), **TOL[dtype])
    np.testing.assert_allclose(
        y, _conv.conv_forward(x, w, b, g, in_idx, out_idx, offsets, n_out), **TOL[dtype])
    np.testing.assert_array_equal(
        y, _conv.conv_forward(x, w, b, g, in_idx, out_idx, offsets, n_out, window=win))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cin,cout", [(4, 3), (9, 6), (33, 17)])
@pytest.mark.parametrize("rb_name", list(RULEBOOKS))
def test_conv_backward_input_window_path(rb_name, cin, cout, dtype, rng):
    _check_input_window_backward(RULEBOOKS[rb_name](rng), cin, cout, dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_backward_input_window_grouped_partials(dtype, rng):
    """More than 64 chunks of inputs (here 79): chunks are grouped, each group accumulating
    its weight gradients in order (beta = 1); still the reference's gradients."""
    rb = (*hand_rulebook(rng, 2, 20000, 18000, [15000, 16000]), 20000, 18000)
    _check_input_window_backward(rb, 4, 3, dtype, rng)


def _check_input_window_backward(rb, cin, cout, dtype, rng):
    """With the input window both gradients go by chunks of inputs, all offsets side by side
    (empty slots as zeros): the reference's gradients, with or without the input gradient,
    and deterministic."""
    in_idx, out_idx, offsets, n_in, n_out = rb
    K = len(offsets) - 1
    x = rng.standard_normal((n_in, cin)).astype(dtype)
    w = rng.standard_normal((K, cin, cout)).astype(dtype)
    g = rng.standard_normal(cin).astype(dtype)
    gy = rng.standard_normal((n_out, cout)).astype(dtype)
    iwin = _cpu.build_window(out_idx, in_idx, offsets, n_in)
    gx, gw = _conv.conv_backward(x, w, g, gy, in_idx, out_idx, offsets, input_window=iwin)
    assert gx.dtype == gw.dtype == dtype
    assert gx.shape == (n_in, cin) and gw.shape == (K, cin, cout)
    rgx, rgw = ref_conv_backward(x, w, g, gy, in_idx, out_idx, offsets)
    scale = np.sqrt(max(np.diff(offsets).max(), 1)) if dtype == np.float32 else 1.0
    np.testing.assert_allclose(gx, rgx, **TOL[dtype])
    np.testing.assert_allclose(gw, rgw, rtol=TOL[dtype]["rtol"] * scale,
                               atol=TOL[dtype]["atol"] * scale)
    none, gw2 = _conv.conv_backward(x, w, g, gy, in_idx, out_idx, offsets, grad_input=False,
                                   input_window=iwin)
    assert none is None
    np.testing.assert_array_equal(gw2, gw)
    again = _conv.conv_backward(x, w, g, gy, in_idx, out_idx, offsets, input_window=iwin)
    np.testing.assert_array_equal(again[0], gx)
    np.testing.assert_array_equal(again[1], gw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cin", [1, 2, 3])
@pytest.mark.parametrize("rb_name", list(RULEBOOKS))
def test_conv_backward_window_path(rb_name, cin, dtype, rng):
    """Few input channels, no input gradient: with the window the weight gradient goes
    output by output; it equals the per-offset path and the reference."""
    in_idx, out_idx, offsets, n_in, n_out = RULEBOOKS[rb_name](rng)
    K = len(offsets) - 1
    x = rng.standard_normal((n_in, cin)).astype(dtype)
    w = rng.standard_normal((K, cin, 5)).astype(dtype)
    g = rng.standard_normal(cin).astype(dtype)
    gy = rng.standard_normal((n_out, 5)).astype(dtype)
    win = _cpu.build_window(in_idx, out_idx, offsets, n_out)
    gx, gw = _conv.conv_backward(x, w, g, gy, in_idx, out_idx, offsets, grad_input=False,
                                window=win)
    assert gx is None and gw.shape == w.shape and gw.dtype == dtype
    _, gw_ref = ref_conv_backward(x, w, g, gy, in_idx, out_idx, offsets)
    np.testing.assert_allclose(gw, gw_ref, **TOL[dtype])
    _, gw_plain = _conv.conv_backward(x, w, g, gy, in_idx, out_idx, offsets, grad_input=False)
    np.testing.assert_allclose(gw, gw_plain, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cin", [2, 6])
def test_conv_empty_rulebook(cin, dtype, rng):
    K, cout, n_in, n_out = 4, 3, 5, 7
    in_idx = out_idx = np.zeros(0, np.int32)
    offsets = np.zeros(K + 1, np.int64)
    x = rng.standard_normal((n_in, cin)).astype(dtype)
    w = rng.standard_normal((K, cin, cout)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    g = rng.standard_normal(cin).astype(dtype)
    y = _conv.conv_forward(x, w, b, g, in_idx, out_idx, offsets, n_out)
    np.testing.assert_array_equal(y, np.tile(b, (n_out, 1)))
    gx, gw = _conv.conv_backward(x, w, g, rng.standard_normal((n_out, cout)).astype(dtype),
                                in_idx, out_idx, offsets)
    np.testing.assert_array_equal(gx, np.zeros((n_in, cin), dtype))
    np.testing.assert_array_equal(gw, np.zeros((K, cin, cout), dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_in", [0, 4])
def test_conv_zero_outputs(n_in, dtype, rng):
    K, cin, cout = 9, 5, 2
    empty = np.zeros(0, np.int32)
    offsets = np.zeros(K + 1, np.int64)
    x = rng.standard_normal((n_in, cin)).astype(dtype)
    w = rng.standard_normal((K, cin, cout)).astype(dtype)
    y = _conv.conv_forward(x, w, np.ones(cout, dtype), np.zeros(cin, dtype), empty, empty,
                          offsets, 0)
    assert y.shape == (0, cout) and y.dtype == dtype
    gx, gw = _conv.conv_backward(x, w, np.zeros(cin, dtype), np.zeros((0, cout), dtype), empty,
                                empty, offsets)
    assert gx.shape == (n_in, cin) and not gx.any()
    assert gw.shape == (K, cin, cout) and not gw.any()


def test_conv_by_hand():
    """Two inputs into one output through offsets 0 and 2 of K = 3."""
    x = np.array([[1.0, 2.0], [3.0, -1.0]])
    g = np.array([0.5, 0.0])
    w = np.arange(12, dtype=np.float64).reshape(3, 2, 2)
    b = np.array([10.0, 20.0])
    in_idx = np.array([0, 1], np.int32)
    out_idx = np.array([0, 0], np.int32)
    offsets = np.array([0, 1, 1, 2], np.int64)
    y = _conv.conv_forward(x, w, b, g, in_idx, out_idx, offsets, 2)
    # out0 = b + (x0 - g) @ w0 + (x1 - g) @ w2; out1 = b
    expected0 = b + np.array([0.5, 2.0]) @ w[0] + np.array([2.5, -1.0]) @ w[2]
    np.testing.assert_allclose(y, [expected0, b])
    gy = np.array([[1.0, -2.0], [5.0, 5.0]])
    gx, gw = _conv.conv_backward(x, w, g, gy, in_idx, out_idx, offsets)
    np.testing.assert_allclose(gx, [w[0] @ gy[0], w[2] @ gy[0]])
    np.testing.assert_allclose(gw[1], 0)
    np.testing.assert_allclose(gw[0], np.outer([0.5, 2.0], gy[0]))
    np.testing.assert_allclose(gw[2], np.outer([2.5, -1.0], gy[0]))


# --------------------------------------------------------------------------------------------
# pooling


POOL_RULEBOOKS = {
    "pool2d-f2s2": lambda r: geometry_rulebook(r, "conv", 2, 2, 2, 20, 2, 0.5),
    "pool2d-f3s2": lambda r: geometry_rulebook(r, "conv", 2, 3, 2, 21, 1, 0.3),
    "pool2d-f2s2-full": lambda r: geometry_rulebook(r, "conv", 2, 2, 2, 12, 1, 1.0),
    "pool3d-f2s2": lambda r: geometry_rulebook(r, "conv", 3, 2, 2, 8, 2, 0.4),
    "pool1d-f3s1": lambda r: geometry_rulebook(r, "conv", 1, 3, 1, 40, 2, 0.5),
    "hand-300-per-offset": lambda r: (*hand_rulebook(r, 2, 800, 600, [600, 300]), 800, 600),
    "hand-9000-per-offset": lambda r: (*hand_rulebook(r, 2, 12000, 9500, [9000, 9500]),
                                       12000, 9500),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("values", ["normal", "ties"])
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("rb_name", list(POOL_RULEBOOKS))
def test_maxpool(rb_name, C, values, dtype, rng):
    in_idx, out_idx, offsets, n_in, n_out = POOL_RULEBOOKS[rb_name](rng)
    if values == "ties":     # few distinct values: ties everywhere, the ground among them
        x = rng.integers(-1, 2, (n_in, C)).astype(dtype)
        g = np.zeros(C, dtype)
    else:
        x = rng.standard_normal((n_in, C)).astype(dtype)
        g = rng.standard_normal(C).astype(dtype) * 0.5
    y, arg = _pool.maxpool_forward(x, g, in_idx, out_idx, offsets, n_out)
    # a window passed in (as the layers pass their rulebook's cached one) changes nothing
    y2, arg2 = _pool.maxpool_forward(x, g, in_idx, out_idx, offsets, n_out,
                                    window=_cpu.build_window(in_idx, out_idx, offsets, n_out))
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(arg2, arg)
    assert y.dtype == dtype and y.shape == (n_out, C)
    assert arg.dtype == np.int32 and arg.shape == (n_out, C)
    ry, rarg = ref_maxpool_forward(x, g, in_idx, out_idx, offsets, n_out)
    np.testing.assert_array_equal(y, ry.astype(dtype))
    np.testing.assert_array_equal(arg, rarg)
    K = len(offsets) - 1
    full = np.bincount(out_idx, minlength=n_out) == K
    if rb_name != "pool2d-f2s2-full" and rb_name != "hand-300-per-offset":
        assert (arg == -1).any(), "the ground should win somewhere"
    assert not (arg[full] == -1).any(), "a full window has no ground candidate"
    gy = rng.standard_normal((n_out, C)).astype(dtype)
    gx, gg = _pool.maxpool_backward(gy, arg, in_idx, out_idx, offsets, n_in)
    assert gx.shape == (n_in, C) and gg.shape == (C,)
    assert gx.dtype == gg.dtype == dtype
    rgx, rgg = ref_maxpool_backward(gy, arg, n_in)
    np.testing.assert_allclose(gx, rgx, **TOL[dtype])
    np.testing.assert_allclose(gg, rgg, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"]
                               * np.sqrt(n_out))
    # gradient conservation: everything that came in went somewhere
    np.testing.assert_allclose(gx.sum(0) + gg, gy.astype(np.float64).sum(0),
                               rtol=1e-4 if dtype == np.float32 else 1e-10,
                               atol=1e-3 if dtype == np.float32 else 1e-9)


@pytest.mark.parametrize("rb_name", list(RULEBOOKS))
def test_build_window(rb_name, rng):
    """window[o, k] is the input paired with o at offset k, -1 where there is none."""
    in_idx, out_idx, offsets, n_in, n_out = RULEBOOKS[rb_name](rng)
    K = len(offsets) - 1
    win = _cpu.build_window(in_idx, out_idx, offsets, n_out)
    assert win.dtype == np.int32 and win.shape == (n_out, K)
    expected = np.full((n_out, K), -1, np.int32)
    for k in range(K):
        q = slice(offsets[k], offsets[k + 1])
        expected[out_idx[q], k] = in_idx[q]
    np.testing.assert_array_equal(win, expected)


def test_build_window_empty():
    assert _cpu.build_window(np.zeros(0, np.int32), np.zeros(0, np.int32),
                             np.zeros(5, np.int64), 0).shape == (0, 4)
    np.testing.assert_array_equal(
        _cpu.build_window(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(3, np.int64),
                          2), np.full((2, 2), -1, np.int32))


def test_maxpool_tie_rules_by_hand():
    """K = 3. Output 0: window full, inputs 0, 1, 2 tie -> earliest offset (input 0).
    Output 1: one active input equal to the ground -> the ground (-1) wins the tie.
    Output 2: an active input above the ground wins; output 3 has no pairs -> ground."""
    x = np.array([[2.0], [2.0], [2.0], [0.5], [0.7]])
    g = np.array([0.5])
    in_idx = np.array([0, 3, 1, 4, 2], np.int32)
    out_idx = np.array([0, 1, 0, 2, 0], np.int32)
    offsets = np.array([0, 2, 4, 5], np.int64)
    y, arg = _pool.maxpool_forward(x, g, in_idx, out_idx, offsets, 4)
    np.testing.assert_array_equal(y[:, 0], [2.0, 0.5, 0.7, 0.5])
    np.testing.assert_array_equal(arg[:, 0], [0, -1, 4, -1])
    gx, gg = _pool.maxpool_backward(np.array([[1.0], [2.0], [4.0], [8.0]]), arg, in_idx,
                                   out_idx, offsets, 5)
    np.testing.assert_array_equal(gx[:, 0], [1.0, 0, 0, 0, 4.0])
    np.testing.assert_array_equal(gg, [10.0])


def test_maxpool_full_window_of_negatives_ignores_ground():
    """All K window sites active: the ground (here larger) is not a candidate."""
    x = np.array([[-3.0, -1.0], [-2.0, -5.0]])
    in_idx = np.array([0, 1], np.int32)
    out_idx = np.array([0, 0], np.int32)
    offsets = np.array([0, 1, 2], np.int64)
    y, arg = _pool.maxpool_forward(x, np.zeros(2), in_idx, out_idx, offsets, 1)
    np.testing.assert_array_equal(y, [[-2.0, -1.0]])
    np.testing.assert_array_equal(arg, [[1, 0]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 4])
@pytest.mark.parametrize("rb_name", list(POOL_RULEBOOKS))
def test_avgpool(rb_name, C, dtype, rng):
    in_idx, out_idx, offsets, n_in, n_out = POOL_RULEBOOKS[rb_name](rng)
    x = rng.standard_normal((n_in, C)).astype(dtype)
    g = rng.standard_normal(C).astype(dtype)
    y = _pool.avgpool_forward(x, g, in_idx, out_idx, offsets, n_out)
    assert y.dtype == dtype and y.shape == (n_out, C)
    np.testing.assert_allclose(y, ref_avgpool_forward(x, g, in_idx, out_idx, offsets, n_out),
                               **TOL[dtype])
    gy = rng.standard_normal((n_out, C)).astype(dtype)
    gx, gg = _pool.avgpool_backward(gy, in_idx, out_idx, offsets, n_in)
    assert gx.dtype == gg.dtype == dtype and gx.shape == (n_in, C) and gg.shape == (C,)
    rgx, rgg = ref_avgpool_backward(gy, in_idx, out_idx, offsets, n_in)
    np.testing.assert_allclose(gx, rgx, **TOL[dtype])
    np.testing.assert_allclose(gg, rgg, rtol=TOL[dtype]["rtol"] * 10,
                               atol=TOL[dtype]["atol"] * np.sqrt(n_out))
    # conservation: each output's gradient is spread over its K window sites
    np.testing.assert_allclose(gx.sum(0) + gg, gy.astype(np.float64).sum(0),
                               rtol=1e-4 if dtype == np.float32 else 1e-10,
                               atol=1e-3 if dtype == np.float32 else 1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_empty_rulebook_gives_ground(dtype, rng):
    K, C, n_in, n_out = 4, 3, 6, 5
    empty = np.zeros(0, np.int32)
    offsets = np.zeros(K + 1, np.int64)
    x = rng.standard_normal((n_in, C)).astype(dtype)
    g = rng.standard_normal(C).astype(dtype)
    y, arg = _pool.maxpool_forward(x, g, empty, empty, offsets, n_out)
    np.testing.assert_array_equal(y, np.tile(g, (n_out, 1)))
    np.testing.assert_array_equal(arg, np.full((n_out, C), -1))
    gy = rng.standard_normal((n_out, C)).astype(dtype)
    gx, gg = _pool.maxpool_backward(gy, arg, empty, empty, offsets, n_in)
    assert not gx.any()
    np.testing.assert_allclose(gg, gy.sum(0), **TOL[dtype])
    ya = _pool.avgpool_forward(x, g, empty, empty, offsets, n_out)
    np.testing.assert_array_equal(ya, np.tile(g, (n_out, 1)))
    gx, gg = _pool.avgpool_backward(gy, empty, empty, offsets, n_in)
    assert not gx.any()
    np.testing.assert_allclose(gg, gy.sum(0), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_in", [0, 3])
def test_pool_zero_outputs(n_in, dtype, rng):
    K, C = 4, 2
    empty = np.zeros(0, np.int32)
    offsets = np.zeros(K + 1, np.int64)
    x = rng.standard_normal((n_in, C)).astype(dtype)
    g = np.zeros(C, dtype)
    y, arg = _pool.maxpool_forward(x, g, empty, empty, offsets, 0)
    assert y.shape == (0, C) and arg.shape == (0, C)
    gx, gg = _pool.maxpool_backward(np.zeros((0, C), dtype), arg, empty, empty, offsets, n_in)
    assert gx.shape == (n_in, C) and not gx.any() and gg.shape == (C,) and not gg.any()
    ya = _pool.avgpool_forward(x, g, empty, empty, offsets, 0)
    assert ya.shape == (0, C)
    gx, gg = _pool.avgpool_backward(np.zeros((0, C), dtype), empty, empty, offsets, n_in)
    assert gx.shape == (n_in, C) and not gx.any() and not gg.any()


def test_kernels_do_not_modify_inputs(rng):
    in_idx, out_idx, offsets, n_in, n_out = RULEBOOKS["conv2d-f3s2"](rng)
    x = rng.standard_normal((n_in, 5))
    w = rng.standard_normal((len(offsets) - 1, 5, 3))
    b, g = rng.standard_normal(3), rng.standard_normal(5)
    gy = rng.standard_normal((n_out, 3))
    arrays = [x, w, b, g, gy, in_idx, out_idx, offsets]
    copies = [a.copy() for a in arrays]
    _conv.conv_forward(x, w, b, g, in_idx, out_idx, offsets, n_out)
    _conv.conv_backward(x, w, g, gy, in_idx, out_idx, offsets)
    _, arg = _pool.maxpool_forward(x, g, in_idx, out_idx, offsets, n_out)
    _pool.maxpool_backward(gy[:, :1].copy(), arg[:, :1].copy(), in_idx, out_idx, offsets, n_in)
    _pool.avgpool_forward(x, g, in_idx, out_idx, offsets, n_out)
    _pool.avgpool_backward(gy, in_idx, out_idx, offsets, n_in)
    for a, c in zip(arrays, copies, strict=True):
        np.testing.assert_array_equal(a, c)


# --------------------------------------------------------------------------------------------
# column sums


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c", [(1, 1), (3, 2), (256, 5), (257, 32), (1000, 513),
                                 (44000, 32)])
def test_column_sums(n, c, dtype, rng):
    """Blocks of 256 rows, then the partials in block order: the exact sum within the
    rounding bound, and the hand-computable order for a tiny case."""
    a = rng.standard_normal((n, c)).astype(dtype)
    got = _cpu.column_sums(a)
    assert got.dtype == dtype and got.shape == (c,)
    exact = a.astype(np.float64).sum(axis=0)
    eps = np.finfo(dtype).eps
    bound = (256 + n // 256 + 1) * eps * np.abs(a).astype(np.float64).sum(axis=0)
    assert (np.abs(got - exact) <= bound + 1e-300).all()


def test_column_sums_order_by_hand():
    """float32: 2**24 + 1 + 1 is 2**24 row by row (each +1 is lost), while the second block
    (rows 256...) is summed on its own first: its 256 ones give 256, which survives."""
    a = np.zeros((512, 1), np.float32)
    a[0] = 2.0 ** 24
    a[1:256] = 1.0          # lost one at a time in block 0
    a[256:] = 1.0           # block 1: 256, exact
    assert _cpu.column_sums(a)[0] == np.float32(2.0 ** 24 + 256)


def test_column_sums_empty():
    assert _cpu.column_sums(np.zeros((0, 4), np.float32)).tolist() == [0, 0, 0, 0]
    assert _cpu.column_sums(np.zeros((3, 0))).shape == (0,)
