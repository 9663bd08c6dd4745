"""Depthwise convolutions (sparsecnn/depthwise.py) against the dense depthwise convolution
(groups = C), ground state included, on both devices: forward at every site, the active set,
the output ground, and every gradient (features, ground, weight, bias), in both modes. The
dense oracle (tests/dense_reference.py) is itself checked by finite differences and against
the full convolution with a diagonal filter; the GPU kernels are checked against the CPU ones
and for bitwise-stable results on a rerun and on the simulation's reversed schedule."""
from __future__ import annotations

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import backend
from tests import dense_reference as ref
from tests.conftest import CUDA_MODE, CUDA_WHY
from tests.sparse_helpers import (
    assert_close,
    backprop,
    check_input_grads,
    dense_of,
    np_,
    random_sparse,
    set_params,
)
from tests.test_dense_reference import assert_vjp

MODES = pytest.mark.parametrize("gs", [True, False], ids=["ground", "zero"])
DENSITIES = [0.0, "one", 0.3, 1.0]


# -- the oracle --------------------------------------------------------------------------------
ORACLE_CASES = [(1, (7,), 3, 2, 3), (2, (5, 7), 3, 1, 2), (2, (6, 6), 2, 2, 3),
                (3, (4, 4, 4), 2, 2, 2)]


@pytest.mark.parametrize("d,sp,f,s,c", ORACLE_CASES)
def test_oracle_vjp_and_diagonal_conv(d, sp, f, s, c):
    rng = np.random.default_rng(d * 10 + f)
    x = rng.standard_normal((2, c) + sp)
    w = rng.standard_normal((f**d, c))
    b = rng.standard_normal(c)
    assert_vjp(lambda x, w, b: ref.depthwise_forward(x, w, b, f, s), [x, w, b], [0, 1, 2],
               lambda x, w, b, u: ref.depthwise_backward(x, w, b, f, s, u), seed=1)
    # the dense convolution with the diagonal filter W_full[k, c, c] = w[k, c]
    full = np.zeros((f**d, c, c))
    full[:, np.arange(c), np.arange(c)] = w
    np.testing.assert_allclose(ref.depthwise_forward(x, w, b, f, s),
                               ref.conv_forward(x, full, b, f, s), rtol=1e-12, atol=1e-12)
    mask = rng.random((2,) + sp) < 0.4
    assert_vjp(lambda x, w, b: ref.depthwise_zero_forward(x, mask, w, b, f, s), [x, w, b],
               [0, 1, 2],
               lambda x, w, b, u: ref.depthwise_zero_backward(x, mask, w, b, f, s, u), seed=2)


@pytest.mark.parametrize("d,sp,f,c", [(1, (7,), 3, 2), (2, (5, 4), 3, 2), (2, (4, 4), 1, 3),
                                      (3, (3, 4, 3), 3, 2)])
def test_oracle_submanifold_vjp(d, sp, f, c):
    rng = np.random.default_rng(d * 7 + f)
    x = rng.standard_normal((2, c) + sp)
    mask = rng.random((2,) + sp) < 0.4
    g = rng.standard_normal(c)
    w = rng.standard_normal((f**d, c))
    b = rng.standard_normal(c)
    assert_vjp(lambda x, g, w, b: ref.submanifold_depthwise_forward(x, mask, g, w, b, f),
               [x, g, w, b], [0, 1, 2, 3],
               lambda x, g, w, b, u: ref.submanifold_depthwise_backward(x, mask, g, w, b, f, u),
               seed=3)
    full = np.zeros((f**d, c, c))
    full[:, np.arange(c), np.arange(c)] = w
    np.testing.assert_allclose(ref.submanifold_depthwise_forward(x, mask, g, w, b, f),
                               ref.submanifold_forward(x, mask, g, full, b, f), atol=1e-12)
    assert_vjp(lambda x, w, b: ref.submanifold_depthwise_zero_forward(x, mask, w, b, f),
               [x, w, b], [0, 1, 2],
               lambda x, w, b, u: ref.submanifold_depthwise_zero_backward(x, mask, w, b, f, u),
               seed=4)


# -- hand-checked -------------------------------------------------------------------------------
def test_hand_1d(device):
    # grid of 4, sites 0 and 2 active, ground 10 (channel 0) and -1 (channel 1), f = 2, s = 1
    coords = np.array([[0, 0], [0, 2]], np.int32)
    feats = np.array([[1.0, 2.0], [3.0, 4.0]])
    g = np.array([10.0, -1.0])
    dev = [backend.to_device(a, device) for a in (coords, feats, g)]
    x = scn.SparseTensor(dev[0], dev[1], (4,), ground=dev[2])
    conv = scn.DepthwiseConvolution(2, 2, dim=1, dtype=np.float64)
    conv.weight.data = np.array([[1.0, 2.0], [3.0, 4.0]])      # (K=2, C=2)
    conv.bias.data = np.array([0.5, 0.0])
    conv.to(device)
    y = conv(x)
    # g_out = b + (w0 + w1) g = [0.5 + 40, -6]
    np.testing.assert_allclose(np_(y.ground), [40.5, -6.0])
    # outputs 0..2 all see an active site; y[o] = w0 x[o] + w1 x[o + 1] + b
    yd = y.to_dense().numpy()[0]
    np.testing.assert_allclose(yd[0], [1 + 3 * 10 + 0.5, 10 + 3 * 3 + 0.5, 3 + 3 * 10 + 0.5])
    np.testing.assert_allclose(yd[1], [2 * 2 + 4 * -1, 2 * -1 + 4 * 4, 2 * 4 + 4 * -1])
    conv.set_ground_state(False)
    y0 = conv(x).to_dense().numpy()[0]
    np.testing.assert_allclose(y0[0], [1.5, 9.5, 3.5])
    np.testing.assert_allclose(y0[1], [4.0, 16.0, 8.0])


# -- layers against the oracle -----------------------------------------------------------------
DW_CASES = [(1, 1, 1, 2), (1, 3, 1, 3), (1, 3, 2, 1), (2, 2, 2, 3), (2, 3, 1, 2), (2, 3, 3, 4),
            (3, 2, 1, 2), (3, 3, 2, 1)]


@MODES
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("d,f,s,c", DW_CASES)
def test_depthwise_convolution(d, f, s, c, density, dtype, gs, rng, device):
    m = {1: 5, 2: 3, 3: 2}[d]
    spatial = (f + s * (m - 1),) * d
    x = random_sparse(rng, 2, spatial, c, density, dtype, device=device)
    conv = scn.DepthwiseConvolution(c, f, s, dim=d, dtype=dtype).set_ground_state(gs)
    set_params(conv, rng, dtype)
    conv.to(device)
    y = conv(x)
    assert y.device == x.device
    xd, mask = dense_of(x)
    W, b = np_(conv.weight.data), np_(conv.bias.data)
    if gs:
        expected = ref.depthwise_forward(xd, W, b, f, s)
        g_out = b + W.sum(axis=0) * np_(x.ground)
    else:
        expected = ref.depthwise_zero_forward(xd, mask, W, b, f, s)
        g_out = np.zeros(c)
    assert_close(y.to_dense().numpy(), expected, dtype, "forward")
    assert_close(y.ground, g_out, dtype, "output ground")
    _, out_mask = dense_of(y)
    np.testing.assert_array_equal(out_mask, ref.window_mask(mask, f, s))
    G = backprop(y, rng)
    if gs:
        gx, gW, gb = ref.depthwise_backward(xd, W, b, f, s, G)
    else:
        gx, gW, gb = ref.depthwise_zero_backward(xd, mask, W, b, f, s, G)
    assert_close(conv.weight.grad, gW, dtype, "weight grad")
    assert_close(conv.bias.grad, gb, dtype, "bias grad")
    check_input_grads(x, gx, dtype)


@MODES
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("d,f,c", [(1, 1, 2), (1, 5, 2), (2, 3, 3), (3, 3, 2)])
def test_submanifold_depthwise_convolution(d, f, c, density, dtype, gs, rng, device):
    spatial = {1: (9,), 2: (5, 4), 3: (3, 4, 3)}[d]
    x = random_sparse(rng, 2, spatial, c, density, dtype, device=device)
    conv = scn.SubmanifoldDepthwiseConvolution(c, f, dim=d, dtype=dtype).set_ground_state(gs)
    set_params(conv, rng, dtype)
    conv.to(device)
    y = conv(x)
    assert y.geometry is x.geometry
    xd, mask = dense_of(x)
    g = np_(x.ground)
    W, b = np_(conv.weight.data), np_(conv.bias.data)
    if gs:
        expected = ref.submanifold_depthwise_forward(xd, mask, g, W, b, f)
    else:
        expected = ref.submanifold_depthwise_zero_forward(xd, mask, W, b, f)
    assert_close(y.to_dense().numpy(), expected, dtype, "forward")
    G = backprop(y, rng)
    if gs:
        gx, g_ground, gW, gb = ref.submanifold_depthwise_backward(xd, mask, g, W, b, f, G)
    else:
        (gx, gW, gb), g_ground = ref.submanifold_depthwise_zero_backward(xd, mask, W, b, f, G), 0
    assert_close(conv.weight.grad, gW, dtype, "weight grad")
    assert_close(conv.bias.grad, gb, dtype, "bias grad")
    check_input_grads(x, gx, dtype, extra_ground=g_ground)


def test_no_bias_and_frozen_input(rng, device):
    x = random_sparse(rng, 1, (6, 6), 3, 0.4, requires_grad=False, device=device)
    conv = scn.DepthwiseConvolution(3, 3, dim=2, bias=False, dtype=np.float64).to(device)
    y = conv(x)
    xd, _ = dense_of(x)
    W = np_(conv.weight.data)
    assert_close(y.to_dense().numpy(), ref.depthwise_forward(xd, W, np.zeros(3), 3, 1),
                 np.float64)
    G = backprop(y, rng)
    assert_close(conv.weight.grad, ref.depthwise_backward(xd, W, np.zeros(3), 3, 1, G)[1],
                 np.float64)
    assert x.grad is None


def test_separable_is_depthwise_then_network_in_network(rng, device):
    """DepthwiseConvolution then NetworkInNetwork = the convolution with the filter
    W[k, ci, co] = Wd[k, ci] Wp[ci, co] (ground state included)."""
    x = random_sparse(rng, 2, (7, 7), 3, 0.3, device=device)
    dw = scn.DepthwiseConvolution(3, 3, 2, dtype=np.float64)
    pw = scn.NetworkInNetwork(3, 4, dtype=np.float64)
    set_params(dw, rng, np.float64)
    set_params(pw, rng, np.float64)
    conv = scn.Convolution(3, 4, 3, 2, dtype=np.float64)
    Wd, bd, Wp, bp = (np_(p.data) for p in (dw.weight, dw.bias, pw.weight, pw.bias))
    conv.weight.data = Wd[:, :, None] * Wp[None]
    conv.bias.data = bd @ Wp + bp
    net = scn.Sequential(dw, pw).to(device)
    conv.to(device)
    a, b = net(x), conv(x)
    np.testing.assert_allclose(a.to_dense().numpy(), b.to_dense().numpy(), atol=1e-12)
    np.testing.assert_allclose(np_(a.ground), np_(b.ground), atol=1e-12)


def test_save_load_roundtrip(tmp_path, rng):
    net = scn.Sequential(scn.DepthwiseConvolution(2, 2, 2, dtype=np.float64, seed=1),
                         scn.SubmanifoldDepthwiseConvolution(2, 3, bias=False,
                                                             dtype=np.float64, seed=2))
    path = tmp_path / "dw.scn"
    scn.save(net, path)
    back = scn.load(path)
    assert repr(back) == repr(net)
    x = random_sparse(rng, 1, (6, 6), 2, 0.5, requires_grad=False)
    np.testing.assert_array_equal(back(x).features, net(x).features)
    assert net[0].input_size(3) == 6


def test_bad_input(rng):
    x = random_sparse(rng, 1, (5, 5), 2, 0.5)
    with pytest.raises(ValueError, match="odd"):
        scn.SubmanifoldDepthwiseConvolution(2, 2)
    with pytest.raises(TypeError, match="channels"):
        scn.DepthwiseConvolution(2.0, 3)
    with pytest.raises(ValueError, match="input channels"):
        scn.DepthwiseConvolution(3, 3)(x)
    with pytest.raises(ValueError, match="dimensional"):
        scn.DepthwiseConvolution(2, 3, dim=3)(x)
    with pytest.raises(TypeError, match="float32 but weight is float64|float64 but weight"):
        scn.DepthwiseConvolution(2, 3, dtype=np.float32)(x)
    with pytest.raises(TypeError, match="SparseTensor"):
        scn.depthwise_convolution(np.zeros((3, 2)), scn.Parameter(np.zeros((9, 2))), None, 3)
    with pytest.raises(ValueError, match="weight must have shape"):
        scn.depthwise_convolution(x, scn.Parameter(np.zeros((9, 2, 2))), None, 3)
    with pytest.raises(ValueError, match="weight has shape"):
        scn.depthwise_convolution(x, scn.Parameter(np.zeros((4, 2))), None, 3)
    with pytest.raises(ValueError, match="bias has shape"):
        scn.depthwise_convolution(x, scn.Parameter(np.zeros((9, 2))),
                                  scn.Parameter(np.zeros(3)), 3)
    with pytest.raises(ValueError, match="filter_size must be odd"):
        scn.submanifold_depthwise_convolution(x, scn.Parameter(np.zeros((4, 2))), None, 2)


# -- GPU kernels against the CPU ones, bitwise stable --------------------------------------------
@pytest.fixture
def cuda(monkeypatch):
    if CUDA_MODE == "sim":
        monkeypatch.setenv("SPARSECNN_CUDA_SIM", "1")
    return "cuda"


def _stable(fn, monkeypatch):
    """fn() twice, then with the simulation's schedule reversed: bitwise identical."""
    res = []
    for rev in ("0", "0", "1"):
        monkeypatch.setenv("SPARSECNN_CUDA_SIM_REVERSE", rev)
        res.append([np_(a) for a in fn()])
    monkeypatch.setenv("SPARSECNN_CUDA_SIM_REVERSE", "0")
    for r in res[1:]:
        for a, b in zip(res[0], r, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), "not bitwise stable"
    return res[0]


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_MODE is None, reason=str(CUDA_WHY))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind,f,s", [("conv", 3, 2), ("conv", 2, 1), ("subm", 3, 1)])
def test_gpu_kernels_match_cpu_and_are_stable(kind, f, s, dtype, cuda, rng, monkeypatch):
    # many pairs per offset (several weight-gradient chunks), C not a multiple of 32
    x = random_sparse(rng, 3, (33, 33), 5, 0.6, dtype, requires_grad=False)
    xc = x.to(cuda)
    K = f**2
    W = rng.standard_normal((K, 5)).astype(dtype)
    row, g = (rng.standard_normal(5).astype(dtype) for _ in range(2))

    def rulebook(t):
        return t.geometry.submanifold(f) if kind == "subm" else t.geometry.conv(f, s)[0]

    rb, rbc = rulebook(x), rulebook(xc)
    cpu = backend.kernels("cpu")
    y = cpu.depthwise_forward(x.features, W, row, g, rb)
    gy = rng.standard_normal(y.shape).astype(dtype)
    gx, gw = cpu.depthwise_backward(x.features, W, g, gy, rb)
    assert gw.shape == (K, 5) and rb.n_pairs > 256 * K
    gk = backend.kernels(cuda)
    Wc, rowc, gc, gyc = (backend.to_device(a, cuda) for a in (W, row, g, gy))

    def run():
        yc = gk.depthwise_forward(xc.features, Wc, rowc, gc, rbc)
        return (yc, *gk.depthwise_backward(xc.features, Wc, gc, gyc, rbc))

    yc, gxc, gwc = _stable(run, monkeypatch)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(yc, y, **tol)
    np.testing.assert_allclose(gxc, gx, **tol)
    np.testing.assert_allclose(gwc, gw, rtol=tol["rtol"], atol=tol["atol"] * rb.n_pairs)
    none, gw2 = gk.depthwise_backward(xc.features, Wc, gc, gyc, rbc, grad_input=False)
    assert none is None and np.array_equal(np_(gw2), gwc)
