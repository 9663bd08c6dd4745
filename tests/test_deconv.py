"""Deconvolution (transposed convolution), InverseConvolution and UnPooling against the dense
oracle (tests/dense_reference.py), on both devices; the oracle itself by finite differences
and against torch's definition of ConvTranspose written with loops."""
import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import deconv as D
from sparsecnn.geometry import Geometry
from tests import dense_reference as ref
from tests.sparse_helpers import assert_close, dense_of, np_, random_sparse

# (d, spatial, f, s): overlapping (f > s), disjoint (f == s), gaps (f < s), stride 1
CASES = [
    (1, (5,), 3, 2), (1, (4,), 2, 2), (1, (3,), 2, 3), (2, (3, 4), 3, 2), (2, (3, 3), 2, 2),
    (2, (4, 3), 2, 1), (3, (2, 3, 2), 2, 2), (3, (2, 2, 3), 3, 2),
]
DENSITIES = [0, "one", 0.4, 1.0]


# -- the oracle ---------------------------------------------------------------------------------
def _fd_check(fn, args, i, grad_y, analytic, eps=1e-6):
    """Central differences of sum(fn(*args) * grad_y) in args[i] against ``analytic``."""
    a = np.array(args[i], dtype=np.float64)
    num = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        vals = []
        for sgn in (1, -1):
            b = a.copy()
            b[idx] += sgn * eps
            new = list(args)
            new[i] = b
            vals.append(np.sum(fn(*new) * grad_y))
        num[idx] = (vals[0] - vals[1]) / (2 * eps)
    np.testing.assert_allclose(analytic, num, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("d,spatial,f,s", [(1, (3,), 3, 2), (2, (2, 3), 2, 1), (2, (2, 2), 2, 3)])
def test_oracle_deconv_gradients(rng, d, spatial, f, s):
    x = rng.standard_normal((2, 2, *spatial))
    w = rng.standard_normal((f ** d, 2, 3))
    b = rng.standard_normal(3)
    G = rng.standard_normal((2, 3, *ref.deconv_shape(spatial, f, s)))
    grads = ref.deconv_backward(x, w, b, f, s, G)
    for i, g in enumerate(grads):
        _fd_check(lambda *a: ref.deconv_forward(*a, f, s), (x, w, b), i, G, g)
    mask = rng.random((2, *spatial)) < 0.5
    zgrads = ref.deconv_zero_backward(x, mask, w, b, f, s, G)
    for i, g in zip((0, 2, 3), zgrads, strict=True):
        _fd_check(lambda *a: ref.deconv_zero_forward(*a, f, s), (x, mask, w, b), i, G, g)
    gu = ref.unpool_backward(x, f, s, G[:, :2])
    _fd_check(lambda a: ref.unpool_forward(a, f, s), (x,), 0, G[:, :2], gu)


@pytest.mark.parametrize("d,f,s", [(1, 3, 2), (2, 2, 2), (2, 3, 1)])
def test_oracle_matches_torch_definition(rng, d, f, s):
    """weight[k, ci, co] == torch_weight[ci, co, i0, i1]: the oracle equals the loops written
    from torch's ConvTranspose definition on the converted weight."""
    x = rng.standard_normal((1, 2, *(3,) * d))
    w = rng.standard_normal((f ** d, 2, 3))
    b = rng.standard_normal(3)
    tw = ref.deconv_weight_to_torch_layout(w, f, d)
    np.testing.assert_allclose(ref.deconv_forward(x, w, b, f, s),
                               ref.deconv_torch_loops(x, tw, b, s), rtol=1e-12, atol=1e-12)
    if d == 2:
        assert tw[1, 2, 1, 0] == w[1 * f + 0, 1, 2]


def test_hand_example_1d():
    """x = [1, 2], f = 3, s = 2, one channel: y = [a, b, c + 2a, 2b, 2c] (+ bias)."""
    a, b_, c = 1.0, 10.0, 100.0
    y = ref.deconv_forward(np.array([[[1.0, 2.0]]]), np.array([[[a]], [[b_]], [[c]]]),
                           np.array([0.5]), 3, 2)
    np.testing.assert_allclose(y[0, 0], [1.5, 10.5, 102.5, 20.5, 200.5])


def test_hand_example_sparse(device):
    """The same on the sparse layer, site 0 only active: outputs 0, 1, 2 are active."""
    m = scn.Deconvolution(1, 1, 3, 2, dim=1, dtype=np.float64).to(device)
    m.weight.data = scn.backend.to_device(np.array([[[1.0]], [[10.0]], [[100.0]]]), device)
    m.bias.data = scn.backend.to_device(np.array([0.5]), device)
    x = scn.SparseTensor(np.array([[0, 1]], np.int32), np.array([[2.0]]), (2,))
    if device != "cpu":
        x = scn.SparseTensor(*(scn.backend.to_device(a, device) for a in (np_(x.coords),
                                                                           np_(x.features))),
                             (2,))
    y = m(x)
    assert y.spatial_shape == (5,)
    np.testing.assert_array_equal(np_(y.coords), [[0, 2], [0, 3], [0, 4]])
    np.testing.assert_allclose(np_(y.features)[:, 0], [2.5, 20.5, 200.5])
    np.testing.assert_allclose(np_(y.ground), [0.5])


# -- Deconvolution --------------------------------------------------------------------------------
def _layer(cls, cin, cout, f, s, d, dtype, device, ground_state, rng, bias=True):
    m = cls(cin, cout, f, s, dim=d, dtype=dtype, bias=bias, seed=int(rng.integers(1000)))
    if bias:
        m.bias.data = rng.standard_normal(cout).astype(dtype)
    m.set_ground_state(ground_state)
    return m.to(device)


@pytest.mark.parametrize("d,spatial,f,s", CASES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ground_state", [True, False])
def test_deconvolution_vs_dense(device, rng, d, spatial, f, s, density, dtype, ground_state):
    x = random_sparse(rng, 2, spatial, 2, density, dtype, ground=not ground_state,
                      device=device)
    m = _layer(scn.Deconvolution, 2, 3, f, s, d, dtype, device, ground_state, rng)
    w, b = np_(m.weight.data).copy(), np_(m.bias.data).copy()
    xd, mask = dense_of(x)
    y = m(x)
    assert y.spatial_shape == ref.deconv_shape(spatial, f, s)
    _, ymask = dense_of(y)
    np.testing.assert_array_equal(ymask, ref.deconv_mask(mask, f, s))
    if ground_state:
        y_ref = ref.deconv_forward(xd, w, b, f, s)
        assert_close(y.ground, b, dtype, "ground")
    else:
        y_ref = ref.deconv_zero_forward(xd, mask, w, b, f, s)
        assert_close(y.ground, np.zeros(3), dtype, "ground")
    yd = y.to_dense()
    assert_close(yd.numpy(), y_ref, dtype, "forward")
    G = rng.standard_normal(yd.shape).astype(dtype)
    yd.backward(G)
    if ground_state:
        gx, gw, gb = ref.deconv_backward(xd, w, b, f, s, G)
    else:
        gx, gw, gb = ref.deconv_zero_backward(xd, mask, w, b, f, s, G)
    assert_close(m.weight.grad, gw, dtype, "weight grad")
    assert_close(m.bias.grad, gb, dtype, "bias grad")
    if x.n_active:
        assert_close(x.grad, ref.gather_sites(gx, np_(x.coords)), dtype, "input grad")
        assert_close(x.ground_grad, np.zeros(2), dtype, "input ground gets no gradient")


def test_deconvolution_no_bias(device, rng):
    x = random_sparse(rng, 1, (3, 3), 2, 0.5, ground=False, device=device)
    m = _layer(scn.Deconvolution, 2, 2, 2, 2, 2, np.float64, device, True, rng, bias=False)
    y = m(x)
    xd, _ = dense_of(x)
    assert_close(y.to_dense().numpy(), ref.deconv_forward(xd, np_(m.weight.data), np.zeros(2),
                                                          2, 2), np.float64)
    assert m.parameters() == [m.weight]


def test_nonzero_ground_refused(device, rng):
    x = random_sparse(rng, 1, (3, 3), 2, 0.5, ground=True, device=device)
    m = _layer(scn.Deconvolution, 2, 2, 2, 2, 2, np.float64, device, True, rng)
    with pytest.raises(ValueError, match="ground state is nonzero.*varies with position"):
        m(x)
    m.set_ground_state(False)        # zero-ground mode: the ground counts as 0
    assert m(x).n_active > 0


def test_output_order_and_cache(device, rng):
    """Output rows in first-appearance (input row, offset) order; the rulebook and geometry
    are built once per input geometry."""
    coords = np.array([[0, 2], [0, 0], [0, 1]], np.int32)
    x = scn.SparseTensor(coords, np.ones((3, 1)), (3,))
    if device != "cpu":
        x = scn.SparseTensor(*(scn.backend.to_device(a, device) for a in (coords, np.ones(
            (3, 1)))), (3,))
    rb, g = D.deconv_geometry(x.geometry, 2, 1)
    np.testing.assert_array_equal(np_(g.coords)[:, 1], [2, 3, 0, 1])
    assert D.deconv_geometry(x.geometry, 2, 1)[1] is g
    m = scn.Deconvolution(1, 1, 2, 1, dim=1, dtype=np.float64).to(device)
    assert m(x).geometry is g and m(x).geometry is g
    np.testing.assert_array_equal(np_(rb.offsets), [0, 3, 6])
    np.testing.assert_array_equal(np_(rb.out_idx), [0, 2, 3, 1, 3, 0])


def test_size_limits():
    g = Geometry(np.zeros((1, 2), np.int32), (2**30,), 1)
    with pytest.raises(ValueError, match="exceeds 2\\*\\*31 - 1"):
        D.deconv_geometry(g, 2, 4)
    g2 = Geometry(np.zeros((1, 3), np.int32), (4, 4), 1)
    with pytest.raises(ValueError, match="window volume"):
        D.deconv_geometry(g2, 5000, 1)
    big = Geometry(np.zeros((2**20, 2), np.int32), (8,), 1)   # n * K > 2**31 - 1 pairs
    with pytest.raises(ValueError, match="pairs"):
        D.deconv_geometry(big, 2**12, 1)


# -- inverse modes --------------------------------------------------------------------------
INV_CASES = [(1, (7,), 3, 2), (1, (6,), 2, 2), (2, (5, 4), 2, 1), (2, (5, 5), 3, 2),
             (3, (4, 2, 4), 2, 2), (3, (3, 3, 5), 3, 2)]


def _coarse(like, f, s, dtype, rng, device):
    """A leaf tensor on the sites of like's (f, s) window output, with a random ground."""
    _, coarse = like.geometry.conv(f, s)
    feats = rng.standard_normal((coarse.n_active, 2)).astype(dtype)
    g = rng.standard_normal(2).astype(dtype)
    t = scn.SparseTensor._make(coarse, *(scn.backend.to_device(a, device) for a in (feats, g)))
    t.requires_grad = True
    return t


def _upstream(y, rng, dtype):
    """Random gradients for y's features and ground, and the dense gradient they are of the
    dense result read at y's sites (0 elsewhere)."""
    gy = rng.standard_normal((y.n_active, y.channels)).astype(dtype)
    gg = rng.standard_normal(y.channels).astype(dtype)
    dense = ref.to_dense(np_(y.coords), gy, y.spatial_shape, y.batch_size)
    return gy, gg, dense


@pytest.mark.parametrize("d,spatial,f,s", INV_CASES)
@pytest.mark.parametrize("density", ["one", 0.4, 1.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ground_state", [True, False])
def test_inverse_convolution_vs_dense(device, rng, d, spatial, f, s, density, dtype,
                                      ground_state):
    like = random_sparse(rng, 2, spatial, 1, density, dtype, requires_grad=False,
                         device=device)
    x = _coarse(like, f, s, dtype, rng, device)
    m = _layer(scn.InverseConvolution, 2, 3, f, s, d, dtype, device, ground_state, rng)
    w, b = np_(m.weight.data).copy(), np_(m.bias.data).copy()
    y = m((x, like))
    assert y.geometry is like.geometry
    xd, _ = dense_of(x)          # x's ground at its inactive sites: never read
    _, like_mask = dense_of(like)
    y_ref = ref.zero_inactive(ref.deconv_forward(xd, w, b, f, s), like_mask)
    assert_close(ref.zero_inactive(dense_of(y)[0], like_mask), y_ref, dtype, "forward")
    assert_close(y.ground, b if ground_state else np.zeros(3), dtype, "ground")
    gy, gg, gdense = _upstream(y, rng, dtype)
    # upstream: gy at like's sites, gg on the ground (spread over the inactive positions)
    n_inactive = int((~like_mask).sum())
    G = gdense + (np.where(like_mask[:, None], 0, gg[None, :, *(None,) * d] / n_inactive)
                  if n_inactive else 0)
    y.to_dense().backward(G.astype(dtype))
    gx, gw, gb = ref.deconv_backward(xd, w, b, f, s, gdense)
    if ground_state and n_inactive:
        gb = gb + gg
    assert_close(m.weight.grad, gw, dtype, "weight grad")
    assert_close(m.bias.grad, gb, dtype, "bias grad")
    assert_close(x.grad, ref.gather_sites(gx, np_(x.coords)), dtype, "input grad")
    assert_close(x.ground_grad, np.zeros(2), dtype, "x's ground gets no gradient")


@pytest.mark.parametrize("d,spatial,f,s", INV_CASES)
@pytest.mark.parametrize("density", ["one", 0.4, 1.0])
@pytest.mark.parametrize("ground_state", [True, False])
def test_unpooling_vs_dense(device, rng, d, spatial, f, s, density, ground_state):
    dtype = np.float64 if d != 2 else np.float32
    like = random_sparse(rng, 2, spatial, 1, density, dtype, requires_grad=False,
                         device=device)
    x = _coarse(like, f, s, dtype, rng, device)
    m = scn.UnPooling(f, s, dim=d).set_ground_state(ground_state)
    y = m((x, like))
    assert y.geometry is like.geometry
    xd, _ = dense_of(x)
    _, like_mask = dense_of(like)
    y_ref = ref.zero_inactive(ref.unpool_forward(xd, f, s), like_mask)
    assert_close(ref.zero_inactive(dense_of(y)[0], like_mask), y_ref, dtype, "forward")
    assert_close(y.ground, np_(x.ground) if ground_state else np.zeros(2), dtype, "ground")
    gy, gg, gdense = _upstream(y, rng, dtype)
    n_inactive = int((~like_mask).sum())
    G = gdense + (np.where(like_mask[:, None], 0, gg[None, :, *(None,) * d] / n_inactive)
                  if n_inactive else 0)
    y.to_dense().backward(G.astype(dtype))
    gx = ref.unpool_backward(xd, f, s, gdense)
    assert_close(x.grad, ref.gather_sites(gx, np_(x.coords)), dtype, "input grad")
    g_ground = gg if ground_state and n_inactive else np.zeros(2)
    assert_close(x.ground_grad, g_ground, dtype, "input ground grad")


def test_unet_round_trip(device, rng):
    """A strided convolution down and InverseConvolution / UnPooling back: on like's sites."""
    like = random_sparse(rng, 1, (9, 9), 2, 0.3, device=device)
    down = scn.Convolution(2, 4, 3, 2, dtype=np.float64).to(device)
    up = scn.InverseConvolution(4, 2, 3, 2, dtype=np.float64).to(device)
    h = scn.ReLU()(down(like))
    y = up((h, like))
    assert y.geometry is like.geometry
    u = scn.UnPooling(3, 2)((h, like))
    assert u.geometry is like.geometry and u.channels == 4
    scn.concat([y, like]).to_dense().numpy().sum()


# -- modules: errors, sizes, save / load -------------------------------------------------
def test_bad_inputs(device, rng):
    like = random_sparse(rng, 1, (5, 5), 2, 0.5, device=device)
    other = random_sparse(rng, 1, (2, 2), 2, 0.5, device=device)
    up = scn.InverseConvolution(2, 2, 3, 2, dtype=np.float64).to(device)
    with pytest.raises(TypeError, match="tuple \\(x, like\\)"):
        up(like)
    with pytest.raises(ValueError, match="x must live on the sites"):
        up((other, like))
    with pytest.raises(TypeError, match="like must be a SparseTensor"):
        up((other, np.zeros(3)))
    with pytest.raises(ValueError, match="UnPooling\\(filter_size=3, stride=2\\) needs"):
        scn.UnPooling(3, 2)((other, random_sparse(rng, 1, (4, 4), 2, 0.5, device=device)))
    m = scn.Deconvolution(3, 2, 2, 2, dtype=np.float64).to(device)
    with pytest.raises(ValueError, match="expects 3 input channels"):
        m.set_ground_state(False)(like)
    with pytest.raises(ValueError, match="1-dimensional"):
        scn.Deconvolution(2, 2, 2, 2, dim=1, dtype=np.float64).to(device)(like)
    with pytest.raises(TypeError, match="stride must be an int"):
        scn.Deconvolution(2, 2, 2, 1.5)


def test_input_size_rule():
    m = scn.Deconvolution(1, 1, 3, 2)
    assert m.input_size(7) == 3
    with pytest.raises(ValueError, match="no input size"):
        m.input_size(6)
    assert scn.UnPooling(2).input_size(8) == 4


def test_save_load(tmp_path, rng):
    for m in (scn.Deconvolution(2, 3, 3, 2, dim=3, seed=1),
              scn.InverseConvolution(2, 3, 2, 2, dim=1, bias=False, dtype=np.float64),
              scn.UnPooling(3, 2, dim=2)):
        m.set_ground_state(False)
        scn.save(m, tmp_path / "m.npz")
        loaded = scn.load(tmp_path / "m.npz")
        assert type(loaded) is type(m) and loaded.spec() == m.spec()
        assert not loaded.ground_state
        for a, b in zip(loaded.parameters(), m.parameters(), strict=True):
            np.testing.assert_array_equal(a.data, b.data)
