"""Heads: global max / average pooling (sparse -> dense (B, C)) against the dense oracle, in
both ground-state modes, on both devices; the dense-Tensor forms of ReLU, LeakyReLU, Dropout
and BatchNorm; heads as Sequentials, saved and loaded; cost linear in the active sites."""
import tracemalloc

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import backend
from tests import dense_reference as ref
from tests.sparse_helpers import assert_close, dense_of, np_, random_sparse, split_input_grad
from tests.test_dense_reference import assert_vjp, separated

DTYPES = [np.float32, np.float64]
DENSITIES = [0.0, "one", 0.3, 1.0]
SHAPES = {1: (7,), 2: (4, 5), 3: (3, 2, 4)}
POOLS = {"max": scn.GlobalMaxPooling, "avg": scn.GlobalAveragePooling}


def _oracle(kind, gs, xd, mask, u):
    """(forward (B, C), dense input gradient) of the dense global pool."""
    if gs:
        fwd = {"max": ref.global_maxpool_forward, "avg": ref.global_avgpool_forward}[kind]
        bwd = {"max": ref.global_maxpool_backward, "avg": ref.global_avgpool_backward}[kind]
        return fwd(xd), bwd(xd, u)
    fwd = {"max": ref.global_maxpool_zero_forward, "avg": ref.global_avgpool_zero_forward}[kind]
    bwd = {"max": ref.global_maxpool_zero_backward,
           "avg": ref.global_avgpool_zero_backward}[kind]
    return fwd(xd, mask), bwd(xd, mask, u)


# -- the oracle itself -------------------------------------------------------------------------
def test_oracle_global_pools_hand():
    x = np.array([[[1.0, 5.0, 5.0, 2.0]], [[-1.0, -3.0, -2.0, -4.0]]])   # (2, 1, 4)
    np.testing.assert_array_equal(ref.global_maxpool_forward(x), [[5.0], [-1.0]])
    np.testing.assert_array_equal(ref.global_avgpool_forward(x), [[3.25], [-2.5]])
    g = ref.global_maxpool_backward(x, np.array([[2.0], [3.0]]))
    np.testing.assert_array_equal(g, [[[0, 2.0, 0, 0]], [[3.0, 0, 0, 0]]])   # first maximum
    mask = np.array([[True, False, False, True], [False] * 4])
    np.testing.assert_array_equal(ref.global_maxpool_zero_forward(x, mask), [[2.0], [0.0]])
    np.testing.assert_array_equal(ref.global_avgpool_zero_forward(x, mask), [[1.5], [0.0]])
    g = ref.global_avgpool_zero_backward(x, mask, np.array([[2.0], [3.0]]))
    np.testing.assert_array_equal(g, [[[1.0, 0, 0, 1.0]], [[0, 0, 0, 0]]])
    g = ref.global_maxpool_zero_backward(x, mask, np.array([[2.0], [3.0]]))
    np.testing.assert_array_equal(g, [[[0, 0, 0, 2.0]], [[0, 0, 0, 0]]])


@pytest.mark.parametrize("sp", [(5,), (3, 4), (2, 3, 2)], ids=str)
def test_oracle_global_pool_vjp(sp):
    rng = np.random.default_rng(len(sp))
    x = separated(rng, (2, 3) + sp)
    mask = rng.random((2,) + sp) < 0.5
    mask[0, (0,) * len(sp)] = True
    mask[1] = False                                   # an empty sample
    assert_vjp(ref.global_maxpool_forward, [x], [0], ref.global_maxpool_backward, seed=1,
               h=1e-5)
    assert_vjp(ref.global_avgpool_forward, [x], [0], ref.global_avgpool_backward, seed=2)
    assert_vjp(lambda x: ref.global_maxpool_zero_forward(x, mask), [x], [0],
               lambda x, u: ref.global_maxpool_zero_backward(x, mask, u), seed=3, h=1e-5)
    assert_vjp(lambda x: ref.global_avgpool_zero_forward(x, mask), [x], [0],
               lambda x, u: ref.global_avgpool_zero_backward(x, mask, u), seed=4)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_oracle_batchnorm_bc_vjp(train):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 3)) * 2 + 1
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    kw = dict(train=train)
    if not train:
        kw.update(running_mean=rng.standard_normal(3), running_var=rng.random(3) + 0.5)

    def fwd(x, gamma, beta):
        out = ref.batchnorm_bc_forward(x, gamma, beta, 1e-3, **kw)
        return out[0] if train else out

    assert_vjp(fwd, [x, gamma, beta], [0, 1, 2],
               lambda x, g, b, u: ref.batchnorm_bc_backward(x, g, b, 1e-3, u, **kw), seed=6)
    if train:
        y, mean, var = ref.batchnorm_bc_forward(x, np.ones(3), np.zeros(3), 0.0, train=True)
        np.testing.assert_allclose(mean, x.mean(0))
        np.testing.assert_allclose(var, x.var(0))
        np.testing.assert_allclose(y, (x - x.mean(0)) / x.std(0))


# -- global pooling vs the dense oracle --------------------------------------------------------
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("gs", [True, False], ids=["ground", "zero"])
@pytest.mark.parametrize("density", DENSITIES, ids=str)
@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_global_pool_matches_dense(device, rng, kind, gs, density, d, dtype):
    x = random_sparse(rng, 3, SHAPES[d], 4, density, dtype, device=device)
    layer = POOLS[kind]().set_ground_state(gs)
    y = layer(x)
    assert isinstance(y, scn.Tensor) and y.shape == (3, 4) and y.dtype == dtype
    assert y.device == device
    xd, mask = dense_of(x)
    u = rng.standard_normal((3, 4)).astype(dtype)
    want, gdense = _oracle(kind, gs, xd, mask, u)
    assert_close(y.data, want, dtype, f"{kind} forward")
    if x.n_active == 0:
        return
    y.backward(backend.to_device(u, device))
    at_sites, inactive = split_input_grad(x, gdense)
    assert_close(x.grad, at_sites, dtype, "features grad")
    assert_close(x.ground_grad, inactive if gs else np.zeros(4), dtype, "ground grad")


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("gs", [True, False], ids=["ground", "zero"])
def test_global_pool_empty_tensor(device, kind, gs):
    """No site at all: the ground (ground-state mode) or 0; the gradient reaches the ground."""
    xp = backend.xp(device)
    g = xp.asarray(np.array([0.5, -2.0]))
    x = scn.SparseTensor(xp.zeros((0, 3), dtype=np.int32), xp.zeros((0, 2)), (4, 4),
                         batch_size=2, ground=g, requires_grad=True)
    y = POOLS[kind]().set_ground_state(gs)(x)
    np.testing.assert_array_equal(np_(y.data), [[0.5, -2.0]] * 2 if gs else np.zeros((2, 2)))
    y.backward(xp.ones((2, 2)))
    assert np_(x.grad).shape == (0, 2)
    np.testing.assert_allclose(np_(x.ground_grad), [2.0, 2.0] if gs else [0.0, 0.0])


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("gs", [True, False], ids=["ground", "zero"])
def test_global_pool_many_sites_per_sample(device, rng, kind, gs):
    """Samples with more sites than one reduction chunk (256), and an empty sample."""
    coords = np.argwhere(rng.random((3, 30, 30)) < np.array([0.6, 0.0, 0.9])[:, None, None])
    assert (coords[:, 0] == 0).sum() > 512
    coords = coords[rng.permutation(len(coords))].astype(np.int32)
    feats = rng.standard_normal((len(coords), 3))
    g = rng.standard_normal(3)
    x = scn.SparseTensor(*(backend.to_device(a, device) for a in (coords, feats)), (30, 30),
                         batch_size=3, ground=backend.to_device(g, device), requires_grad=True)
    y = POOLS[kind]().set_ground_state(gs)(x)
    xd, mask = dense_of(x)
    u = rng.standard_normal((3, 3))
    want, gdense = _oracle(kind, gs, xd, mask, u)
    assert_close(y.data, want, np.float64)
    y.backward(backend.to_device(u, device))
    at_sites, inactive = split_input_grad(x, gdense)
    assert_close(x.grad, at_sites, np.float64)
    assert_close(x.ground_grad, inactive if gs else np.zeros(3), np.float64)


def test_global_max_ties(device):
    """Tie rule (same on both devices): the ground wins a tie with an active value; among
    active sites the first in row-major site order wins, whatever the row order."""
    xp = backend.xp(device)
    # sample 0: sites (1, 1) and (0, 2) both hold 3.0 in channel 0 (rows in reverse site
    # order); channel 1: an active 0.5 ties the ground 0.5. Sample 1 is full (no ground).
    coords = [[0, 1, 1], [0, 0, 2]] + [[1, i, j] for i in range(2) for j in range(3)]
    feats = [[3.0, 0.5], [3.0, -1.0]] + [[7.0, 1.0]] * 6
    x = scn.SparseTensor(xp.asarray(np.array(coords, np.int32)), xp.asarray(np.array(feats)),
                         (2, 3), ground=xp.asarray(np.array([1.0, 0.5])), requires_grad=True)
    y = scn.global_max_pool(x)
    np.testing.assert_array_equal(np_(y.data), [[3.0, 0.5], [7.0, 1.0]])
    y.backward(xp.asarray(np.array([[1.0, 2.0], [3.0, 4.0]])))
    gf = np.zeros((8, 2))
    gf[1, 0] = 1.0      # (0, 2) comes before (1, 1) in row-major order
    gf[2, :] = [3.0, 4.0]   # sample 1: its first site (1, 0, 0) in both channels
    np.testing.assert_array_equal(np_(x.grad), gf)
    np.testing.assert_array_equal(np_(x.ground_grad), [0.0, 2.0])   # the ground won the tie


def test_global_pool_same_on_both_devices(rng, monkeypatch):
    """cpu and cuda agree (argmax identically), and the GPU result is the same bits when the
    simulation runs blocks and threads in reverse."""
    from tests.conftest import CUDA_MODE
    if CUDA_MODE is None:
        pytest.skip("no cuda device or simulation")
    if CUDA_MODE == "sim":
        monkeypatch.setenv("SPARSECNN_CUDA_SIM", "1")
    coords = np.argwhere(rng.random((2, 40, 40)) < 0.4).astype(np.int32)
    feats = rng.standard_normal((len(coords), 5)).astype(np.float32)
    u = rng.standard_normal((2, 5)).astype(np.float32)
    results = []
    for dev, rev in [("cpu", "0"), ("cuda", "0"), ("cuda", "1")]:
        monkeypatch.setenv("SPARSECNN_CUDA_SIM_REVERSE", rev)
        x = scn.SparseTensor(*(backend.to_device(a, dev) for a in (coords, feats)), (40, 40),
                             ground=backend.to_device(np.full(5, 0.25, np.float32), dev),
                             requires_grad=True)
        ys = [scn.global_max_pool(x), scn.global_average_pool(x)]
        (ys[0] + ys[1]).backward(backend.to_device(u, dev))
        results.append([np_(ys[0].data), np_(ys[1].data), np_(x.grad), np_(x.ground_grad)])
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1:], results[1][1:], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(results[1], results[2], strict=True):
        np.testing.assert_array_equal(a, b)


def test_global_pool_cost_is_linear_in_the_sites(device, rng):
    """1000 sites per sample on a 1000x1000 grid: no grid- or window-sized scratch."""
    n = 1000
    flat = rng.choice(10**6, size=4 * n, replace=False)
    coords = np.stack([np.repeat(np.arange(4), n), flat // 1000, flat % 1000], 1)
    feats = rng.standard_normal((4 * n, 8))
    args = [backend.to_device(a, device) for a in (coords.astype(np.int32), feats)]
    scn.global_max_pool(scn.SparseTensor(*args, (1000, 1000)))   # kernels loaded before
    tracemalloc.start()
    try:
        x = scn.SparseTensor(*args, (1000, 1000), requires_grad=True)
        y = scn.global_max_pool(x) + scn.global_average_pool(x)
        y.backward(backend.xp(device).ones((4, 8)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert np_(x.ground_grad).shape == (8,)


# -- dense-Tensor layers -------------------------------------------------------------------------
def _tensor(a, device, requires_grad=True):
    return scn.Tensor(backend.to_device(np.ascontiguousarray(a), device),
                      requires_grad=requires_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_dense_activations(device, rng, dtype):
    a = rng.standard_normal((5, 4)).astype(dtype)
    u = rng.standard_normal((5, 4)).astype(dtype)
    for layer, fwd, bwd in [
            (scn.ReLU(), ref.relu_forward, ref.relu_backward),
            (scn.LeakyReLU(1 / 3), lambda x: ref.leaky_relu_forward(x, 1 / 3),
             lambda x, g: ref.leaky_relu_backward(x, 1 / 3, g))]:
        x = _tensor(a, device)
        y = layer(x)
        assert isinstance(y, scn.Tensor) and y.dtype == dtype
        assert_close(y.data, fwd(a), dtype)
        y.backward(backend.to_device(u, device))
        assert_close(x.grad, bwd(a, u), dtype)


def test_dense_dropout(device, rng):
    a = rng.standard_normal((200, 50)) + 5.0
    x = _tensor(a, device)
    layer = scn.Dropout(0.25, seed=3)
    y = layer(x)
    v = np_(y.data)
    kept = v != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(v[kept], a[kept] / 0.75)
    y.backward(backend.xp(device).ones((200, 50)))
    np.testing.assert_allclose(np_(x.grad), kept / 0.75)
    assert layer.eval()(x) is x                                 # identity in eval mode
    b = np_(scn.Dropout(0.5, batchwise=True, seed=1)(x).data) != 0
    assert (b == b[:1]).all()                                   # one mask per channel
    c = np_(scn.Dropout(0.5, channelwise=True, seed=1)(_tensor(a[:, :, None].repeat(3, 2),
                                                               device)).data) != 0
    assert (c == c[:, :, :1]).all() and 0.3 < c.mean() < 0.7


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_dense_batch_norm(device, rng, dtype):
    a = (rng.standard_normal((6, 3)) * 2 + 1).astype(dtype)
    u = rng.standard_normal((6, 3)).astype(dtype)
    bn = scn.BatchNorm(3, eps=1e-3, momentum=0.2, dtype=dtype).to(device)
    bn.weight.data = backend.to_device(rng.standard_normal(3).astype(dtype), device)
    bn.bias.data = backend.to_device(rng.standard_normal(3).astype(dtype), device)
    gamma, beta = np_(bn.weight.data), np_(bn.bias.data)
    x = _tensor(a, device)
    y = bn(x)
    want, mean, var = ref.batchnorm_bc_forward(a, gamma, beta, 1e-3, train=True)
    assert_close(y.data, want, dtype)
    y.backward(backend.to_device(u, device))
    gx, gg, gb = ref.batchnorm_bc_backward(a, gamma, beta, 1e-3, u, train=True)
    assert_close(x.grad, gx, dtype)
    assert_close(bn.weight.grad, gg, dtype)
    assert_close(bn.bias.grad, gb, dtype)
    # running statistics: the sparse BatchNorm's rule (unbiased variance, momentum 0.2)
    assert_close(bn.running_mean, 0.2 * mean, dtype)
    assert_close(bn.running_var, 0.8 + 0.2 * var * 6 / 5, dtype)
    # ... the same as the sparse BatchNorm over one site per sample
    sbn = scn.BatchNorm(3, eps=1e-3, momentum=0.2, dtype=dtype).to(device)
    coords = backend.to_device(np.stack([np.arange(6), np.zeros(6, int)], 1).astype(np.int32),
                               device)
    sbn.weight.data, sbn.bias.data = bn.weight.data.copy(), bn.bias.data.copy()
    ys = sbn(scn.SparseTensor(coords, backend.to_device(a, device), (1,)))
    assert_close(ys.features, np_(y.data), dtype)
    assert_close(sbn.running_var, np_(bn.running_var), dtype)
    # eval: the running statistics
    bn.eval()
    x = _tensor(a, device)
    y = bn(x)
    rm, rv = np_(bn.running_mean), np_(bn.running_var)
    assert_close(y.data, ref.batchnorm_bc_forward(a, gamma, beta, 1e-3, train=False,
                                                  running_mean=rm, running_var=rv), dtype)
    y.backward(backend.to_device(u, device))
    gx, gg, gb = ref.batchnorm_bc_backward(a, gamma, beta, 1e-3, u, train=False,
                                           running_mean=rm, running_var=rv)
    assert_close(x.grad, gx, dtype)


def test_head_sequential_trains_and_round_trips(device, rng, tmp_path):
    """[FC -> BN -> ReLU -> Dropout] -> FC after a global pool, as one Sequential; saved and
    loaded with its modes."""
    net = scn.Sequential(
        scn.SubmanifoldConvolution(2, 6, 3, seed=1, dtype=np.float64),
        scn.GlobalMaxPooling(),
        scn.Linear(6, 8, seed=2, dtype=np.float64), scn.BatchNorm(8, dtype=np.float64),
        scn.ReLU(), scn.Dropout(0.3, seed=4), scn.Linear(8, 5, seed=3, dtype=np.float64),
    ).to(device)
    net[1].set_ground_state(False)
    x = random_sparse(rng, 4, (6, 6), 2, 0.3, device=device, requires_grad=False)
    loss = scn.cross_entropy(net(x), backend.to_device(np.arange(4), device))
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    path = tmp_path / "head.npz"
    scn.save(net, path)
    back = scn.load(path).to(device).eval()
    assert [type(m).__name__ for m in back] == [type(m).__name__ for m in net]
    assert not back[1].ground_state and back[2].ground_state
    np.testing.assert_array_equal(np_(back(x).data), np_(net(x).data))
    s = scn.Sequential(scn.GlobalAveragePooling())
    scn.save(s, tmp_path / "avg.npz")
    assert type(scn.load(tmp_path / "avg.npz")[0]) is scn.GlobalAveragePooling


# -- bad input -----------------------------------------------------------------------------------
def test_bad_input():
    t = scn.Tensor(np.zeros((2, 3)))
    with pytest.raises(TypeError, match="GlobalMaxPooling expects a SparseTensor"):
        scn.GlobalMaxPooling()(t)
    with pytest.raises(TypeError, match="GlobalAveragePooling expects a SparseTensor"):
        scn.global_average_pool(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="expects 4 input channels, but the input has 3"):
        scn.BatchNorm(4, dtype=np.float64)(t)
    with pytest.raises(ValueError, match=r"expects shape \(B, C\)"):
        scn.BatchNorm(3, dtype=np.float64)(scn.Tensor(np.zeros((2, 3, 4))))
    with pytest.raises(TypeError, match="input is float32 but weight is float64"):
        scn.BatchNorm(3, dtype=np.float64)(scn.Tensor(np.zeros((2, 3), np.float32)))
    with pytest.raises(ValueError, match="non-empty batch"):
        scn.BatchNorm(3, dtype=np.float64)(scn.Tensor(np.zeros((0, 3))))
    with pytest.raises(ValueError, match="any input size"):
        scn.GlobalMaxPooling().input_size(1)
    with pytest.raises(TypeError, match="ReLU expects a SparseTensor"):
        scn.ReLU()(np.zeros(3))
