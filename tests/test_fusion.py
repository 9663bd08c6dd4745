"""Max-pooling with its activation fused (F.max_pooling(..., negative_slope=a), and the
Sequential that uses it for MaxPooling followed by ReLU/LeakyReLU) against the two ops run
one after the other, and against the dense oracle: values, feature and ground gradients."""
import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import _cpu
from sparsecnn import functional as F
from sparsecnn._cpu import _conv, _pool
from tests import dense_reference as ref
from tests.sparse_helpers import assert_close, dense_of, random_sparse, split_input_grad, tol

CASES = [  # d, spatial, f, s, density
    (2, (8, 8), 2, 2, 0.3),
    (2, (9, 7), 3, 2, 0.4),      # overlapping windows
    (2, (8, 11), 2, 3, 0.5),     # s > f: some inputs in no window
    (1, (12,), 3, 3, 0.5),
    (3, (4, 6, 4), 2, 2, 0.3),
    (2, (6, 6), 2, 2, 1.0),      # every window full: the ground is no candidate
    (2, (6, 6), 2, 2, "one"),
]


def _unfused(x, f, s, a, ground_state):
    y = F.max_pooling(x, f, s, ground_state=ground_state)
    return F.relu(y) if a == 0 else F.leaky_relu(y, a)


def _grads(x, y, rng):
    gy = rng.standard_normal(y.features.shape).astype(y.dtype)
    gg = rng.standard_normal(y.channels).astype(y.dtype)
    x.grad = x.ground_grad = None
    y.backward((gy, gg))
    return (x.grad, x.ground_grad), (gy, gg)


@pytest.mark.parametrize("ground_state", [True, False], ids=["ground", "no-ground"])
@pytest.mark.parametrize("a", [0.0, 0.01, 1 / 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}-f{c[2]}s{c[3]}-{c[4]}")
def test_fused_equals_pool_then_activation(case, dtype, a, ground_state, rng):
    d, spatial, f, s, density = case
    x = random_sparse(rng, 2, spatial, 3, density, dtype)
    fused = F.max_pooling(x, f, s, ground_state=ground_state, negative_slope=a)
    plain = _unfused(x, f, s, a, ground_state)
    np.testing.assert_array_equal(fused.features, plain.features)
    np.testing.assert_array_equal(fused.ground, plain.ground)
    (gx1, gg1), seed = _grads(x, fused, np.random.default_rng(1))
    x.grad = x.ground_grad = None
    plain.backward(seed)
    gx2, gg2 = x.grad, x.ground_grad
    np.testing.assert_allclose(gx1, gx2, **tol(dtype))
    np.testing.assert_allclose(gg1, gg2, **tol(dtype))


@pytest.mark.parametrize("a", [0.0, 1 / 3])
@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"d{c[0]}-f{c[2]}s{c[3]}-{c[4]}")
def test_fused_against_dense_oracle(case, a, rng):
    d, spatial, f, s, density = case
    x = random_sparse(rng, 2, spatial, 4, density, np.float64)
    y = F.max_pooling(x, f, s, negative_slope=a)
    dense, _ = dense_of(x)
    m = ref.maxpool_forward(dense, f, s)
    expected = ref.leaky_relu_forward(m, a)
    got, _ = dense_of(y)
    np.testing.assert_allclose(got, expected, **tol(np.float64))
    gy_dense = np.random.default_rng(2).standard_normal(expected.shape)
    g_m = ref.leaky_relu_backward(m, a, gy_dense)
    g_in = ref.maxpool_backward(dense, f, s, g_m)
    # the same upstream gradient, split into active sites and the (summed) inactive ones
    gy, gg = split_input_grad(y, gy_dense)
    x.grad = x.ground_grad = None
    y.backward((gy, gg))
    at_sites, inactive = split_input_grad(x, g_in)
    assert_close(x.grad, at_sites, np.float64)
    assert_close(x.ground_grad, inactive, np.float64)


def test_sequential_fuses_pool_and_activation(rng):
    """Sequential(conv, pool, act, ...) runs the pair fused; layer by layer gives the same."""
    net = scn.Sequential(scn.Convolution(2, 5, 3, seed=0), scn.MaxPooling(2, 2),
                         scn.LeakyReLU(0.2), scn.Convolution(5, 4, 2, seed=1),
                         scn.MaxPooling(2, 2), scn.ReLU())
    x = random_sparse(rng, 2, (12, 12), 2, 0.2, np.float32)
    y = net(x)
    h = x
    for m in net:
        h = m(h)
    np.testing.assert_array_equal(y.features, h.features)
    np.testing.assert_array_equal(y.ground, h.ground)
    names = []
    node = y._node
    while node is not None:
        names.append(node.name)
        node = node.parents[0]._node
    assert "relu" not in names and "leaky_relu" not in names   # the activations were fused


def test_fused_slope_is_checked(rng):
    x = random_sparse(rng, 1, (4, 4), 1, 0.5)
    for bad in (-0.1, 1.0, "relu"):
        with pytest.raises(ValueError, match="negative_slope"):
            F.max_pooling(x, 2, 2, negative_slope=bad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_maxpool_backward_kernel_paths_agree(dtype, rng):
    """Partitioning windows (f == s): the write-once path with the window equals the
    zero-and-scatter path without it, the fused activation included."""
    x = random_sparse(rng, 3, (10, 10), 7, 0.3, dtype)
    rb, _ = x.geometry.conv(2, 2)
    for a in (None, 0.0, 0.25):
        y, arg = _pool.maxpool_forward(x.features, x.ground, rb.in_idx, rb.out_idx, rb.offsets,
                                      rb.n_out, negative_slope=a)
        gy = rng.standard_normal(y.shape).astype(dtype)
        kw = dict(negative_slope=a, output=y if a is not None else None)
        with_w = _pool.maxpool_backward(gy, arg, rb.in_idx, rb.out_idx, rb.offsets, rb.n_in,
                                       window=_cpu.window_of(rb), **kw)
        without = _pool.maxpool_backward(gy, arg, rb.in_idx, rb.out_idx, rb.offsets, rb.n_in,
                                        **kw)
        np.testing.assert_array_equal(with_w[0], without[0])
        np.testing.assert_allclose(with_w[1], without[1], **tol(dtype))


# --------------------------------------------------------------------------------------------
# convolution + max-pooling (+ activation) in one kernel

CONV_POOL_CASES = [  # d, spatial, conv f, conv s, pool size, cin, density
    (2, (13, 13), 2, 1, 2, 5, 0.25),
    (2, (16, 14), 3, 1, 2, 1, 0.3),      # few input channels: the im2col path
    (2, (17, 17), 3, 2, 2, 4, 0.4),      # strided convolution
    (1, (19,), 2, 1, 3, 6, 0.5),
    (3, (7, 5, 7), 2, 1, 2, 4, 0.3),
    (2, (9, 9), 2, 1, 2, 8, 1.0),        # fully active: full windows, the ground never wins
    (2, (9, 9), 2, 1, 2, 4, "one"),
]


def _conv_pool_unfused(x, conv, p, a, gs, pgs):
    y = F.convolution(x, conv.weight, conv.bias, conv.filter_size, conv.stride, ground_state=gs)
    return F.max_pooling(y, p, p, ground_state=pgs, negative_slope=a)


@pytest.mark.parametrize("gs,pgs", [(True, True), (False, True), (True, False)],
                         ids=["ground", "conv-no-ground", "pool-no-ground"])
@pytest.mark.parametrize("a", [None, 0.0, 0.2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONV_POOL_CASES,
                         ids=lambda c: f"d{c[0]}-f{c[2]}s{c[3]}-p{c[4]}-c{c[5]}-{c[6]}")
def test_conv_pool_fused_equals_unfused(case, dtype, a, gs, pgs, rng):
    """Values (bitwise: the same sums), ground, and every gradient (input features and
    ground, weight, bias) as convolution then max_pooling (then the activation)."""
    d, spatial, f, s, p, cin, density = case
    x = random_sparse(rng, 3, spatial, cin, density, dtype)
    conv = scn.Convolution(cin, 6, f, s, dim=d, dtype=dtype, seed=3)
    conv.bias.data[:] = rng.standard_normal(6)
    fused = F.convolution_max_pooling(x, conv.weight, conv.bias, f, s, p, ground_state=gs,
                                      pool_ground_state=pgs, negative_slope=a)
    plain = _conv_pool_unfused(x, conv, p, a, gs, pgs)
    np.testing.assert_array_equal(fused.coords, plain.coords)
    np.testing.assert_allclose(fused.features, plain.features, **tol(dtype))
    np.testing.assert_array_equal(fused.ground, plain.ground)
    grads = []
    for y in (fused, plain):
        x.grad = x.ground_grad = conv.weight.grad = conv.bias.grad = None
        y.backward(_grads_seed(y, np.random.default_rng(5)))
        grads.append((x.grad, x.ground_grad, conv.weight.grad, conv.bias.grad))
    for g1, g2 in zip(*grads, strict=True):
        np.testing.assert_allclose(g1, g2, **tol(dtype))


def _grads_seed(y, rng):
    return (rng.standard_normal(y.features.shape).astype(y.dtype),
            rng.standard_normal(y.channels).astype(y.dtype))


def test_conv_pool_kernel_matches_the_two_kernels(rng):
    """conv_maxpool_forward = maxpool_forward(conv_forward(...)): values and argmax."""
    for cin in (2, 7):
        x = random_sparse(rng, 4, (21, 21), cin, 0.2, np.float32)
        rb, mid = x.geometry.conv(2, 1)
        prb, _ = mid.conv(2, 2)
        w = rng.standard_normal((4, cin, 9)).astype(np.float32)
        b = rng.standard_normal(9).astype(np.float32)
        pg = rng.standard_normal(9).astype(np.float32)
        y = _conv.conv_forward(x.features, w, b, x.ground, rb.in_idx, rb.out_idx, rb.offsets,
                              rb.n_out, window=_cpu.window_of(rb))
        for a in (None, 0.1):
            want = _pool.maxpool_forward(y, pg, prb.in_idx, prb.out_idx, prb.offsets,
                                        prb.n_out, window=_cpu.window_of(prb), negative_slope=a)
            got = _conv.conv_maxpool_forward(x.features, w, b, x.ground, _cpu.window_of(rb),
                                            _cpu.window_of(prb), pg, negative_slope=a)
            np.testing.assert_allclose(got[0], want[0], **tol(np.float32))
            np.testing.assert_array_equal(got[1], want[1])


def test_sequential_fuses_conv_and_pool(rng):
    """Convolution + MaxPooling(p, p) + activation runs as one op; layer by layer gives the
    same values and gradients."""
    net = scn.Sequential(scn.Convolution(4, 6, 2, seed=0), scn.MaxPooling(2, 2),
                         scn.LeakyReLU(0.1), scn.Convolution(6, 3, 2, seed=1))
    x = random_sparse(rng, 2, (11, 11), 4, 0.3, np.float32)
    y = net(x)
    assert y._node.parents[0]._node.name == "convolution_max_pooling"
    h = x
    for m in net:
        h = m(h)
    np.testing.assert_allclose(y.features, h.features, **tol(np.float32))
    seed = _grads_seed(y, np.random.default_rng(0))
    res = []
    for out in (y, h):
        net.zero_grad()
        x.grad = x.ground_grad = None
        out.backward(seed)
        res.append([p.grad.copy() for p in net.parameters()] + [x.grad, x.ground_grad])
    for g1, g2 in zip(*res, strict=True):
        np.testing.assert_allclose(g1, g2, **tol(np.float32))


# -- fusion is an explicit, visible step ---------------------------------------------------------
def _fusable_net(dtype=np.float64):
    return scn.Sequential(scn.Convolution(1, 3, 3, dtype=dtype, seed=0), scn.MaxPooling(2),
                          scn.ReLU(), scn.Convolution(3, 4, 2, dtype=dtype, seed=1),
                          scn.MaxPooling(3, 1), scn.LeakyReLU(0.2), scn.SparseToDense())


def test_fusion_plan_repr_and_stats_show_the_fused_groups(rng):
    net = _fusable_net()
    assert net.fusion_plan() == [("conv+maxpool", 0, 3, 0.0), (None, 3, 4, None),
                                 ("maxpool+act", 4, 6, 0.2), (None, 6, 7, None)]
    text = repr(net)
    assert text.count("<- fused Convolution+MaxPooling+ReLU (0-2)") == 3
    assert text.count("<- fused MaxPooling+LeakyReLU (4-5)") == 2
    assert "(3): Convolution" in text and "(3): Convolution(in_channels=3, out_channels=4, " \
        "filter_size=2, stride=1, dim=2, bias=True)\n" in text
    n = net.input_size(3)
    x = random_sparse(rng, 2, (n, n), 1, 0.2, np.float64)
    names = [r.layer for r in scn.stats.layer_stats(net, x)]
    assert names[1:4] == ["Convolution 3/1 1->3 [fused 0-2]", "MaxPooling 2/2 [fused 0-2]",
                          "ReLU [fused 0-2]"]
    assert names[4] == "Convolution 2/1 3->4" and names[5].endswith("[fused 4-5]")
    net.set_fusion(False)
    assert all(kind is None for kind, *_ in net.fusion_plan())
    assert "fused" not in repr(net) and repr(net).startswith("Sequential(fuse=False,")


def test_fusion_can_be_turned_off_with_the_same_results(rng, monkeypatch):
    fused, plain = _fusable_net(), _fusable_net()
    n = fused.input_size(3)
    x = random_sparse(rng, 2, (n, n), 1, 0.3, np.float64)
    plain.set_fusion(False)
    G = rng.standard_normal((2, 4, 3, 3))
    outs = []
    for net in (fused, plain):
        x.grad = x.ground_grad = None
        y = net(x)
        y.backward(G)
        outs.append([y.numpy(), x.grad, x.ground_grad] + [p.grad for p in net.parameters()])
    for a, b in zip(*outs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # turned off, the fused kernels are not used at all
    def boom(*a, **k):
        raise AssertionError("fused kernel called")
    monkeypatch.setattr(F, "convolution_max_pooling", boom)
    plain(x)
    with pytest.raises(AssertionError, match="fused kernel called"):
        fused(x)


def test_fusion_setting_is_saved_and_the_plan_follows_the_layers(tmp_path):
    model = scn.models.DeepCNet(2, 4).set_fusion(False)
    scn.save(model, tmp_path / "m.npz")
    assert not scn.load(tmp_path / "m.npz").features.fuse
    seq = scn.Sequential(scn.Convolution(1, 2, 2), fuse=False)
    assert scn.io.build(seq.spec()).fuse is False
    seq = scn.Sequential(scn.Convolution(1, 2, 2))
    assert seq.fusion_plan() == [(None, 0, 1, None)]
    seq.append(scn.MaxPooling(2))
    assert seq.fusion_plan() == [("conv+maxpool", 0, 2, None)]
    with pytest.raises(TypeError, match=r"fuse must be True or False"):
        scn.Sequential(fuse=1)
    # MaxPooling.forward has no fusion-only argument any more
    import inspect
    assert list(inspect.signature(scn.MaxPooling.forward).parameters) == ["self", "x"]
