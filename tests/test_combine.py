"""Combining tensors (``scn.add``, ``scn.concat``, ``scn.Residual``, ``scn.Concat``) against
the dense oracle: the union of the active sets (and its order), the values at every site
(each tensor's ground where it is inactive), the grounds, every gradient (features, grounds,
parameters), both ground-state modes, on both devices; the geometry reuse; bad input; and
saving nested modules."""
import itertools

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import backend
from tests import dense_reference as ref
from tests.conftest import DEVICES
from tests.sparse_helpers import (
    assert_close,
    backprop,
    dense_of,
    np_,
    oracle_input,
    oracle_net,
    random_sites,
    split_input_grad,
)
from tests.test_dense_reference import assert_vjp

MODES = pytest.mark.parametrize("gs", [True, False], ids=["ground", "zero"])
DTYPES = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])


def _tensor(rng, coords, channels, spatial, batch, dtype, device, ground=True):
    """A leaf SparseTensor with these coords and random features (and ground)."""
    feats = rng.standard_normal((len(coords), channels)).astype(dtype)
    g = rng.standard_normal(channels).astype(dtype) if ground else None
    coords = np.asarray(coords, dtype=np.int32).reshape(-1, 1 + len(spatial))
    if device != "cpu":
        coords, feats = (backend.to_device(a, device) for a in (coords, feats))
        g = None if g is None else backend.to_device(g, device)
    return scn.SparseTensor(coords, feats, spatial, batch_size=batch, ground=g,
                            requires_grad=True)


def _partner(rng, a, relation, density, channels, dtype, device):
    """A second tensor on a's grid: its own sites ("indep"), a's geometry ("shared"), a
    shuffled subset of a's sites ("subset"), or a's sites plus others ("superset")."""
    spatial, batch = a.spatial_shape, a.batch_size
    ca = np_(a.coords)
    if relation == "shared":
        f = rng.standard_normal((a.n_active, channels)).astype(dtype)
        g = rng.standard_normal(channels).astype(dtype)
        b = a.replace(backend.to_device(f, device), backend.to_device(g, device))
        b.requires_grad = True
        return b
    if relation == "subset":
        coords = ca[rng.permutation(len(ca))[:len(ca) // 2]]
    elif relation == "superset":
        extra = random_sites(rng, batch, spatial, density)
        have = {tuple(r) for r in ca}
        coords = np.concatenate([ca, [r for r in extra if tuple(r) not in have]])
        coords = coords.reshape(-1, ca.shape[1])[rng.permutation(len(coords))]
    else:
        coords = random_sites(rng, batch, spatial, density)
    return _tensor(rng, coords, channels, spatial, batch, dtype, device)


def _union_order(*tensors):
    """The documented order: the first tensor's sites, then each later one's new sites."""
    seen, out = set(), []
    for t in tensors:
        for r in np_(t.coords).tolist():
            if tuple(r) not in seen:
                seen.add(tuple(r))
                out.append(r)
    return np.asarray(out, dtype=np.int32).reshape(-1, tensors[0].coords.shape[1])


def _check_grads(x, dense_grad, gs, dtype, what):
    """x.grad and x.ground_grad from the dense gradient of x (ground: the sum over x's
    inactive sites; 0 in the zero-ground mode)."""
    at_sites, inactive = split_input_grad(x, dense_grad)
    assert_close(x.grad, at_sites, dtype, f"{what}: grad at active sites")
    assert_close(x.ground_grad, inactive if gs else 0 * inactive, dtype, f"{what}: ground grad")


# -- the oracle itself ------------------------------------------------------------------------
def test_oracle_tiny_cases():
    a = np.array([[[1.0, 2.0, 3.0]]])
    b = np.array([[[10.0, 20.0, 30.0]]])
    ma, mb = np.array([[True, False, False]]), np.array([[False, False, True]])
    np.testing.assert_array_equal(ref.add_forward(a, b), [[[11.0, 22.0, 33.0]]])
    np.testing.assert_array_equal(ref.add_zero_forward(a, ma, b, mb), [[[1.0, 0.0, 30.0]]])
    np.testing.assert_array_equal(ref.union_mask(ma, mb), [[True, False, True]])
    np.testing.assert_array_equal(ref.concat_forward([a, b])[0], [[1, 2, 3], [10, 20, 30]])
    np.testing.assert_array_equal(ref.concat_zero_forward([a, b], [ma, mb])[0],
                                  [[1, 0, 0], [0, 0, 30]])
    g = np.array([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])
    ga, gb = ref.concat_zero_backward([a, b], [ma, mb], g)
    np.testing.assert_array_equal(ga, [[[1.0, 0.0, 0.0]]])
    np.testing.assert_array_equal(gb, [[[0.0, 0.0, 6.0]]])
    with pytest.raises(ValueError, match="different grids"):
        ref.concat_forward([a, np.ones((1, 1, 4))])


@pytest.mark.parametrize("d", [1, 2, 3])
def test_oracle_vjp(d):
    rng = np.random.default_rng(d)
    sp = (3,) * d
    a, b, c = (rng.standard_normal((2, ch, *sp)) for ch in (2, 2, 3))
    ma, mb, mc = (rng.random((2, *sp)) < 0.5 for _ in range(3))
    assert_vjp(ref.add_forward, [a, b], (0, 1), ref.add_backward, seed=d)
    assert_vjp(lambda x, y: ref.concat_forward([x, y]), [a, c], (0, 1),
               lambda x, y, u: ref.concat_backward([x, y], u), seed=d)
    assert_vjp(lambda x, y: ref.add_zero_forward(x, ma, y, mb), [a, b], (0, 1),
               lambda x, y, u: ref.add_zero_backward(x, ma, y, mb, u), seed=d)
    assert_vjp(lambda x, y, z: ref.concat_zero_forward([x, y, z], [ma, mb, mc]), [a, b, c],
               (0, 1, 2), lambda x, y, z, u: ref.concat_zero_backward([x, y, z], [ma, mb, mc],
                                                                      u), seed=d)


# -- hand-checked ---------------------------------------------------------------------------
def test_add_tiny_by_hand(device, rng):
    # a: sites 1, 3 (ground 10); b: sites 3, 0 (ground 100); grid of 5 in 1-D
    a = _tensor(rng, [[0, 1], [0, 3]], 1, (5,), 1, np.float64, device)
    b = _tensor(rng, [[0, 3], [0, 0]], 1, (5,), 1, np.float64, device)
    for t, f, g in ((a, [[1.0], [2.0]], [10.0]), (b, [[5.0], [7.0]], [100.0])):
        t.features = backend.to_device(np.array(f), device)
        t.ground = backend.to_device(np.array(g), device)
    y = scn.add(a, b)
    np.testing.assert_array_equal(np_(y.coords), [[0, 1], [0, 3], [0, 0]])
    np.testing.assert_array_equal(np_(y.features), [[101.0], [7.0], [17.0]])
    np.testing.assert_array_equal(np_(y.ground), [110.0])
    yd = y.to_dense()
    np.testing.assert_array_equal(yd.numpy(), [[[17.0, 101.0, 110.0, 7.0, 110.0]]])
    yd.backward(np.arange(5.0).reshape(1, 1, 5))
    np.testing.assert_array_equal(np_(a.grad), [[1.0], [3.0]])
    np.testing.assert_array_equal(np_(a.ground_grad), [0.0 + 2.0 + 4.0])
    np.testing.assert_array_equal(np_(b.grad), [[3.0], [0.0]])
    np.testing.assert_array_equal(np_(b.ground_grad), [1.0 + 2.0 + 4.0])
    c = scn.concat([a, b])
    np.testing.assert_array_equal(np_(c.features), [[1, 100], [2, 5], [10, 7]])
    np.testing.assert_array_equal(np_(c.ground), [10.0, 100.0])
    z = scn.concat([a, b], ground_state=False)
    np.testing.assert_array_equal(np_(z.features), [[1, 0], [2, 5], [0, 7]])
    np.testing.assert_array_equal(np_(z.ground), [0.0, 0.0])


# -- random cases against the oracle --------------------------------------------------------
_CASES = [(d, da, rel, db) for d, (da, rel, db) in itertools.product(
    [1, 2, 3], [(0.0, "indep", 0.3), ("one", "indep", "one"), (0.3, "indep", 1.0),
                (0.4, "shared", None), (0.5, "subset", None), (0.2, "superset", 0.3),
                (0.0, "shared", None), (1.0, "indep", 0.0)])]


@pytest.mark.parametrize("d,da,rel,db", _CASES)
@DTYPES
@MODES
def test_add_matches_dense(device, rng, d, da, rel, db, dtype, gs):
    spatial = (5, 4, 3)[:d]
    a = _tensor(rng, random_sites(rng, 2, spatial, da), 3, spatial, 2, dtype, device)
    b = _partner(rng, a, rel, db, 3, dtype, device)
    (xa, ma), (xb, mb) = dense_of(a), dense_of(b)
    y = scn.add(a, b, ground_state=gs)
    assert y.device == device and y.dtype == dtype
    np.testing.assert_array_equal(np_(y.coords), _union_order(a, b), err_msg="site order")
    np.testing.assert_array_equal(dense_of(y)[1], ref.union_mask(ma, mb), err_msg="sites")
    if rel in ("shared", "subset"):
        assert y.geometry is a.geometry
    expected = ref.add_forward(xa, xb) if gs else ref.add_zero_forward(xa, ma, xb, mb)
    assert_close(y.ground, np_(a.ground) + np_(b.ground) if gs else np.zeros(3), dtype,
                 "ground")
    assert_close(y.to_dense().numpy(), expected, dtype, "forward")
    G = backprop(y, rng)
    ga, gb = ref.add_backward(xa, xb, G) if gs else ref.add_zero_backward(xa, ma, xb, mb, G)
    _check_grads(a, ga, gs, dtype, "a")
    _check_grads(b, gb, gs, dtype, "b")


@pytest.mark.parametrize("d,rels", [(1, ("indep", "indep")), (2, ("shared", "subset")),
                                    (3, ("superset", "indep")), (2, ("shared", "shared"))])
@DTYPES
@MODES
def test_concat_matches_dense(device, rng, d, rels, dtype, gs):
    spatial = (4, 5, 3)[:d]
    a = _tensor(rng, random_sites(rng, 3, spatial, 0.3), 2, spatial, 3, dtype, device)
    ts = [a] + [_partner(rng, a, rel, 0.2, ch, dtype, device) for rel, ch in zip(rels, (1, 3))]
    dense = [dense_of(t) for t in ts]
    xs, masks = [x for x, _ in dense], [m for _, m in dense]
    y = scn.concat(ts, ground_state=gs)
    assert y.channels == 6
    np.testing.assert_array_equal(np_(y.coords), _union_order(*ts), err_msg="site order")
    np.testing.assert_array_equal(dense_of(y)[1], ref.union_mask(*masks), err_msg="sites")
    expected = ref.concat_forward(xs) if gs else ref.concat_zero_forward(xs, masks)
    g = np.concatenate([np_(t.ground) for t in ts])
    assert_close(y.ground, g if gs else 0 * g, dtype, "ground")
    assert_close(y.to_dense().numpy(), expected, dtype, "forward")
    G = backprop(y, rng)
    grads = ref.concat_backward(xs, G) if gs else ref.concat_zero_backward(xs, masks, G)
    for i, (t, gx) in enumerate(zip(ts, grads, strict=True)):
        _check_grads(t, gx, gs, dtype, f"tensors[{i}]")


def test_one_input_needs_no_grad(device, rng):
    a = _tensor(rng, random_sites(rng, 1, (4, 4), 0.3), 2, (4, 4), 1, np.float64, device)
    b = _partner(rng, a, "indep", 0.3, 2, np.float64, device)
    b.requires_grad = False
    backprop(scn.add(a, b), rng)
    assert a.grad is not None and b.grad is None
    with scn.no_grad():
        y = scn.concat([a, b])
    assert not y.requires_grad
    assert_close(y.to_dense().numpy()[:, 2:], b.numpy(), np.float64, "b's channels")


# -- geometry reuse ---------------------------------------------------------------------------
def _count_hashes(monkeypatch, device):
    K = backend.kernels(device)
    calls = []
    real = K.build_hash

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(K, "build_hash", counted)
    return calls


def test_shared_geometry_builds_nothing(device, rng, monkeypatch):
    x = _tensor(rng, random_sites(rng, 2, (6, 6), 0.3), 2, (6, 6), 2, np.float32, device)
    conv = scn.SubmanifoldConvolution(2, 2, 3, seed=0).to(device)
    h = conv(x)
    calls = _count_hashes(monkeypatch, device)
    y = scn.add(x, h)
    c = scn.concat([h, x, h])
    assert y.geometry is x.geometry and c.geometry is x.geometry
    assert not calls, "no hash is built for tensors sharing a geometry"
    assert not any(k[0] == "union" for k in x.geometry._cache)


def test_union_geometry_is_cached(device, rng, monkeypatch):
    a = _tensor(rng, random_sites(rng, 2, (6, 6), 0.3), 2, (6, 6), 2, np.float32, device)
    b = _partner(rng, a, "indep", 0.3, 2, np.float32, device)
    calls = _count_hashes(monkeypatch, device)
    y1 = scn.add(a, b)
    y2 = scn.add(a.detach(), b.detach())
    y3 = scn.concat([a, b])
    assert y1.geometry is y2.geometry is y3.geometry
    assert len(calls) == 1
    assert scn.add(b, a).geometry is not y1.geometry     # another order, another geometry
    # the union's hash is the new geometry's: a submanifold convolution on it is exact
    conv = scn.SubmanifoldConvolution(2, 3, 3, seed=1).to(device)
    assert conv(y1).n_active == y1.n_active


# -- modules ----------------------------------------------------------------------------------
def _oracle_block(block, xd, mask, g):
    if block is None:
        return None, (xd, mask, g)
    layers = list(block) if isinstance(block, scn.Sequential) else [block]
    specs, params = oracle_net(layers)
    return (specs, params), ref.net_forward(xd, mask, g, specs, params)


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("strided", [False, True], ids=["submanifold", "strided"])
@MODES
def test_residual_matches_dense(device, rng, d, strided, gs):
    dtype = np.float64
    C, N = 2, (5 if strided else 4)
    if strided:
        block = scn.Sequential(scn.Convolution(C, C, 3, 2, dim=d, dtype=dtype, seed=1),
                               scn.ReLU())
        shortcut = scn.Convolution(C, C, 3, 2, dim=d, dtype=dtype, seed=2)
    else:
        block = scn.Sequential(scn.SubmanifoldConvolution(C, C, 3, dim=d, dtype=dtype, seed=1),
                               scn.LeakyReLU(1 / 3),
                               scn.SubmanifoldConvolution(C, C, 3, dim=d, dtype=dtype, seed=2))
        shortcut = None
    net = scn.Residual(block, shortcut).to(device).set_ground_state(gs)
    for p in net.parameters():
        p.data = backend.to_device(rng.standard_normal(p.shape).astype(dtype) * 0.5, device)
    x = _tensor(rng, random_sites(rng, 2, (N,) * d, 0.4), C, (N,) * d, 2, dtype, device)
    xd, mask, g = oracle_input(x)
    blk, (yb, mb, gb) = _oracle_block(block, xd, mask, g)
    sc, (ys, ms, gsc) = _oracle_block(shortcut, xd, mask, g)
    y = net(x)
    shared = y.geometry is (x.geometry if shortcut is None else x.geometry.conv(3, 2)[1])
    assert shared, "the block's output shares the shortcut's geometry: no union is built"
    np.testing.assert_array_equal(dense_of(y)[1], ref.union_mask(ms, mb))
    expected = ref.add_forward(ys, yb) if gs else ref.add_zero_forward(ys, ms, yb, mb)
    assert_close(y.to_dense().numpy(), expected, dtype, "forward")
    G = backprop(y, rng)
    gys, gyb = ref.add_backward(ys, yb, G) if gs else ref.add_zero_backward(ys, ms, yb, mb, G)
    gx_b, gg_b, gp_b = ref.net_backward(xd, mask, g, *blk, gyb)
    c = np_(x.coords)
    if sc is None:
        at, inactive = split_input_grad(x, gys)
        gx_s, gg_s, gp_s = at, inactive if gs else 0 * inactive, []
    else:
        gx_s, gg_s, gp_s = ref.net_backward(xd, mask, g, *sc, gys)
        gx_s = ref.gather_sites(gx_s, c)
    assert_close(x.grad, ref.gather_sites(gx_b, c) + gx_s, dtype, "input grad")
    assert_close(x.ground_grad, gg_b + gg_s, dtype, "input ground grad")
    live = [q for q, p in zip(gp_b, blk[1], strict=True) if p is not None]
    live += [q for q, p in zip(gp_s, sc[1] if sc else [], strict=True) if p is not None]
    for i, (p, q) in enumerate(zip(net.parameters(), live, strict=True)):
        assert_close(p.grad, q, dtype, f"param {i}")


@MODES
def test_concat_module_matches_dense(device, rng, gs):
    dtype = np.float64
    branches = [scn.Sequential(),
                scn.SubmanifoldConvolution(2, 3, 3, dtype=dtype, seed=1),
                scn.Sequential(scn.NetworkInNetwork(2, 1, dtype=dtype, seed=2), scn.ReLU())]
    net = scn.Concat(*branches).to(device).set_ground_state(gs)
    x = _tensor(rng, random_sites(rng, 2, (5, 5), 0.3), 2, (5, 5), 2, dtype, device)
    xd, mask, g = oracle_input(x)
    outs = [_oracle_block(b, xd, mask, g) for b in branches]
    y = net(x)
    assert y.geometry is x.geometry and y.channels == 6
    ys, ms = [o[1][0] for o in outs], [o[1][1] for o in outs]
    expected = ref.concat_forward(ys) if gs else ref.concat_zero_forward(ys, ms)
    assert_close(y.to_dense().numpy(), expected, dtype, "forward")
    G = backprop(y, rng)
    gys = ref.concat_backward(ys, G) if gs else ref.concat_zero_backward(ys, ms, G)
    c = np_(x.coords)
    at, inactive = split_input_grad(x, gys[0])
    gx, gg, live = at, inactive if gs else 0 * inactive, []
    for (spec, _), gy in zip(outs[1:], gys[1:], strict=True):
        gxb, ggb, gpb = ref.net_backward(xd, mask, g, *spec, gy)
        gx, gg = gx + ref.gather_sites(gxb, c), gg + ggb
        live += [q for q, p in zip(gpb, spec[1], strict=True) if p is not None]
    assert_close(x.grad, gx, dtype, "input grad")
    assert_close(x.ground_grad, gg, dtype, "input ground grad")
    for i, (p, q) in enumerate(zip(net.parameters(), live, strict=True)):
        assert_close(p.grad, q, dtype, f"param {i}")


def test_module_sizes_and_repr():
    res = scn.Residual(scn.Convolution(2, 2, 3, 2), scn.MaxPooling(3, 2))
    assert res.input_size(4) == 9
    assert "block" in repr(res) and "shortcut" in repr(res)
    assert scn.Concat(scn.Sequential(), scn.SubmanifoldConvolution(1, 1, 3)).input_size(7) == 7
    with pytest.raises(ValueError, match="different input sizes"):
        scn.Residual(scn.Convolution(2, 2, 3, 2), scn.MaxPooling(2)).input_size(4)
    with pytest.raises(ValueError, match="different input sizes"):
        scn.Concat(scn.Sequential(), scn.Convolution(1, 1, 3)).input_size(4)
    with pytest.raises(TypeError, match="block must be a sparsecnn Module"):
        scn.Residual(lambda x: x)
    with pytest.raises(TypeError, match=r"branches\[1\]"):
        scn.Concat(scn.ReLU(), "relu")
    with pytest.raises(ValueError, match="at least one branch"):
        scn.Concat()


def test_save_load_round_trip(tmp_path, rng):
    model = scn.Sequential(
        scn.SubmanifoldConvolution(1, 4, 3, seed=0),
        scn.Residual(scn.Sequential(scn.SubmanifoldConvolution(4, 4, 3, seed=1), scn.ReLU())),
        scn.Concat(scn.Sequential(), scn.NetworkInNetwork(4, 2, seed=2)),
        scn.Residual(scn.Convolution(6, 6, 2, 2, seed=3), shortcut=scn.MaxPooling(2)),
        scn.SparseToDense())
    model[2].set_ground_state(False)
    x = _tensor(rng, random_sites(rng, 2, (8, 8), 0.3), 1, (8, 8), 2, np.float32, "cpu")
    expected = model(x).numpy()
    scn.save(model, tmp_path / "m.npz")
    loaded = scn.load(tmp_path / "m.npz")
    assert loaded.spec() == model.spec()
    assert [m.ground_state for m in loaded.modules()] == [m.ground_state for m in
                                                          model.modules()]
    assert isinstance(loaded[1], scn.Residual) and isinstance(loaded[2], scn.Concat)
    np.testing.assert_array_equal(loaded(x).numpy(), expected)
    # the size check of hostile files counts the parameters inside containers
    from sparsecnn import io
    assert io._param_count(model.spec()) == sum(p.data.size for p in model.parameters())
    for bad in ({"type": "Residual"}, {"type": "Residual", "block": {"type": "ReLU"}, "x": 1},
                {"type": "Concat", "branches": []}, {"type": "Concat", "branches": 3}):
        with pytest.raises(ValueError, match="bad .* spec arguments"):
            io.build(bad)


# -- bad input --------------------------------------------------------------------------------
def test_bad_input(rng):
    a = _tensor(rng, [[0, 1, 1]], 2, (4, 4), 1, np.float32, "cpu")
    cases = [
        (lambda: scn.add(a, a.to_dense()), TypeError, "b must be a SparseTensor"),
        (lambda: scn.add(a, _tensor(rng, [[0, 1, 1]], 2, (4, 5), 1, np.float32, "cpu")),
         ValueError, r"spatial_shape \(4, 5\) but a has \(4, 4\)"),
        (lambda: scn.add(a, _tensor(rng, [[0, 1, 1]], 2, (4, 4), 2, np.float32, "cpu")),
         ValueError, "batch_size 2 but a has 1"),
        (lambda: scn.add(a, a.astype(np.float64)), TypeError, "b is float64 but a is float32"),
        (lambda: scn.add(a, _tensor(rng, [[0, 1, 1]], 3, (4, 4), 1, np.float32, "cpu")),
         ValueError, "a has 2 channels but b has 3"),
        (lambda: scn.concat([a, _tensor(rng, [[0, 1]], 2, (4,), 1, np.float32, "cpu")]),
         ValueError, r"tensors\[1\] has spatial_shape \(4,\)"),
        (lambda: scn.concat([]), ValueError, "tensors is empty"),
        (lambda: scn.concat(a), TypeError, "list or tuple of SparseTensors"),
        (lambda: scn.concat([a, None]), TypeError, r"tensors\[1\] must be a SparseTensor"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()
    net = scn.Concat(scn.Sequential(), scn.Convolution(2, 2, 3))
    with pytest.raises(ValueError, match="same grid"):
        net(_tensor(rng, [[0, 1, 1]], 2, (5, 5), 1, np.float32, "cpu"))


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"], indirect=True)
def test_device_mismatch(device, rng):
    a = _tensor(rng, [[0, 1, 1]], 2, (4, 4), 1, np.float32, "cpu")
    b = _tensor(rng, [[0, 2, 1]], 2, (4, 4), 1, np.float32, device)
    with pytest.raises(ValueError, match="b is on 'cuda' but a is on 'cpu'"):
        scn.add(a, b)
    with pytest.raises(ValueError, match=r"tensors\[1\] is on 'cpu'"):
        scn.concat([b, a])
