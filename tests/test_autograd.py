"""The autograd tape: accumulation, no_grad, shared parameters, Tensor ops, and a
vector-Jacobian dot-product check of a small sparse network (features, ground and weights)."""
import threading

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn.autograd import Parameter, is_grad_enabled, no_grad
from tests.sparse_helpers import np_, random_sites, random_sparse


def _set_params(model, rng, scale=0.5):
    for p in model.parameters():
        p.data = scale * rng.standard_normal(p.shape)


def small_net(rng):
    """2-D float64: submanifold conv -> leaky relu -> maxpool -> nin, on 8x8 inputs."""
    net = scn.Sequential(
        scn.Convolution(2, 3, 3, 1, dtype=np.float64),          # 8 -> 6
        scn.LeakyReLU(0.2),
        scn.MaxPooling(2, 2),                                    # 6 -> 3
        scn.NetworkInNetwork(3, 2, dtype=np.float64),
    )
    _set_params(net, rng)
    return net


# --------------------------------------------------------------------------------------------
# accumulation


def _loss(net, x, G):
    return (net(x).to_dense() * scn.Tensor(G)).sum()


def test_gradients_accumulate_over_two_backward_calls(rng, device):
    net = small_net(rng).to(device)
    x = random_sparse(rng, 2, (8, 8), 2, 0.3, requires_grad=True, device=device)
    G = scn.backend.to_device(rng.standard_normal((2, 2, 3, 3)), device)
    _loss(net, x, G).backward()
    first = [np_(p.grad).copy() for p in net.parameters()]
    gx, gg = np_(x.grad).copy(), np_(x.ground_grad).copy()
    assert all(np.abs(g).max() > 0 for g in first)
    # a second forward and backward adds the same again
    _loss(net, x, G).backward()
    for p, g in zip(net.parameters(), first, strict=True):
        np.testing.assert_allclose(np_(p.grad), 2 * g, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np_(x.grad), 2 * gx, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np_(x.ground_grad), 2 * gg, rtol=1e-12, atol=1e-14)
    # the same graph walked twice adds once more
    loss = _loss(net, x, G)
    loss.backward()
    loss.backward()
    for p, g in zip(net.parameters(), first, strict=True):
        np.testing.assert_allclose(np_(p.grad), 4 * g, rtol=1e-12, atol=1e-14)
    # zero_grad clears
    net.zero_grad()
    assert all(np_(p.grad) is None for p in net.parameters())
    _loss(net, x, G).backward()
    for p, g in zip(net.parameters(), first, strict=True):
        np.testing.assert_allclose(np_(p.grad), g, rtol=1e-12, atol=1e-14)


def test_backward_with_grad_scales_linearly(rng):
    net = small_net(rng)
    x = random_sparse(rng, 1, (8, 8), 2, 0.4, requires_grad=False)
    G = rng.standard_normal((1, 2, 3, 3))
    net(x).to_dense().backward(G)
    g1 = [p.grad.copy() for p in net.parameters()]
    net.zero_grad()
    net(x).to_dense().backward(3.0 * G)
    for p, g in zip(net.parameters(), g1, strict=True):
        np.testing.assert_allclose(p.grad, 3 * g, rtol=1e-12, atol=1e-14)
    assert x.grad is None and x.ground_grad is None     # input did not ask for gradients


# --------------------------------------------------------------------------------------------
# no_grad


def test_no_grad_records_nothing(rng):
    net = small_net(rng)
    x = random_sparse(rng, 1, (8, 8), 2, 0.3, requires_grad=True)
    with no_grad():
        assert not is_grad_enabled()
        y = net(x)
        d = y.to_dense()
    assert is_grad_enabled()
    assert not y.requires_grad and y._node is None
    assert not d.requires_grad and d._node is None
    with pytest.raises(RuntimeError, match=r"does not require grad"):
        d.backward(np.ones(d.shape))
    assert all(p.grad is None for p in net.parameters())
    # same values as with the graph
    np.testing.assert_array_equal(d.numpy(), net(x).to_dense().numpy())


def test_no_grad_as_decorator():
    seen = []

    @no_grad()
    def f(a, b=1):
        """Docstring kept."""
        seen.append(is_grad_enabled())
        return a + b

    assert f(2, b=3) == 5
    assert seen == [False]
    assert is_grad_enabled()
    assert f.__name__ == "f" and f.__doc__ == "Docstring kept."
    t = scn.Tensor(np.ones(3), requires_grad=True)
    out = no_grad()(lambda v: v * 2.0)(t)
    assert not out.requires_grad


def test_no_grad_nested_and_exceptions_restore_state():
    assert is_grad_enabled()
    with no_grad():
        with no_grad():
            assert not is_grad_enabled()
        assert not is_grad_enabled()        # the inner exit restores "disabled"
    assert is_grad_enabled()
    with pytest.raises(KeyError):
        with no_grad():
            raise KeyError("x")
    assert is_grad_enabled()

    @no_grad()
    def boom():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        boom()
    assert is_grad_enabled()


def test_no_grad_is_per_thread():
    other = []
    with no_grad():
        t = threading.Thread(target=lambda: other.append(is_grad_enabled()))
        t.start()
        t.join()
        assert not is_grad_enabled()
    assert other == [True]


# --------------------------------------------------------------------------------------------
# shared parameters


def test_sequential_applied_twice_sums_both_gradients(rng, device):
    """net(net(x)) with one set of weights == two copies with the same weights, summed."""
    def make():
        net = scn.Sequential(scn.SubmanifoldConvolution(2, 2, 3, dtype=np.float64),
                             scn.LeakyReLU(1 / 3), scn.NetworkInNetwork(2, 2, dtype=np.float64))
        return net

    shared = make()
    _set_params(shared, rng)
    a, b = make(), make()
    a.load_state_dict(shared.state_dict())
    b.load_state_dict(shared.state_dict())
    for m in (shared, a, b):
        m.to(device)
    x = random_sparse(rng, 2, (6, 6), 2, 0.4, requires_grad=True, device=device)
    G = rng.standard_normal((2, 2, 6, 6))
    ys = shared(shared(x)).to_dense()
    ys.backward(scn.backend.to_device(G, device))
    gx_shared, gg_shared = np_(x.grad).copy(), np_(x.ground_grad).copy()
    x.grad = x.ground_grad = None
    yab = b(a(x)).to_dense()
    np.testing.assert_allclose(ys.numpy(), yab.numpy(), rtol=1e-12, atol=1e-13)
    yab.backward(scn.backend.to_device(G, device))
    for ps, pa, pb in zip(shared.parameters(), a.parameters(), b.parameters(), strict=True):
        assert np.abs(np_(pa.grad)).max() > 0 and np.abs(np_(pb.grad)).max() > 0
        np.testing.assert_allclose(np_(ps.grad), np_(pa.grad) + np_(pb.grad), rtol=1e-10,
                                   atol=1e-12)
    np.testing.assert_allclose(gx_shared, np_(x.grad), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gg_shared, np_(x.ground_grad), rtol=1e-10, atol=1e-12)


def test_layer_twice_in_one_sequential(rng):
    nin = scn.NetworkInNetwork(3, 3, dtype=np.float64)
    _set_params(nin, rng)
    net = scn.Sequential(nin, scn.ReLU(), nin)
    x = random_sparse(rng, 1, (5, 5), 3, 0.5, requires_grad=False)
    G = rng.standard_normal((1, 3, 5, 5))
    net(x).to_dense().backward(G)
    # by hand: y = relu(x W + b) W + b, on the active features and the ground alike
    W, b = nin.weight.data, nin.bias.data
    h = np.maximum(x.features @ W + b, 0)
    hg = np.maximum(x.ground @ W + b, 0)
    gl = np.moveaxis(G, 1, -1)
    c = x.coords
    gy = gl[c[:, 0], c[:, 1], c[:, 2]]
    mask = np.ones(gl.shape[:-1], bool)
    mask[c[:, 0], c[:, 1], c[:, 2]] = False
    gyg = gl[mask].sum(axis=0)
    gh = (gy @ W.T) * (h > 0)
    ghg = (gyg @ W.T) * (hg > 0)
    gW = h.T @ gy + np.outer(hg, gyg) + x.features.T @ gh + np.outer(x.ground, ghg)
    gb = gy.sum(0) + gyg + gh.sum(0) + ghg
    np.testing.assert_allclose(nin.weight.grad, gW, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(nin.bias.grad, gb, rtol=1e-10, atol=1e-12)


def test_shared_layer_parameters_listed_once():
    nin = scn.NetworkInNetwork(3, 3)
    net = scn.Sequential(nin, scn.ReLU(), nin)
    assert [id(p) for p in net.parameters()] == [id(nin.weight), id(nin.bias)]
    scn.optim.SGD(net.parameters(), lr=0.1)


# --------------------------------------------------------------------------------------------
# Tensor ops


def test_tensor_op_gradients(rng):
    a0, b0, c0 = (rng.standard_normal((3, 4)) for _ in range(3))
    a, b, c = (scn.Tensor(v, requires_grad=True) for v in (a0, b0, c0))
    # loss = mean(reshape((a * b + a) * 2 - c + 1.5, 2, 6)) * 4 + sum(-(0.5 * b))
    z = ((a * b + a) * 2.0 - c + 1.5).reshape(2, 6)
    loss = z.mean() * 4.0 + (-(0.5 * b)).sum()
    expected = ((a0 * b0 + a0) * 2 - c0 + 1.5).mean() * 4 - 0.5 * b0.sum()
    assert loss.shape == () and np.isclose(loss.item(), expected, rtol=1e-12)
    loss.backward()
    n = a0.size
    np.testing.assert_allclose(a.grad, (b0 + 1) * 2 * 4 / n, rtol=1e-12)
    np.testing.assert_allclose(b.grad, a0 * 2 * 4 / n - 0.5, rtol=1e-12)
    np.testing.assert_allclose(c.grad, np.full((3, 4), -4 / n), rtol=1e-12)


def test_tensor_reshape_and_sum_gradients(rng):
    a0 = rng.standard_normal((2, 3, 4))
    a = scn.Tensor(a0, requires_grad=True)
    w0 = rng.standard_normal((6, 4))
    r = a.reshape((6, 4))
    assert r.shape == (6, 4)
    (r * scn.Tensor(w0)).sum().backward()
    np.testing.assert_allclose(a.grad, w0.reshape(2, 3, 4), rtol=1e-12)
    assert a.grad.shape == a.shape


def test_tensor_diamond_graph(rng):
    """a feeds several paths: y = a*a + a*3 + (a*a)*a -> dy/da = 2a + 3 + 3a^2."""
    a0 = rng.standard_normal(5)
    a = scn.Tensor(a0, requires_grad=True)
    sq = a * a
    y = (sq + a * 3.0 + sq * a).sum()
    y.backward()
    np.testing.assert_allclose(a.grad, 2 * a0 + 3 + 3 * a0**2, rtol=1e-12)


def test_tensor_leaf_and_dtype(rng):
    for dtype in (np.float32, np.float64):
        t = scn.Tensor(rng.standard_normal(4).astype(dtype), requires_grad=True)
        (t * 2.0 + 1.0).sum().backward()
        assert t.grad.dtype == dtype
        np.testing.assert_array_equal(t.grad, np.full(4, 2, dtype))
    s = scn.Tensor(np.array(3.0), requires_grad=True)
    s.backward()
    assert s.grad == 1.0


def test_mixed_requires_grad(rng):
    a = scn.Tensor(rng.standard_normal(3), requires_grad=True)
    b = scn.Tensor(rng.standard_normal(3))
    (a * b).sum().backward()
    np.testing.assert_allclose(a.grad, b.data)
    assert b.grad is None
    assert not (b * 2.0).requires_grad


def test_broadcast_gradient_has_operand_shape(rng):
    a = scn.Tensor(rng.standard_normal(3), requires_grad=True)
    b = scn.Tensor(rng.standard_normal((2, 3)), requires_grad=True)
    try:
        y = (a + b) * b
    except ValueError:
        return                       # refusing to broadcast is fine too
    y.sum().backward()
    assert a.grad.shape == (3,)
    np.testing.assert_allclose(a.grad, b.data.sum(axis=0))


def test_backward_on_something_without_grad():
    with pytest.raises(RuntimeError, match=r"does not require grad"):
        scn.Tensor(np.array(1.0)).backward()
    with pytest.raises(RuntimeError, match=r"does not require grad"):
        (scn.Tensor(np.ones(3)) * 2.0).sum().backward()
    x = random_sparse(np.random.default_rng(0), 1, (4, 4), 1, 0.5, requires_grad=False)
    with pytest.raises(RuntimeError, match=r"does not require grad"):
        scn.ReLU()(x).backward(np.ones((x.n_active, 1)))
    with pytest.raises(RuntimeError, match=r"not meaningful"):
        Parameter(np.ones(2)).backward(np.ones(2))


def test_parameter_rejects_non_float():
    with pytest.raises(TypeError, match=r"Parameter data must be a float32 or float64 array"):
        Parameter(np.arange(3))
    with pytest.raises(TypeError, match=r"Parameter data must be a float32 or float64 array, "
                                        r"got list"):
        Parameter([1.0, 2.0])


def test_detach_cuts_the_graph(rng):
    net = small_net(rng)
    x = random_sparse(rng, 1, (8, 8), 2, 0.3, requires_grad=True)
    y = net(x)
    assert y.requires_grad
    yd = y.detach()
    assert not yd.requires_grad and yd.geometry is y.geometry
    with pytest.raises(RuntimeError):
        yd.to_dense().sum().backward()
    d = y.to_dense().detach()
    assert not d.requires_grad


# --------------------------------------------------------------------------------------------
# VJP dot-product check through a sparse network


def _vjp_net(kind, rng):
    """(net, [(parameter, name) to check])."""
    if kind == "conv-leaky-maxpool-nin":
        conv = scn.Convolution(2, 3, 3, 1, dtype=np.float64)
        nin = scn.NetworkInNetwork(3, 2, dtype=np.float64)
        net = scn.Sequential(conv, scn.LeakyReLU(0.3), scn.MaxPooling(2, 2), nin,
                             scn.SparseToDense())
        checked = [(conv.weight, "conv weight"), (conv.bias, "conv bias"),
                   (nin.weight, "nin weight")]
    else:   # submanifold -> batchnorm (training) -> relu -> average pooling -> strided conv
        sub = scn.SubmanifoldConvolution(2, 3, 3, dtype=np.float64)
        bn = scn.BatchNorm(3, dtype=np.float64)
        conv = scn.Convolution(3, 2, 2, 2, dtype=np.float64)
        net = scn.Sequential(sub, bn, scn.ReLU(), scn.AveragePooling(3, 1), conv,
                             scn.SparseToDense())
        checked = [(sub.weight, "submanifold weight"), (bn.weight, "bn gamma"),
                   (bn.bias, "bn beta"), (conv.weight, "conv weight")]
    _set_params(net, rng)
    return net, checked


@pytest.mark.parametrize("kind", ["conv-leaky-maxpool-nin", "sub-bn-relu-avgpool-conv"])
@pytest.mark.parametrize("density", [0.15, 0.5, "one", 1.0])
def test_vjp_dot_product(kind, density, rng):
    """<J v, u> (central differences) == <v, J^T u> (backward), for v along the input
    features, the input ground, and weights and biases."""
    net, checked = _vjp_net(kind, rng)
    spatial, B, C = (8, 8), 2, 2
    coords = random_sites(rng, B, spatial, density)
    X0 = rng.standard_normal((len(coords), C))
    g0 = rng.standard_normal(C)

    def run(X, g, requires_grad=False):
        x = scn.SparseTensor(coords, X, spatial, batch_size=B, ground=g,
                             requires_grad=requires_grad)
        return x, net(x)

    x, y = run(X0, g0, requires_grad=True)
    u = rng.standard_normal(y.shape)
    y.backward(u)
    assert x.grad.shape == X0.shape and x.ground_grad.shape == (C,)
    h = 1e-6

    def check(perturb, analytic, name):
        lo, hi = perturb(-h), perturb(h)
        jv = np.sum((hi - lo) * u) / (2 * h)
        np.testing.assert_allclose(jv, analytic, rtol=1e-6, atol=1e-8, err_msg=name)

    vX = rng.standard_normal(X0.shape)
    check(lambda e: run(X0 + e * vX, g0)[1].numpy(), np.sum(vX * x.grad), "features")
    vg = rng.standard_normal(C)
    check(lambda e: run(X0, g0 + e * vg)[1].numpy(), np.sum(vg * x.ground_grad), "ground")
    if density != 1.0 or kind.startswith("sub"):
        # inactive sites (or, for a submanifold window, positions outside the grid) hold
        # the ground: it matters
        assert abs(np.sum(vg * x.ground_grad)) > 1e-6
    else:                      # a valid convolution over a full grid never sees it
        np.testing.assert_allclose(x.ground_grad, 0, atol=1e-12)

    for p, name in checked:
        v = rng.standard_normal(p.shape)
        analytic = np.sum(v * p.grad)
        base = p.data.copy()

        def perturbed(e, p=p, v=v, base=base):
            p.data = base + e * v
            try:
                with no_grad():
                    return run(X0, g0)[1].numpy()
            finally:
                p.data = base

        check(perturbed, analytic, name)


@pytest.mark.parametrize("activation", ["relu", "vleaky"])
def test_graph_has_no_reference_cycles(activation):
    """The graph is freed by reference counting as soon as it is dropped: the cyclic garbage
    collector finds nothing (cycles would hold every layer's feature arrays in memory)."""
    import gc
    rng = np.random.default_rng(0)
    x = random_sparse(rng, 2, (12, 12), 1, 0.2, np.float32, ground=False)
    model = scn.models.DeepCNiN(2, 4, activation=activation, dropout=0.2)
    model(x)  # warm caches (rulebooks) outside the measured step
    gc.collect()
    gc.disable()
    try:
        loss = scn.cross_entropy(model(x), np.array([0, 1]))
        loss.backward()
        del loss
        assert gc.collect() == 0
    finally:
        gc.enable()
