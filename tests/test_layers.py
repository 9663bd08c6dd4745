"""Every layer against the dense NumPy oracle: forward (inactive sites included) and every
gradient (weights, biases, ground, inputs), on random inputs of several sizes, dims, filter
sizes, strides, channel counts, densities and dtypes."""
import itertools

import numpy as np
import pytest

import sparsecnn as scn
from tests import dense_reference as ref
from tests.sparse_helpers import (
    assert_close,
    backprop,
    check_input_grads,
    check_net,
    dense_of,
    np_,
    oracle_input,
    oracle_net,
    random_sparse,
    set_params,
)

DENSITIES = [0.0, "one", 0.05, 0.3, 1.0]
# both semantics: the ground state (design.md) and ground_state=False (zero ground)
MODES = pytest.mark.parametrize("gs", [True, False], ids=["ground", "zero"])


def _conv_cases():
    cases = []
    for d, (f, s), (cin, cout) in itertools.product(
            [1, 2, 3], [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3)], [(1, 3), (4, 5)]):
        cases.append((d, f, s, cin, cout))
    cases += [(4, 2, 1, 2, 3), (4, 3, 2, 1, 2), (4, 2, 2, 3, 2)]
    return cases


def _size(d, f, s, m):
    """An input size with (N - f) % s == 0 and m outputs per dim."""
    return f + s * (m - 1)


def _check_ground(layer, x, y, gs, dtype):
    """The output ground (which no inactive site shows when all are active) is the
    oracle's: the layer's map of the input ground, or 0 in zero-ground mode."""
    assert y.device == x.device       # a layer's output stays on its input's device
    specs, params = oracle_net([layer])
    _, _, g = ref.net_forward(*oracle_input(x), specs, params)
    assert_close(y.ground, g, dtype, "output ground")
    if not gs:
        np.testing.assert_array_equal(np_(y.ground), 0)


@MODES
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("d,f,s,cin,cout", _conv_cases())
def test_convolution(d, f, s, cin, cout, density, dtype, gs, rng, device):
    m = {1: 5, 2: 4, 3: 3, 4: 2}[d]
    spatial = (_size(d, f, s, m),) * d
    batch = 2
    x = random_sparse(rng, batch, spatial, cin, density, dtype, device=device)
    conv = scn.Convolution(cin, cout, f, s, dim=d, dtype=dtype).set_ground_state(gs)
    set_params(conv, rng, dtype)
    conv.to(device)
    y = conv(x)
    xd, in_mask = dense_of(x)
    W, b = np_(conv.weight.data), np_(conv.bias.data)
    if gs:
        expected = ref.conv_forward(xd, W, b, f, s)
    else:
        expected = ref.conv_zero_forward(xd, in_mask, W, b, f, s)
    assert_close(y.to_dense().numpy(), expected, dtype, "forward")
    _check_ground(conv, x, y, gs, dtype)
    # active output sites are exactly the windows that hold an active input
    win = ref.maxpool_forward(in_mask[:, None].astype(float), f, s)[:, 0] > 0
    _, out_mask = dense_of(y)
    np.testing.assert_array_equal(out_mask, win)
    G = backprop(y, rng)
    if gs:
        gx, gW, gb = ref.conv_backward(xd, W, b, f, s, G)
    else:
        gx, gW, gb = ref.conv_zero_backward(xd, in_mask, W, b, f, s, G)
    assert_close(conv.weight.grad, gW, dtype, "weight grad")
    assert_close(conv.bias.grad, gb, dtype, "bias grad")
    check_input_grads(x, gx, dtype)


@MODES
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("d,f,cin,cout", [(1, 1, 2, 3), (1, 3, 1, 2), (1, 5, 3, 2),
                                          (2, 3, 2, 4), (2, 5, 1, 1), (3, 3, 3, 2),
                                          (4, 3, 2, 2)])
def test_submanifold_convolution(d, f, cin, cout, density, dtype, gs, rng, device):
    spatial = {1: (9,), 2: (6, 5), 3: (4, 3, 4), 4: (3, 3, 2, 3)}[d]
    x = random_sparse(rng, 2, spatial, cin, density, dtype, device=device)
    conv = scn.SubmanifoldConvolution(cin, cout, f, dim=d, dtype=dtype).set_ground_state(gs)
    set_params(conv, rng, dtype)
    conv.to(device)
    y = conv(x)
    assert y.geometry is x.geometry
    xd, mask = dense_of(x)
    g = np_(x.ground)
    W, b = np_(conv.weight.data), np_(conv.bias.data)
    if gs:
        expected = ref.submanifold_forward(xd, mask, g, W, b, f)
    else:
        expected = ref.submanifold_zero_forward(xd, mask, W, b, f)
    assert_close(y.to_dense().numpy(), expected, dtype)
    _check_ground(conv, x, y, gs, dtype)
    G = backprop(y, rng)
    if gs:
        gx, g_ground, gW, gb = ref.submanifold_backward(xd, mask, g, W, b, f, G)
    else:
        (gx, gW, gb), g_ground = ref.submanifold_zero_backward(xd, mask, W, b, f, G), 0.0
    assert_close(conv.weight.grad, gW, dtype, "weight grad")
    assert_close(conv.bias.grad, gb, dtype, "bias grad")
    check_input_grads(x, gx, dtype, extra_ground=g_ground)


POOL_CASES = [(1, 2, 2), (1, 3, 1), (1, 3, 2), (2, 2, 2), (2, 3, 1), (2, 3, 3), (2, 2, 1),
              (3, 2, 2), (3, 3, 2)]


@MODES
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("d,f,s", POOL_CASES)
def test_pooling(d, f, s, kind, density, dtype, gs, rng, device):
    m = {1: 5, 2: 4, 3: 3}[d]
    spatial = (_size(d, f, s, m),) * d
    x = random_sparse(rng, 2, spatial, 3, density, dtype, device=device)
    layer = (scn.MaxPooling if kind == "max" else scn.AveragePooling)(f, s, dim=d)
    layer.set_ground_state(gs)
    y = layer(x)
    xd, mask = dense_of(x)
    if gs:
        fwd = ref.maxpool_forward if kind == "max" else ref.avgpool_forward
        bwd = ref.maxpool_backward if kind == "max" else ref.avgpool_backward
    else:
        zf = ref.maxpool_zero_forward if kind == "max" else ref.avgpool_zero_forward
        zb = ref.maxpool_zero_backward if kind == "max" else ref.avgpool_zero_backward
        fwd = lambda xd, f, s: zf(xd, mask, f, s)  # noqa: E731
        bwd = lambda xd, f, s, G: zb(xd, mask, f, s, G)  # noqa: E731
    assert_close(y.to_dense().numpy(), fwd(xd, f, s), dtype, "forward")
    _check_ground(layer, x, y, gs, dtype)
    G = backprop(y, rng)
    check_input_grads(x, bwd(xd, f, s, G), dtype)


@MODES
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("density", [0.0, "one", 0.2, 1.0])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_network_in_network(d, density, dtype, gs, rng, device):
    x = random_sparse(rng, 3, (4,) * d, 4, density, dtype, device=device)
    nin = scn.NetworkInNetwork(4, 6, dtype=dtype).set_ground_state(gs)
    set_params(nin, rng, dtype)
    nin.to(device)
    y = nin(x)
    xd, mask = dense_of(x)
    W, b = np_(nin.weight.data), np_(nin.bias.data)
    if gs:
        expected = ref.nin_forward(xd, W, b)
    else:
        expected = ref.nin_zero_forward(xd, mask, W, b)
    assert_close(y.to_dense().numpy(), expected, dtype)
    _check_ground(nin, x, y, gs, dtype)
    G = backprop(y, rng)
    if gs:
        gx, gW, gb = ref.nin_backward(xd, W, b, G)
    else:
        gx, gW, gb = ref.nin_zero_backward(xd, mask, W, b, G)
    assert_close(nin.weight.grad, gW, dtype)
    assert_close(nin.bias.grad, gb, dtype)
    check_input_grads(x, gx, dtype)


@MODES
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("slope", [0.0, 0.01, 1 / 3])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_activations(d, slope, dtype, gs, rng, device):
    """Activations have no mode: they map the ground like the features (in a zero-ground
    network the ground they get is 0, and stays 0)."""
    x = random_sparse(rng, 2, (5,) * d, 3, 0.3, dtype, device=device)
    layer = (scn.ReLU() if slope == 0 else scn.LeakyReLU(slope)).set_ground_state(gs)
    y = layer(x)
    _check_ground(layer, x, y, True, dtype)
    xd, _ = dense_of(x)
    if slope == 0:
        expected, back = ref.relu_forward(xd), (lambda G: ref.relu_backward(xd, G))
    else:
        expected = ref.leaky_relu_forward(xd, slope)
        back = lambda G: ref.leaky_relu_backward(xd, slope, G)  # noqa: E731
    assert_close(y.to_dense().numpy(), expected, dtype)
    G = backprop(y, rng)
    check_input_grads(x, back(G), dtype)


@MODES
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("d,density", [(1, 0.5), (2, "one"), (2, 0.1), (2, 1.0), (3, 0.2)])
def test_batchnorm(d, density, train, dtype, gs, rng, device):
    x = random_sparse(rng, 2, (5,) * d, 3, density, dtype, device=device)
    if x.n_active < 2 and train:
        x = random_sparse(rng, 2, (5,) * d, 3, 0.3, dtype, device=device)
    bn = scn.BatchNorm(3, dtype=dtype)
    bn.weight.data = rng.standard_normal(3).astype(dtype)
    bn.bias.data = rng.standard_normal(3).astype(dtype)
    bn.running_mean[:] = rng.standard_normal(3)
    bn.running_var[:] = rng.random(3) + 0.5
    rm0, rv0 = bn.running_mean.copy(), bn.running_var.copy()
    bn.train(train).set_ground_state(gs).to(device)
    specs, params = oracle_net([bn])
    y = bn(x)
    xd, mask = dense_of(x)
    kw = dict(train=train, running_mean=rm0, running_var=rv0)
    bn_fwd = ref.batchnorm_forward if gs else ref.batchnorm_zero_forward
    gamma, beta = np_(bn.weight.data), np_(bn.bias.data)
    out = bn_fwd(xd, mask, gamma, beta, bn.eps, **kw)
    expected = out[0] if train else out
    assert_close(y.to_dense().numpy(), expected, dtype, "forward")
    _, _, g = ref.net_forward(*oracle_input(x), specs, params)
    assert_close(y.ground, g, dtype, "output ground")
    if train:
        n = x.n_active
        mean, var = out[1], out[2]
        assert_close(bn.running_mean, 0.9 * rm0 + 0.1 * mean, dtype, "running mean")
        assert_close(bn.running_var, 0.9 * rv0 + 0.1 * var * n / (n - 1), dtype, "running var")
    G = backprop(y, rng)
    bn_bwd = ref.batchnorm_backward if gs else ref.batchnorm_zero_backward
    gx, gg, gb = bn_bwd(xd, mask, gamma, beta, bn.eps, G, **kw)
    assert_close(bn.weight.grad, gg, dtype)
    assert_close(bn.bias.grad, gb, dtype)
    check_input_grads(x, gx, dtype)


def test_dropout(rng):
    x = random_sparse(rng, 2, (8, 8), 4, 0.5, np.float64)
    drop = scn.Dropout(0.25, seed=3)
    y = drop(x)
    f, yf = np_(x.features), np_(y.features)
    kept = yf != 0
    np.testing.assert_allclose(yf[kept], f[kept] / 0.75)
    assert 0.6 < kept.mean() < 0.9
    np.testing.assert_array_equal(np_(y.ground), np_(x.ground))   # expected value kept
    G = rng.standard_normal(yf.shape)
    y.backward((G, np.zeros(4)))
    np.testing.assert_allclose(x.grad, np.where(kept, G / 0.75, 0))
    drop.eval()
    assert drop(x) is x
    # channel-wise: a (sample, channel) is dropped everywhere or nowhere
    y = scn.Dropout(0.5, channelwise=True, seed=0)(x)
    yf = np_(y.features)
    b = np_(x.coords)[:, 0]
    for s in range(2):
        zero = yf[b == s] == 0
        assert (zero.all(axis=0) | (~zero).all(axis=0)).all()
    # batch-wise: a channel is dropped for every site of every sample, or for none
    y = scn.Dropout(0.5, batchwise=True, seed=1)(x)
    zero = np_(y.features) == 0
    assert (zero.all(axis=0) | (~zero).all(axis=0)).all()
    assert zero.all(axis=0).any() and (~zero).all(axis=0).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_to_dense_from_dense_round_trip(dtype, rng):
    x = random_sparse(rng, 3, (4, 5), 2, 0.3, dtype, ground=False)
    d = x.to_dense()
    assert d.shape == (3, 2, 4, 5) and d.dtype == dtype
    back = scn.SparseTensor.from_dense(d.numpy())
    np.testing.assert_array_equal(back.numpy(), d.numpy())
    assert back.n_active == x.n_active
    # backward of to_dense: active sites get their entries, the ground the rest
    x = random_sparse(rng, 3, (4, 5), 2, 0.3, dtype)
    G = rng.standard_normal((3, 2, 4, 5)).astype(dtype)
    x.to_dense().backward(G)
    check_input_grads(x, G, dtype)


def test_ground_state_false_gives_modern_semantics(rng):
    """Inactive sites stay 0 and biases act at active sites only; active values unchanged."""
    x = random_sparse(rng, 2, (7, 7), 2, 0.1, np.float64, ground=False)
    net = scn.Sequential(scn.Convolution(2, 3, 3), scn.ReLU(), scn.MaxPooling(1, 1),
                         scn.NetworkInNetwork(3, 2), scn.BatchNorm(2))
    net.set_ground_state(False)
    for p in net.parameters():
        p.data = rng.standard_normal(p.shape)
    y = net(x)
    np.testing.assert_array_equal(np_(y.ground), 0)
    dense = y.to_dense().numpy()
    _, mask = dense_of(y)
    assert (dense.transpose(0, 2, 3, 1)[~mask] == 0).all()
    conv = scn.Convolution(2, 3, 3)
    conv.weight.data = rng.standard_normal(conv.weight.shape)
    conv.bias.data = rng.standard_normal(3)
    a = conv(x)
    conv.set_ground_state(False)
    b = conv(x)
    np.testing.assert_allclose(np_(b.features), np_(a.features))   # input ground is 0 here
    np.testing.assert_array_equal(np_(b.ground), 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_to_dense_in_both_modes(dtype, rng):
    """SparseToDense has no mode: it shows its input's ground; after a zero-ground layer
    that ground is 0."""
    x = random_sparse(rng, 2, (5, 4), 2, 0.3, dtype)
    xd, mask = dense_of(x)
    for gs in (True, False):
        np.testing.assert_array_equal(scn.SparseToDense().set_ground_state(gs)(x).numpy(), xd)
    nin = scn.NetworkInNetwork(2, 3, dtype=dtype)
    set_params(nin, rng, dtype)
    y = scn.Sequential(nin, scn.SparseToDense()).set_ground_state(False)(x).numpy()
    assert_close(y, ref.nin_zero_forward(xd, mask, nin.weight.data, nin.bias.data), dtype)
    assert (np.moveaxis(y, 1, -1)[~mask] == 0).all()


def _seq_cases():
    """Sequentials that reach the fused paths (convolution + max-pooling (pool == stride),
    + activation; max-pooling + activation) and every layer kind; grounds: 'ground', 'zero'
    or 'mixed' (alternating layer by layer)."""
    return {
        "conv-pool-relu": lambda dt: [
            scn.Convolution(2, 3, 3, dtype=dt), scn.MaxPooling(2), scn.ReLU(),
            scn.Convolution(3, 4, 2, 1, dtype=dt), scn.MaxPooling(2, 2),
            scn.LeakyReLU(1 / 3), scn.NetworkInNetwork(4, 2, dtype=dt)],
        "conv-pool-no-act": lambda dt: [
            scn.Convolution(2, 3, 2, 2, dtype=dt), scn.MaxPooling(2), scn.BatchNorm(3, dtype=dt),
            scn.MaxPooling(3, 1), scn.LeakyReLU(0.01), scn.SparseToDense()],
        "subm-avg-bn": lambda dt: [
            scn.SubmanifoldConvolution(2, 3, 3, dtype=dt), scn.LeakyReLU(0.1),
            scn.BatchNorm(3, dtype=dt), scn.AveragePooling(2, 1),
            scn.Convolution(3, 3, 3, 2, dtype=dt), scn.ReLU(), scn.MaxPooling(2, 2),
            scn.SubmanifoldConvolution(3, 2, 1, dtype=dt)],
    }


@pytest.mark.parametrize("grounds", ["ground", "zero", "mixed"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.4, 1.0])
@pytest.mark.parametrize("case", list(_seq_cases()))
def test_sequential_both_modes(case, density, dtype, grounds, rng, device):
    net = scn.Sequential(*_seq_cases()[case](dtype))
    for p in net.parameters():
        p.data = (rng.standard_normal(p.shape) * 0.6).astype(dtype)
    for i, m in enumerate(net):
        m.set_ground_state(grounds == "ground" or (grounds == "mixed" and i % 2 == 0))
        if isinstance(m, scn.BatchNorm):
            m.running_mean[:] = rng.standard_normal(m.channels)
            m.running_var[:] = rng.random(m.channels) + 0.5
            m.eval()
    net.to(device)
    n = net.input_size(2)
    x = random_sparse(rng, 2, (n, n), 2, density, dtype, device=device)
    check_net(net, x, rng)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 1000, 44000])
@pytest.mark.parametrize("c", [1, 3, 32, 600])
def test_colsum_blocked(n, c, rng):
    from sparsecnn.functional import colsum
    a = rng.standard_normal((n, c)).astype(np.float32)
    exact = a.astype(np.float64).sum(axis=0)
    got = colsum(a)
    assert got.shape == (c,) and got.dtype == np.float32
    # within the worst-case rounding bound of any summation order: (n - 1) eps sum|a|
    bound = max(n - 1, 1) * np.finfo(np.float32).eps * np.abs(a).astype(np.float64).sum(axis=0)
    assert (np.abs(got - exact) <= bound + 1e-30).all()
    np.testing.assert_array_equal(colsum(a), got)     # deterministic
    # non-contiguous input (a column slice) is summed like its contiguous copy
    wide = np.concatenate([a, a], axis=1)
    np.testing.assert_array_equal(colsum(wide[:, c:]), got)
