"""DeepCNet / DeepCNiN end to end against the dense oracle; sizes; Sequential size rules."""
import numpy as np
import pytest

import sparsecnn as scn
from tests import dense_reference as ref
from tests.sparse_helpers import (
    assert_close,
    check_net,
    dense_of,
    np_,
    random_sparse,
    split_input_grad,
)

DEEP_NETS = [
    ("DeepCNet", 1, 3, "relu", 2), ("DeepCNet", 2, 4, "vleaky", 2), ("DeepCNet", 3, 2, 0.2, 2),
    ("DeepCNiN", 2, 3, "leaky", 2), ("DeepCNiN", 1, 2, "vleaky", 1), ("DeepCNet", 1, 2, "relu", 3),
]


@pytest.mark.parametrize("ground", [False, True], ids=["zero-input-ground", "input-ground"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("density", [0.0, "one", 0.03, 0.3])
@pytest.mark.parametrize("arch,l,k,activation,dim", DEEP_NETS)
def test_deep_net_zero_ground_mode(arch, l, k, activation, dim, density, dtype, ground, rng,
                                   device):
    """set_ground_state(False): the zero-ground network against the network oracle, logits
    and every gradient (an input ground, if any, is ignored: its gradient is 0)."""
    model = getattr(scn.models, arch)(l, k, in_channels=2, num_classes=5, activation=activation,
                                      dim=dim, dtype=dtype, seed=1).set_ground_state(False)
    assert all(not m.ground_state for m in model.modules())
    for p in model.parameters():  # non-zero biases everywhere
        p.data = (p.data + 0.1 * rng.standard_normal(p.shape)).astype(dtype)
    model.to(device)
    n = model.input_size
    x = random_sparse(rng, 3, (n,) * dim, 2, density, dtype, ground=ground, device=device)
    check_net(model, x, rng)
    np.testing.assert_array_equal(np_(x.ground_grad), 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("density", [0.0, "one", 0.03, 0.3])
@pytest.mark.parametrize("arch,l,k,activation,dim", DEEP_NETS)
def test_deep_net_matches_dense(arch, l, k, activation, dim, density, dtype, rng):
    model = getattr(scn.models, arch)(l, k, in_channels=2, num_classes=5, activation=activation,
                                      dim=dim, dtype=dtype, seed=1)
    for p in model.parameters():  # non-zero biases everywhere
        p.data = (p.data + 0.1 * rng.standard_normal(p.shape)).astype(dtype)
    n = model.input_size
    x = random_sparse(rng, 3, (n,) * dim, 2, density, dtype, ground=False)
    logits = model(x)
    xd, _ = dense_of(x)
    params = [p.data for p in model.parameters()]
    slope = scn.models.activation_slope(activation)
    fwd = ref.deepcnet_forward if arch == "DeepCNet" else ref.deepcnin_forward
    bwd = ref.deepcnet_backward if arch == "DeepCNet" else ref.deepcnin_backward
    assert_close(logits.numpy(), fwd(xd, params, l, slope), dtype, "logits")
    labels = rng.integers(0, 5, 3)
    loss = scn.cross_entropy(logits, labels)
    assert_close(loss.numpy(), ref.cross_entropy_forward(logits.numpy(), labels), dtype)
    loss.backward()
    G = ref.cross_entropy_backward(logits.numpy(), labels)
    gx, gparams = bwd(xd, params, l, slope, G)
    for i, (p, gp) in enumerate(zip(model.parameters(), gparams)):
        assert_close(p.grad, gp, dtype, f"param {i} {p.shape}")
    at_sites, inactive = split_input_grad(x, gx)
    assert_close(x.grad, at_sites, dtype, "input grad")
    assert_close(x.ground_grad, inactive, dtype, "input ground grad")


@pytest.mark.parametrize("l", [1, 2, 3, 4, 5, 6])
def test_input_size(l):
    for cls in (scn.models.DeepCNet, scn.models.DeepCNiN):
        m = cls(l, 2)
        assert m.input_size == 3 * 2**l
        assert m.features.input_size(1) == 3 * 2**l


def test_parameters_order_and_count():
    m = scn.models.DeepCNet(2, 4, num_classes=7)
    shapes = [p.shape for p in m.parameters()]
    assert shapes == [(9, 1, 4), (4,), (4, 4, 8), (8,), (4, 8, 12), (12,), (12, 7), (7,)]
    m = scn.models.DeepCNiN(1, 4, num_classes=3)
    shapes = [p.shape for p in m.parameters()]
    assert shapes == [(9, 1, 4), (4,), (4, 4), (4,), (4, 4, 8), (8,), (8, 8), (8,), (8, 3), (3,)]


def test_wrong_input_size_says_what_fits(rng):
    m = scn.models.DeepCNet(2, 2)
    x = random_sparse(rng, 1, (13, 13), 1, 0.1, np.float32, ground=False)
    with pytest.raises(ValueError, match=r"needs spatial_shape \(12, 12\)"):
        m(x)
    x = random_sparse(rng, 1, (11, 11), 1, 0.1, np.float32, ground=False)
    with pytest.raises(ValueError, match="an input size of 10 or 12 would fit"):
        scn.Sequential(scn.Convolution(1, 2, 2, 2))(x)


def test_dropout_layers_grow_with_depth():
    m = scn.models.DeepCNet(4, 2, dropout=0.4)
    rates = [layer.p for layer in m.features if isinstance(layer, scn.Dropout)]
    np.testing.assert_allclose(rates, [0.1, 0.2, 0.3, 0.4])
    m2 = scn.models.DeepCNet(4, 2, dropout=0.4, channel_dropout=True)
    assert all(d.batchwise for d in m2.modules() if isinstance(d, scn.Dropout))
    m.eval()
    assert all(not layer.training for layer in m.modules())


def test_same_seed_same_weights_and_leaky_gain():
    a = scn.models.DeepCNet(2, 3, seed=5)
    b = scn.models.DeepCNet(2, 3, seed=5)
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_array_equal(p.data, q.data)
    big = scn.models.DeepCNet(3, 64, seed=0)
    w = big.features[3].weight.data          # conv 2: fan_in = 4 * 64
    assert abs(w.std() - np.sqrt(2 / (4 * 64))) < 0.01
    leaky = scn.models.DeepCNet(3, 64, seed=0, activation="vleaky")
    w2 = leaky.features[3].weight.data
    np.testing.assert_allclose(w2.std() / w.std(), 1 / np.sqrt(1 + 1 / 9), rtol=1e-5)


def test_rulebooks_are_reused(rng):
    """A second forward over the same input geometry builds no new rulebook."""
    x = random_sparse(rng, 2, (24, 24), 1, 0.05, np.float32, ground=False, requires_grad=False)
    m = scn.models.DeepCNet(3, 4)
    m(x)
    geoms = []
    g = x.geometry
    while g._cache:
        geoms.append(g)
        g = next(v[1] for k, v in g._cache.items() if k[0] == "conv")
    before = [dict(gg._cache) for gg in geoms]
    m(x)
    for gg, b in zip(geoms, before):
        assert gg._cache.keys() == b.keys()
        assert all(gg._cache[k] is b[k] for k in b)


def test_from_spec_builds_the_layers_and_matches_dense(rng):
    net = scn.models.from_spec("C3-4 L P2 C2/2-6 R N-5 B S3-3 A1 D0.1", in_channels=2,
                               dtype=np.float64)
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Convolution", "LeakyReLU", "MaxPooling", "Convolution", "ReLU",
                     "NetworkInNetwork", "BatchNorm", "SubmanifoldConvolution",
                     "AveragePooling", "Dropout"]
    assert net[3].stride == 2 and net[1].negative_slope == pytest.approx(1 / 3)
    assert net[-3].in_channels == 5 and net[-3].out_channels == 3
    same = scn.models.from_spec("C3-32 R P2 C2-64 R P2 C2-96 R")
    assert same.input_size(1) == 12
    x = random_sparse(rng, 2, (12, 12), 1, 0.2, np.float32, ground=False)
    net2 = scn.models.from_spec("C3-3 R P2 C2-4 R")
    xd, _ = dense_of(x)
    ps = [p.data for p in net2.parameters()]
    expected = ref.sequential_forward(xd, [("conv", 3, 1), ("act", 0.0), ("maxpool", 2, 2),
                                           ("conv", 2, 1), ("act", 0.0)], ps)
    assert_close(net2(x).to_dense().numpy(), expected, np.float32)


@pytest.mark.parametrize("bad", ["", "C3", "X3-4", "P2-4", "S3/2-4", "C3-4 Q"])
def test_from_spec_errors(bad):
    with pytest.raises(ValueError, match="spec|token"):
        scn.models.from_spec(bad)
