"""The builders of scn.models: from_spec's new tokens (VGG-style nets with global pooling and
FC heads), ResNet and UNet, against the dense oracle (tests/dense_reference.py graph_forward
/ graph_backward, itself checked by finite differences here), their parameter order, input
sizes and save/load, on both devices.

The UNet's transposed convolution (scn.Deconvolution) is written separately: the tests of
the UNet with it skip while it is missing. Its wiring (levels, skips, reading the logits at
the input's sites, saving) is tested now with a small stand-in of the same interface
(``StandInDeconvolution`` below, registered for those tests only)."""
import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import backend
from sparsecnn.autograd import Parameter, record
from sparsecnn.functional import colsum
from sparsecnn.geometry import Geometry, Rulebook
from sparsecnn.nn import LAYERS, Module, he_normal
from tests import dense_reference as ref
from tests.sparse_helpers import (
    assert_close,
    dense_of,
    np_,
    oracle_input,
    oracle_net,
    random_sparse,
)
from tests.test_dense_reference import assert_vjp, away_from_zero


# -- library modules -> oracle specs ---------------------------------------------------------
def graph_specs(modules):
    """(specs, params) of library modules for ref.graph_forward, params in the order of the
    modules' parameters() (None for a missing bias)."""
    specs, params = [], []
    for m in modules:
        if isinstance(m, scn.Sequential):
            s, p = graph_specs(m.layers)
            specs += s
            params += p
        elif isinstance(m, scn.Residual):
            block, pb = graph_specs([m.block])
            short, ps = (None, []) if m.shortcut is None else graph_specs([m.shortcut])
            specs.append(("residual", block, short, m.ground_state))
            params += pb + ps
        elif isinstance(m, scn.Concat):
            branches = []
            for br in m.branches:
                s, p = graph_specs([br])
                branches.append(s)
                params += p
            specs.append(("concat", branches, m.ground_state))
        elif isinstance(m, scn.GlobalAveragePooling | scn.GlobalMaxPooling):
            kind = "gap" if isinstance(m, scn.GlobalAveragePooling) else "gmp"
            specs.append((kind, m.ground_state))
        elif type(m).__name__ in ("Deconvolution", "StandInDeconvolution"):
            specs.append(("deconv", m.filter_size, m.stride, m.ground_state))
            params += [np_(m.weight.data).copy(), None if m.bias is None else np_(m.bias.data)]
        else:
            s, p = oracle_net([m])
            specs += s
            params += p
    return specs, params


def randomize(net, rng, device):
    """Nonzero biases and batch-norm shifts, scales near 1, random running statistics."""
    for p in net.parameters():
        v = np_(p.data) + 0.3 * rng.standard_normal(p.shape)
        p.data = backend.to_device(v.astype(p.dtype), device)
    for m in net.modules():
        if isinstance(m, scn.BatchNorm):
            c = m.channels
            m.running_mean = backend.to_device((0.2 * rng.standard_normal(c)).astype(
                m.running_mean.dtype), device)
            m.running_var = backend.to_device(rng.uniform(0.5, 2.0, c).astype(
                m.running_var.dtype), device)
    return net


def check_graph(modules, run, x, rng, at_input_sites=False, rtol_scale=1.0):
    """``run(x)`` vs ref.graph_forward / graph_backward of ``modules``: the output (its
    active set and ground, or logits), then every parameter's gradient and the input's for
    a random upstream gradient. ``at_input_sites``: the output lies on x's sites (UNet);
    compare there."""
    specs, params = graph_specs(modules)
    xd, mask, g = oracle_input(x)
    y_ref, m_ref, g_ref = ref.graph_forward(xd, mask, g, specs, params)
    y = run(x)
    dt = x.dtype
    c = np_(x.coords)
    if isinstance(y, scn.SparseTensor):
        if at_input_sites:
            assert y.n_active == x.n_active
            np.testing.assert_array_equal(np_(y.coords), c)
            assert_close(y.features, ref.gather_sites(y_ref, c), dt, "forward at sites")
            G = np.zeros(y_ref.shape)
            G[tuple(c[:, 0]), :, *tuple(c[:, 1:].T)] = rng.standard_normal((len(c),
                                                                            y_ref.shape[1]))
        else:
            np.testing.assert_array_equal(dense_of(y)[1], m_ref, err_msg="active sites")
            assert_close(y.ground, g_ref, dt, "output ground")
            G = rng.standard_normal(y_ref.shape)
        yd = y.to_dense()
        if not at_input_sites:
            assert_close(yd.numpy(), y_ref, dt, "forward")
    else:
        yd = y
        assert_close(yd.numpy(), y_ref, dt, "logits")
        G = rng.standard_normal(y_ref.shape)
    yd.backward(backend.to_device(G.astype(dt), x.device))
    gx, gg, gps = ref.graph_backward(xd, mask, g, specs, params, G)
    live = [(gp, p) for gp, p in zip(gps, params, strict=True) if p is not None]
    ps = scn_params(modules)
    assert len(ps) == len(live)
    for i, (p, (gp, pv)) in enumerate(zip(ps, live, strict=True)):
        np.testing.assert_array_equal(np_(p.data), pv, err_msg=f"param {i} order")
        assert_close(p.grad, gp, dt, f"grad of param {i} {p.shape}")
    assert_close(x.grad, ref.gather_sites(gx, c), dt, "input grad")
    assert_close(x.ground_grad, gg, dt, "input ground grad")
    return y


def scn_params(modules):
    return [p for m in modules for p in m.parameters()]


# -- the oracle --------------------------------------------------------------------------------
def test_oracle_graph_hand():
    """A residual of a ReLU: y = x + relu(x); global average pool of it (ground counts)."""
    x = np.array([[[1.0, -2.0, 0.0, 3.0]]])
    mask = np.array([[True, True, False, False]])
    g = np.array([0.5])
    specs = [("residual", [("act", 0.0)], None, True)]
    y, m, gy = ref.graph_forward(x, mask, g, specs, [])
    np.testing.assert_allclose(y, [[[2.0, -2.0, 1.0, 1.0]]])
    np.testing.assert_array_equal(m, mask)
    np.testing.assert_allclose(gy, [1.0])
    y, _, _ = ref.graph_forward(x, mask, g, specs + [("gap", True)], [])
    np.testing.assert_allclose(y, [[0.5]])
    y, _, gz = ref.graph_forward(x, mask, g, [("residual", [("act", 0.0)], None, False)], [])
    np.testing.assert_allclose(y, [[[2.0, -2.0, 0.0, 0.0]]])
    np.testing.assert_allclose(gz, [0.0])
    # transposed convolution, f = 2, s = 2, 1-D: each input spreads over two outputs
    w = np.array([[[1.0]], [[10.0]]])
    y, m, _ = ref.graph_forward(x[:, :, :2], mask[:, :2], np.zeros(1),
                                [("deconv", 2, 2, False)], [w, np.array([0.5])])
    np.testing.assert_allclose(y, [[[1.5, 10.5, -1.5, -19.5]]])
    np.testing.assert_array_equal(m, [[True] * 4])
    with pytest.raises(ValueError, match="nonzero input ground"):
        ref.graph_forward(x, mask, g, [("deconv", 2, 2, True)], [w, None])


@pytest.mark.parametrize("gs", [True, False])
@pytest.mark.parametrize("sp", [(4,), (4, 4)], ids=str)
def test_oracle_graph_vjp(gs, sp):
    """graph_backward vs finite differences of graph_forward, for a net with a residual, a
    concatenation, a transposed convolution and global pooling."""
    rng = np.random.default_rng(len(sp) + 2 * gs)
    d = len(sp)
    x = away_from_zero(rng, (2, 2) + sp)
    mask = rng.random((2,) + sp) < 0.6
    mask[:, (0,) * d] = True
    g = rng.standard_normal(2)
    specs = [("subm", 3, gs),
             ("residual", [("subm", 3, gs)], [("nin", gs)], gs),
             ("concat", [[], [("conv", 2, 2, gs), ("deconv", 2, 2, False)]], gs),
             ("nin", gs)]
    shapes = [(3**d, 2, 3), (3,), (3**d, 3, 3), (3,), (3, 3), (3,), (2**d, 3, 2), (2,),
              (2**d, 2, 3), (3,), (6, 2), (2,)]
    params = [rng.standard_normal(s) for s in shapes]
    head = specs + [("gap", gs), ("linear",)]
    hparams = params + [rng.standard_normal((2, 3)), rng.standard_normal(3)]
    for layers, ps in ((specs, params), (head, hparams)):
        n = len(ps)

        def fwd(x, g, *p, layers=layers):
            return ref.graph_forward(x, mask, g, layers, list(p))[0]

        def bwd(x, g, *p, u, layers=layers):
            gx, gg, gp = ref.graph_backward(x, mask, g, layers, list(p), u)
            return (gx, gg, *gp)

        assert_vjp(fwd, [x, g, *ps], list(range(n + 2)),
                   lambda *a, bwd=bwd: bwd(*a[:-1], u=a[-1]), seed=3)


# -- from_spec: the VGG-style tokens ---------------------------------------------------------
VGG = "S3-4 B R S3-4 R P2 S3-6 B L0.1 {pool} FC-5 R FC-3"


@pytest.mark.parametrize("pool", ["GAP", "GMP"])
@pytest.mark.parametrize("gs", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d,density", [(1, 1.0), (2, 0.3), (3, "one"), (2, 0.0)])
def test_vgg_spec_matches_dense(device, rng, pool, gs, dtype, d, density):
    net = scn.models.from_spec(VGG.format(pool=pool), 2, dim=d, dtype=dtype, seed=3)
    net = randomize(net, rng, device).to(device).eval().set_ground_state(gs)
    x = random_sparse(rng, 2, (6,) * d, 2, density, dtype, device=device)
    y = check_graph([net], net, x, rng)
    assert y.shape == (2, 3)


def test_from_spec_new_tokens():
    net = scn.models.from_spec("S3-8 B R GMP FC-16 B R D0.5 FC-4", 3)
    types = [type(m).__name__ for m in net]
    assert types == ["SubmanifoldConvolution", "BatchNorm", "ReLU", "GlobalMaxPooling",
                     "Linear", "BatchNorm", "ReLU", "Dropout", "Linear"]
    assert (net[4].in_features, net[4].out_features, net[8].in_features) == (8, 16, 16)
    assert net[5].channels == 16
    with pytest.raises(ValueError, match="put GAP or GMP before it"):
        scn.models.from_spec("S3-8 FC-4")
    with pytest.raises(ValueError, match="cannot follow a global pooling"):
        scn.models.from_spec("S3-8 GAP S3-8")
    with pytest.raises(ValueError, match="cannot follow a global pooling"):
        scn.models.from_spec("S3-8 GAP GMP")
    with pytest.raises(ValueError, match="cannot read layer token 'FC'"):
        scn.models.from_spec("S3-8 GAP FC")


def test_vgg_spec_trains_and_round_trips(device, rng, tmp_path):
    net = scn.models.from_spec("S3-4 B R P2 S3-6 B R GAP FC-8 R D0.3 FC-3", 1, seed=1)
    net.to(device)
    x = random_sparse(rng, 4, (8, 8), 1, 0.4, np.float32, requires_grad=False, device=device)
    opt = scn.optim.SGD(net.parameters(), 0.05, momentum=0.9)
    labels = np.arange(4) % 3
    for _ in range(3):
        loss = scn.cross_entropy(net(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    scn.save(net, tmp_path / "vgg.npz")
    back = scn.load(tmp_path / "vgg.npz").to(device).eval()
    np.testing.assert_array_equal(back(x).numpy(), net(x).numpy())


# -- ResNet ------------------------------------------------------------------------------------
def resnet_modules(net):
    return [net.features, net.pool, net.classifier]


@pytest.mark.parametrize("gs", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d,density", [(1, 1.0), (2, 0.4), (3, "one"), (2, 0.0)])
def test_resnet_matches_dense(device, rng, gs, dtype, d, density):
    net = scn.models.ResNet((3, 4), (1, 2), in_channels=2, num_classes=3, dim=d, dtype=dtype,
                            seed=2)
    net = randomize(net, rng, device).to(device).eval().set_ground_state(gs)
    x = random_sparse(rng, 2, (4,) * d, 2, density, dtype, device=device)
    y = check_graph(resnet_modules(net), net, x, rng)
    assert y.shape == (2, 3)


def test_resnet_training_mode_matches_dense(device, rng):
    """Batch norm with the batch statistics of the active sites, ground state included."""
    net = scn.models.ResNet((3, 4), 1, in_channels=1, num_classes=2, dtype=np.float64)
    net = randomize(net, rng, device).to(device).train()
    x = random_sparse(rng, 2, (6, 6), 1, 0.7, np.float64, device=device)
    check_graph(resnet_modules(net), net, x, rng)


def test_resnet_structure_and_parameter_order():
    net = scn.models.ResNet((4, 8, 16), 1, in_channels=3, num_classes=5)
    names = [n for n, _ in net.named_parameters()]
    assert names[:4] == ["features.0.weight", "features.0.bias", "features.1.weight",
                         "features.1.bias"]
    assert names[4] == "features.3.block.0.weight"      # the first residual block
    assert names[-2:] == ["classifier.weight", "classifier.bias"]
    convs = [m for m in net.modules() if isinstance(m, scn.Convolution)]
    assert [(c.in_channels, c.out_channels, c.filter_size, c.stride) for c in convs] == [
        (4, 8, 2, 2), (8, 16, 2, 2)]
    assert sum(isinstance(m, scn.Residual) for m in net.modules()) == 3
    assert net.parameters()[0].shape == (9, 3, 4)
    assert net.classifier.weight.shape == (16, 5)
    assert net.input_size() == 4 and net.input_size(3) == 12
    # same seed, same weights; another seed, others
    a, b = scn.models.ResNet(seed=5), scn.models.ResNet(seed=5)
    assert all(np.array_equal(p.data, q.data) for p, q in zip(a.parameters(), b.parameters(),
                                                              strict=True))
    assert not np.array_equal(a.parameters()[0].data,
                              scn.models.ResNet(seed=6).parameters()[0].data)


def test_resnet_residual_sums_share_the_geometry(rng):
    """Submanifold blocks: each sum reuses its input's geometry (no union hashed)."""
    net = scn.models.ResNet((3,), 2, in_channels=1).eval()
    x = random_sparse(rng, 1, (8, 8), 1, 0.3, np.float32, requires_grad=False)
    h = x
    for m in net.features:
        h_in, h = h, m(h)
        if isinstance(m, scn.Residual):
            assert h.geometry is h_in.geometry


def test_resnet_input_checks(rng):
    net = scn.models.ResNet((3, 4, 5), 1, in_channels=2)
    x = random_sparse(rng, 1, (6, 6), 2, 0.5, np.float32)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*\(len\(widths\) - 1\) = 4"):
        net(x)
    with pytest.raises(ValueError, match="expects 2 input channels"):
        net(random_sparse(rng, 1, (8, 8), 3, 0.5, np.float32))
    with pytest.raises(ValueError, match="2-dimensional but the input is 3"):
        net(random_sparse(rng, 1, (4, 4, 4), 2, 0.5, np.float32))
    with pytest.raises(TypeError, match="expects a SparseTensor"):
        net(np.zeros((1, 2, 8, 8)))
    with pytest.raises(TypeError, match="widths must be a non-empty sequence"):
        scn.models.ResNet(())
    with pytest.raises(ValueError, match="blocks must have 2 entries"):
        scn.models.ResNet((3, 4), (1, 2, 3))
    with pytest.raises(ValueError, match="filter_size must be odd"):
        scn.models.ResNet(filter_size=2)
    with pytest.raises(ValueError, match=r"widths\[1\] must be >= 1"):
        scn.models.ResNet((3, 0))


def test_resnet_save_load(device, rng, tmp_path):
    net = scn.models.ResNet((3, 4), (1, 1), in_channels=1, num_classes=3, seed=4)
    net = randomize(net, rng, device).to(device).set_ground_state(False)
    x = random_sparse(rng, 2, (8, 8), 1, 0.3, np.float32, requires_grad=False, device=device)
    net(x)                                  # training mode: moves the running statistics
    net.eval()
    scn.save(net, tmp_path / "r.npz")
    back = scn.load(tmp_path / "r.npz").to(device).eval()
    assert isinstance(back, scn.models.ResNet)
    assert (back.widths, back.blocks, back.num_classes) == ([3, 4], [1, 1], 3)
    assert not any(m.ground_state for m in back.modules())
    np.testing.assert_array_equal(back(x).numpy(), net(x).numpy())
    assert repr(back) == repr(net)


def test_resnet_hostile_spec_is_refused(tmp_path):
    """The saved spec is the layer tree: the loader counts its parameters before building."""
    import json

    net = scn.models.ResNet((3,), 1)
    scn.save(net, tmp_path / "r.npz")
    with np.load(tmp_path / "r.npz") as z:
        arrays = {k: z[k] for k in z.files}
    doc = json.loads(bytes(arrays["__spec__"]).decode())
    doc["model"]["features"]["layers"][0]["out_channels"] = 2**20
    doc["model"]["features"]["layers"][0]["in_channels"] = 2**10
    arrays["__spec__"] = np.frombuffer(json.dumps(doc).encode(), np.uint8)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="asks for more parameters"):
        scn.load(tmp_path / "bad.npz")


# -- UNet ---------------------------------------------------------------------------------------
class StandInDeconvolution(Module):
    """Test-only transposed convolution with scn.Deconvolution's interface (see the issue):
    output size (N - 1) s + f, weight (K, C_in, C_out), input site i adds W_k^T x[i] to
    output i*s + k; active outputs are the windows of active inputs; a nonzero input ground
    is refused in the ground-state mode. Built on the shared conv kernels."""

    def __init__(self, in_channels, out_channels, filter_size, stride, *, dim=2, bias=True,
                 dtype=np.float32, seed=None):
        self.in_channels, self.out_channels = in_channels, out_channels
        self.filter_size, self.stride, self.dim = filter_size, stride, dim
        K = filter_size ** dim
        rng = np.random.default_rng(seed)
        self.weight = Parameter(he_normal(rng, (K, in_channels, out_channels), in_channels,
                                          dtype=dtype))
        self.bias = Parameter(np.zeros(out_channels, dtype)) if bias else None

    def _rulebook(self, x):
        key = ("stand_in_deconv", self.filter_size, self.stride)
        if key in x.geometry._cache:
            return x.geometry._cache[key]
        xp, dev = backend.xp(x.device), x.device
        f, s, n = self.filter_size, self.stride, x.n_active
        c = x.geometry.coords
        offs = ref.window_offsets(f, self.dim)
        parts = [xp.concatenate([c[:, :1], c[:, 1:] * s + xp.asarray(
            backend.to_device(np.asarray(o, np.int32), dev))], axis=1) for o in offs]
        allc = xp.ascontiguousarray(xp.concatenate(parts).astype(np.int32))
        shape = tuple((m - 1) * s + f for m in x.spatial_shape)
        shape_arr = backend.to_device(np.asarray(shape, np.int64), dev)
        keys, vals, inverse, n_u = backend.kernels(dev).build_hash(allc, shape_arr)
        ucoords = xp.empty((int(n_u), allc.shape[1]), dtype=np.int32)
        ucoords[inverse] = allc
        geom = Geometry(ucoords, shape, x.batch_size, dev, (keys, vals), shape_arr)
        rb = Rulebook(xp.tile(xp.arange(n, dtype=np.int32), len(offs)),
                      xp.ascontiguousarray(inverse.astype(np.int32)),
                      xp.arange(len(offs) + 1, dtype=np.int64) * n, n, int(n_u), f, s)
        x.geometry._cache[key] = (geom, rb)
        return geom, rb

    def forward(self, x):
        if self.ground_state:
            raise NotImplementedError("the stand-in runs the zero-ground mode only")
        xp = backend.xp(x.device)
        K = backend.kernels(x.device)
        geom, rb = self._rulebook(x)
        W = self.weight.data
        b = self.bias.data if self.bias is not None else xp.zeros(W.shape[2], W.dtype)
        g_in = xp.zeros_like(x.ground)
        out = scn.SparseTensor._make(geom, K.conv_forward(x.features, W, b, g_in, rb),
                                     xp.zeros_like(b))

        def backward(grad):
            gx, gW = K.conv_backward(x.features, W, g_in, grad[0], rb, grad_input=True)
            return ((gx, xp.zeros_like(x.ground)), gW,
                    colsum(grad[0]) if self.bias is not None else None)

        return record(out, [x, self.weight, self.bias], backward, "stand_in_deconvolution")

    def _spec_args(self):
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    filter_size=self.filter_size, stride=self.stride, dim=self.dim,
                    bias=self.bias is not None)


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setitem(LAYERS, "Deconvolution", StandInDeconvolution)
    monkeypatch.setitem(LAYERS, "StandInDeconvolution", StandInDeconvolution)
    return StandInDeconvolution


def unet_modules(net):
    return [net.features, net.classifier]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d,density", [(1, 1.0), (2, 0.4), (3, "one"), (2, 0.0)])
def test_unet_wiring_matches_dense(stand_in, device, rng, dtype, d, density):
    net = scn.models.UNet((3, 4, 5), 1, in_channels=2, num_classes=3, dim=d, dtype=dtype,
                          seed=1)
    net = randomize(net, rng, device).to(device).eval()
    x = random_sparse(rng, 2, (4,) * d, 2, density, dtype, device=device)
    y = check_graph(unet_modules(net), net, x, rng, at_input_sites=True)
    assert y.channels == 3 and y.geometry is x.geometry


def test_unet_structure_and_parameter_order(stand_in):
    net = scn.models.UNet((4, 8), 2, in_channels=1, num_classes=6)
    assert not any(m.ground_state for m in net.modules())      # zero-ground mode
    names = [n for n, _ in net.named_parameters()]
    assert names[:2] == ["features.0.weight", "features.0.bias"]
    assert names[-2:] == ["classifier.weight", "classifier.bias"]
    (cat,) = [m for m in net.modules() if isinstance(m, scn.Concat)]
    identity, branch = cat.branches
    assert isinstance(identity, scn.Sequential) and len(identity) == 0
    kinds = [type(m).__name__ for m in branch]
    assert kinds[:3] == ["Convolution", "BatchNorm", "ReLU"]
    assert kinds[-3:] == ["StandInDeconvolution", "BatchNorm", "ReLU"]
    after = net.features.layers[net.features.layers.index(cat) + 1]
    assert (after.in_channels, after.out_channels) == (8, 4)      # the joined skip
    assert net.classifier.weight.shape == (4, 6)
    assert net.input_size(8) == 8
    with pytest.raises(ValueError, match="multiples of 2"):
        net.input_size(5)


def test_unet_trains_and_round_trips(stand_in, device, rng, tmp_path):
    from sparsecnn.metrics import site_accuracy

    net = scn.models.UNet((4, 6), 1, in_channels=1, num_classes=2, seed=3).to(device)
    x = random_sparse(rng, 2, (8, 8), 1, 0.4, np.float32, requires_grad=False, device=device)
    labels = (np_(x.features)[:, 0] > 0).astype(np.int64)
    opt = scn.optim.SGD(net.parameters(), 0.1, momentum=0.9)
    losses = []
    for _ in range(10):
        loss = scn.site_cross_entropy(net(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    net.eval()
    assert site_accuracy(net(x), labels) > 0.6
    scn.save(net, tmp_path / "u.npz")
    back = scn.load(tmp_path / "u.npz").to(device).eval()
    assert isinstance(back, scn.models.UNet) and back.widths == [4, 6]
    assert not any(m.ground_state for m in back.modules())
    np.testing.assert_array_equal(np_(back(x).features), np_(net(x).features))


def test_unet_input_checks(stand_in, rng):
    net = scn.models.UNet((3, 4, 5), 1, in_channels=1)
    with pytest.raises(ValueError, match="divisible by"):
        net(random_sparse(rng, 1, (6, 6), 1, 0.5, np.float32))
    with pytest.raises(ValueError, match="expects 1 input channels"):
        net(random_sparse(rng, 1, (8, 8), 2, 0.5, np.float32))
    one_level = scn.models.UNet((3,), 2, in_channels=1, num_classes=4)   # no skip at all
    x = random_sparse(rng, 1, (5, 5), 1, 0.5, np.float32)
    assert one_level(x).geometry is x.geometry and one_level(x).channels == 4


def test_unet_without_deconvolution(monkeypatch):
    monkeypatch.delitem(LAYERS, "Deconvolution", raising=False)
    with pytest.raises(NotImplementedError, match="needs scn.Deconvolution"):
        scn.models.UNet()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d,density", [(1, 1.0), (2, 0.4), (3, "one")])
def test_unet_matches_dense(device, rng, dtype, d, density):
    net = scn.models.UNet((3, 4, 5), 1, in_channels=2, num_classes=3, dim=d, dtype=dtype,
                          seed=1)
    net = randomize(net, rng, device).to(device).eval()
    x = random_sparse(rng, 2, (4,) * d, 2, density, dtype, device=device)
    check_graph(unet_modules(net), net, x, rng, at_input_sites=True)


def test_unet_save_load(device, rng, tmp_path):
    net = scn.models.UNet((3, 4), 1, in_channels=1, num_classes=2, seed=2)
    net = randomize(net, rng, device).to(device).eval()
    x = random_sparse(rng, 1, (8, 8), 1, 0.3, np.float32, requires_grad=False, device=device)
    scn.save(net, tmp_path / "u.npz")
    back = scn.load(tmp_path / "u.npz").to(device).eval()
    np.testing.assert_array_equal(np_(back(x).features), np_(net(x).features))


def test_from_spec_depthwise_transposed_and_fractional_tokens(device, rng):
    net = scn.models.from_spec("C3-4 R DW3 N-6 SDW3 FMP1.5 T2/2-3", 2, seed=5)
    types = [type(m).__name__ for m in net]
    assert types == ["Convolution", "ReLU", "DepthwiseConvolution", "NetworkInNetwork",
                     "SubmanifoldDepthwiseConvolution", "FractionalMaxPooling",
                     "Deconvolution"]
    assert (net[2].channels, net[4].channels, net[6].in_channels, net[6].out_channels) == (
        4, 6, 6, 3)
    assert net[5].overlapping and net[5].ratio == 1.5
    # the spec's layers compute what the same layers built by hand compute
    by_hand = scn.Sequential(
        scn.Convolution(2, 4, 3), scn.ReLU(), scn.DepthwiseConvolution(4, 3),
        scn.NetworkInNetwork(4, 6), scn.SubmanifoldDepthwiseConvolution(6, 3),
        scn.FractionalMaxPooling(1.5, overlapping=True, seed=net[5].seed),
        scn.Deconvolution(6, 3, 2, 2))
    by_hand.load_state_dict(net.state_dict())
    for m in (net, by_hand):
        m.to(device).eval().set_ground_state(False)
    x = random_sparse(rng, 2, (14, 14), 2, 0.2, np.float32, device=device)
    np.testing.assert_array_equal(net(x).numpy(), by_hand(x).numpy())
    with pytest.raises(ValueError, match="a submanifold convolution has no stride"):
        scn.models.from_spec("SDW3/2", 2)
    with pytest.raises(ValueError, match="cannot follow a global pooling"):
        scn.models.from_spec("S3-4 GAP DW3")
    with pytest.raises(ValueError, match="cannot read layer token 'T2-3'"):
        scn.models.from_spec("T2-3")


def test_fmp_net_test_time_averaging_through_evaluate():
    """train.evaluate(tta=k) averages k region draws of an FMP network (eval_regions=
    'fresh'), reproducibly."""
    from sparsecnn import data
    from sparsecnn import train as T
    ds = data.synthetic_strokes(3, 4, seed=0)
    net = scn.models.fmp_net(2, 4, num_classes=3, eval_regions="fresh", seed=0)
    one = T.evaluate(net, ds, tta=1, augment=False)
    three = T.evaluate(net, ds, tta=3, augment=False)
    assert one["loss"] != three["loss"]                     # other draws were averaged in
    assert T.evaluate(net, ds, tta=3, augment=False) == three   # the same draws again
    fixed = scn.models.fmp_net(2, 4, num_classes=3, seed=0)      # one draw kept
    assert T.evaluate(fixed, ds, tta=1, augment=False)["loss"] == T.evaluate(
        fixed, ds, tta=3, augment=False)["loss"]
