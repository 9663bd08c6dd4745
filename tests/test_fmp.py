"""Fractional max-pooling (sparsecnn.fmp) against the dense oracle with the same regions, on
both devices; the region sequences; train / eval draws; the FMP network builder."""
import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import fmp
from tests import dense_reference as ref
from tests.sparse_helpers import assert_close, dense_of, np_, random_sparse, split_input_grad
from tests.test_dense_reference import assert_vjp, separated

SHAPES = {1: (9,), 2: (7, 6), 3: (5, 4, 5)}


# -- the oracle, gradient-checked -------------------------------------------------------------
@pytest.mark.parametrize("overlapping", [False, True])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_oracle_gradcheck(d, overlapping):
    rng = np.random.default_rng(d + 10 * overlapping)
    sp = SHAPES[d]
    regions = [fmp.fmp_regions(n, 1.45, rng, overlapping=overlapping) for n in sp]
    x = separated(rng, (2, 2, *sp))
    assert_vjp(lambda a: ref.fmp_forward(a, regions), [x], [0],
               lambda a, u: ref.fmp_backward(a, regions, u), seed=1)
    mask = rng.random((2, *sp)) < 0.4
    assert_vjp(lambda a: ref.fmp_zero_forward(a, mask, regions), [x], [0],
               lambda a, u: ref.fmp_zero_backward(a, mask, regions, u), seed=2)


def test_oracle_hand():
    x = np.array([[[3.0, 1.0, 4.0, 1.0, 5.0]]])
    regions = [np.array([[0, 2], [2, 3], [3, 5]])]
    np.testing.assert_array_equal(ref.fmp_forward(x, regions), [[[3.0, 4.0, 5.0]]])
    gx = ref.fmp_backward(x, regions, np.array([[[1.0, 2.0, 3.0]]]))
    np.testing.assert_array_equal(gx, [[[1.0, 0, 2.0, 0, 3.0]]])
    # overlapping regions share a row: its gradient adds up
    regions = [np.array([[0, 3], [2, 5]])]
    x = np.array([[[0.0, 1.0, 9.0, 1.0, 0.0]]])
    np.testing.assert_array_equal(ref.fmp_backward(x, regions, np.array([[[1.0, 2.0]]])),
                                  [[[0, 0, 3.0, 0, 0]]])


# -- sparse vs dense -------------------------------------------------------------------------
def _check(x, regions, ground_state, rng):
    xd, mask = dense_of(x)
    y = scn.fractional_max_pooling(x, regions, ground_state=ground_state)
    _, y_mask = dense_of(y)
    np.testing.assert_array_equal(y_mask, ref.fmp_mask(mask, regions), "active outputs")
    yd = y.to_dense()
    if ground_state:
        y_ref = ref.fmp_forward(xd, regions)
        assert_close(y.ground, np_(x.ground), x.dtype, "output ground")
    else:
        y_ref = ref.fmp_zero_forward(xd, mask, regions)
        assert_close(y.ground, np.zeros(x.channels), x.dtype, "output ground")
    assert_close(yd.numpy(), y_ref, x.dtype, "forward")
    G = rng.standard_normal(yd.shape).astype(x.dtype)
    yd.backward(G)
    if ground_state:
        gs, gg = split_input_grad(x, ref.fmp_backward(xd, regions, G))
    else:
        gs, _ = split_input_grad(x, ref.fmp_zero_backward(xd, mask, regions, G))
        gg = np.zeros(x.channels)
    assert_close(x.grad, gs, x.dtype, "grad at active sites")
    assert_close(x.ground_grad, gg, x.dtype, "ground grad")


@pytest.mark.parametrize("pseudo_random", [False, True])
@pytest.mark.parametrize("overlapping", [False, True])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_matches_dense(device, rng, d, overlapping, pseudo_random):
    sp = SHAPES[d]
    layer = scn.FractionalMaxPooling(1.5 if d == 1 else 2 ** 0.5, overlapping=overlapping,
                                     pseudo_random=pseudo_random, dim=d, seed=3)
    for dtype in (np.float32, np.float64):
        for density in (0, "one", 0.3, 1.0):
            for ground_state in (True, False):
                x = random_sparse(rng, 2, sp, 3, density, dtype=dtype, device=device)
                _check(x, layer.regions_for(sp), ground_state, rng)


def test_layer_forward_modes(device, rng):
    """The module: training draws, zero-ground mode via set_ground_state, output shape."""
    layer = scn.FractionalMaxPooling(2 ** 0.5, overlapping=True, seed=0)
    x = random_sparse(rng, 2, (11, 10), 2, 0.4, device=device)
    y = layer(x)
    assert y.spatial_shape == (7, 7)
    assert scn.backend.device_of(y.features) == device
    layer.set_ground_state(False)
    assert float(np.abs(np_(layer(x).ground)).max()) == 0.0


def test_full_small_regions_get_no_ground():
    """A fully active region smaller than the window volume K must not take the ground (the
    phantom row fills its missing positions): a ground larger than every feature."""
    x = scn.SparseTensor(np.array([[0, 0], [0, 1], [0, 2]], np.int32),
                         np.array([[1.0], [2.0], [3.0]]), (3,), ground=np.array([10.0]))
    regions = [np.array([[0, 1], [1, 3]])]        # sizes 1 and 2: K = 2
    np.testing.assert_array_equal(np_(scn.fractional_max_pooling(x, regions).features),
                                  [[1.0], [3.0]])
    x = scn.SparseTensor(np.array([[0, 1]], np.int32), np.array([[2.0]]), (3,),
                         ground=np.array([10.0]))
    np.testing.assert_array_equal(np_(scn.fractional_max_pooling(x, regions).features),
                                  [[10.0]])


# -- regions --------------------------------------------------------------------------------
@pytest.mark.parametrize("pseudo_random", [False, True])
def test_sequences(pseudo_random):
    rng = np.random.default_rng(0)
    for ratio in (1.01, 2 ** 0.5, 1.5, 1.99):
        for n in range(2, 60):
            m = fmp.fmp_output_size(n, ratio)
            assert m == int(np.floor(n / ratio))
            a = fmp.fmp_sequence(n, m, rng, pseudo_random=pseudo_random)
            assert a[0] == 0 and a[-1] == n - 1 and len(a) == m + 1
            assert set(np.diff(a)) <= {1, 2}
            r = fmp.fmp_regions(n, ratio, np.random.default_rng(1), overlapping=True,
                                pseudo_random=pseudo_random)
            assert r[-1, 1] == n and (r[:, 1] - r[:, 0] <= 3).all()
            k = fmp.fmp_input_size(m, ratio)
            assert fmp.fmp_output_size(k, ratio) == m and (
                k == 2 or fmp.fmp_output_size(k - 1, ratio) < m)


def test_pseudo_random_is_ceil_formula():
    a = fmp.fmp_sequence(11, 7, np.random.default_rng(5), pseudo_random=True)
    u = np.random.default_rng(5).random()
    alpha = 10 / 7
    expect = np.ceil(alpha * (np.arange(8) + u)) - np.ceil(alpha * u)
    np.testing.assert_array_equal(a, expect)


def test_draws_train_fixed_eval_and_devices():
    def regs(layer):
        return [r.tolist() for r in layer.regions_for((20, 20))]
    a, b = (scn.FractionalMaxPooling(1.5, seed=7) for _ in range(2))
    first = regs(a)
    assert first == regs(b)                    # seeded
    assert regs(a) != first                    # a new draw per training pass
    a.eval()
    kept = regs(a)
    assert regs(a) == kept and regs(b.eval()) == kept
    a.train()
    assert regs(a.eval()) == kept


def test_same_regions_cpu_and_cuda(device, rng):
    x = random_sparse(rng, 1, (9, 9), 2, 0.5, device=device)
    y = scn.FractionalMaxPooling(1.5, seed=4)(x)
    ref_y = scn.FractionalMaxPooling(1.5, seed=4)(x.to("cpu") if device != "cpu" else x)
    np.testing.assert_array_equal(dense_of(y)[0], dense_of(ref_y)[0])


def test_eval_fresh_for_tta():
    """eval_regions='fresh': each eval pass draws new regions (so train.evaluate(tta=k)
    averages k draws), and entering eval mode restarts them (reproducible evaluation)."""
    layer = scn.FractionalMaxPooling(1.5, seed=2, eval_regions="fresh").eval()
    passes = [[r.tolist() for r in layer.regions_for((30,))] for _ in range(3)]
    assert passes[0] != passes[1] != passes[2]
    model = scn.Sequential(layer)
    model.eval()
    assert [[r.tolist() for r in layer.regions_for((30,))] for _ in range(3)] == passes


def test_eval_fresh_net_passes_differ():
    """An FMP net in eval mode with fresh regions: passes differ, eval() restarts them."""
    net = fmp.fmp_net(2, 4, eval_regions="fresh", seed=0)
    n = net.input_size
    x = scn.SparseTensor(np.array([[0, i, i] for i in range(n)], np.int32),
                         np.ones((n, 1), np.float32), (n, n))
    net.eval()
    with scn.no_grad():
        outs = [net(x).numpy() for _ in range(2)]
    assert not np.allclose(outs[0], outs[1])
    net.eval()
    with scn.no_grad():
        np.testing.assert_array_equal(net(x).numpy(), outs[0])


# -- the network ----------------------------------------------------------------------------
def test_fmp_net(device, rng, tmp_path):
    net = fmp.fmp_net(3, 4, in_channels=1, num_classes=5)
    size = 2
    for _ in range(3):
        size = fmp.fmp_input_size(size, 2 ** 0.5) + 1
    assert net.input_size == size == 11
    assert fmp.fmp_net(6, 32).input_size == 38
    x = random_sparse(rng, 2, (11, 11), 1, 0.3, dtype=np.float32, device=device)
    net.to(device)
    net.eval()
    y = net(x)
    assert y.shape == (2, 5)
    path = str(tmp_path / "fmp.npz")
    scn.save(net, path)
    net2 = scn.load(path).to(device)
    net2.eval()
    np.testing.assert_allclose(np_(net2(x).data), np_(y.data), rtol=1e-6)
    assert scn.models is not None


def test_bad_input():
    for r in (1, 2, 1.0, 2.5, "1.5", True):
        with pytest.raises(ValueError, match="ratio"):
            scn.FractionalMaxPooling(r)
    with pytest.raises(ValueError, match="eval_regions"):
        scn.FractionalMaxPooling(1.5, eval_regions="x")
    with pytest.raises(ValueError, match="seed"):
        scn.FractionalMaxPooling(1.5, seed=-1)
    x = scn.SparseTensor(np.zeros((1, 2), np.int32), np.ones((1, 1)), (1,))
    with pytest.raises(ValueError, match="spatial_shape"):
        scn.FractionalMaxPooling(1.5, dim=1)(x)
    with pytest.raises(ValueError, match="regions"):
        scn.fractional_max_pooling(x, [np.array([[0, 2]])])
    with pytest.raises(TypeError, match="SparseTensor"):
        scn.fractional_max_pooling(np.ones(3), [])
