"""Issue 9's contracts of the Python layer, each pinned by a test that fails without its fix:
model files that declare more than they hold, the saved ground-state mode, parameter versions,
autograd shapes, non-finite values, parameter dtypes and layouts, and messages that name the
argument at fault."""
import io
import os
import tracemalloc
import zipfile

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import functional as F
from sparsecnn.autograd import Parameter, record
from sparsecnn.nn import fusion_at
from tests.sparse_helpers import random_sparse


def _x(rng, spatial=(6, 6), channels=1, batch=2, density=0.3, dtype=np.float32, **kw):
    return random_sparse(rng, batch, spatial, channels, density, dtype, **kw)


# -- model files --------------------------------------------------------------------------------
def _npy_bytes(header_shape, dtype, payload: bytes) -> bytes:
    """A .npy member whose header declares ``header_shape`` but carries ``payload``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": header_shape})
    return buf.getvalue() + payload


def _rewrite(src, dst, replace: dict, compress=zipfile.ZIP_STORED):
    """Copy the model file ``src`` to ``dst`` with some members' bytes replaced."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compress) as zout:
        for info in zin.infolist():
            data = replace.get(info.filename)
            zout.writestr(info.filename, zin.read(info) if data is None else data)


@pytest.fixture
def saved(tmp_path):
    model = scn.models.DeepCNet(1, 2, num_classes=3)
    path = tmp_path / "m.npz"
    scn.save(model, path)
    return model, path


def test_load_refuses_headers_that_declare_more_than_the_file_holds(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "bomb.npz"
    # 1 GiB declared, a few bytes stored: refused from the header, nothing allocated
    _rewrite(path, bad, {"param:classifier.weight.npy": _npy_bytes((2**28,), np.float32,
                                                                   b"\0" * 16)})
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"declare 10737\d+ bytes but the file has only"):
            scn.load(bad)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


def test_load_refuses_a_small_file_that_inflates(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "deflated.npz"
    n = 64 * 2**20 // 4        # 64 MiB of zeros deflate to ~64 KB
    _rewrite(path, bad, {"param:classifier.weight.npy": _npy_bytes(
        (n,), np.float32, bytes(4 * n))}, compress=zipfile.ZIP_DEFLATED)
    assert os.path.getsize(bad) < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"declare \d+ bytes but the file has only"):
            scn.load(bad)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128, np.int32, np.float16, "S4"])
def test_load_refuses_parameters_that_are_not_float(saved, tmp_path, dtype):
    model, path = saved
    w = model.classifier.weight.data
    bad = tmp_path / "typed.npz"
    buf = io.BytesIO()
    np.save(buf, np.zeros(w.shape, dtype=dtype))
    _rewrite(path, bad, {"param:classifier.weight.npy": buf.getvalue()})
    with pytest.raises(ValueError, match=r"parameter 'classifier.weight' has dtype .*expected "
                                         r"float32 or float64"):
        scn.load(bad)


def test_load_refuses_a_parameter_of_another_shape_before_reading_it(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "shape.npz"
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 3), np.float32))
    _rewrite(path, bad, {"param:classifier.weight.npy": buf.getvalue()})
    with pytest.raises(ValueError, match=r"classifier.weight.*has shape \(3, 3\), expected"):
        scn.load(bad)


def test_load_refuses_a_huge_spec_member(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "spec.npz"
    _rewrite(path, bad, {"__spec__.npy": _npy_bytes((2**30,), np.uint8, b"{}")})
    with pytest.raises(ValueError, match=r"cannot load"):
        scn.load(bad)


def test_the_ground_state_mode_is_saved_with_the_model(tmp_path, rng):
    model = scn.models.DeepCNet(1, 2, num_classes=3).set_ground_state(False)
    model.features[0].ground_state = True          # mixed modes survive too
    path = tmp_path / "zero.npz"
    scn.save(model, path)
    loaded = scn.load(path)
    assert [m.ground_state for m in loaded.modules()] == [m.ground_state
                                                          for m in model.modules()]
    x = _x(rng, ground=None)
    model.eval()
    loaded.eval()
    np.testing.assert_array_equal(model(x).numpy(), loaded(x).numpy())
    # and a model in the default mode stores nothing extra and loads in it
    plain = tmp_path / "plain.npz"
    scn.save(scn.models.DeepCNet(1, 2, num_classes=3), plain)
    assert all(m.ground_state for m in scn.load(plain).modules())


def test_save_onto_a_directory_leaves_nothing_behind(tmp_path):
    target = tmp_path / "adir"
    target.mkdir()
    with pytest.raises(IsADirectoryError, match=r"is a directory"):
        scn.save(scn.NetworkInNetwork(1, 1), target)
    assert sorted(os.listdir(tmp_path)) == ["adir"]
    assert os.listdir(target) == []


def test_save_failure_removes_its_temporary_file(tmp_path, monkeypatch):
    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        scn.save(scn.NetworkInNetwork(1, 1), tmp_path / "m.npz")
    assert os.listdir(tmp_path) == []


# -- parameters changed after the forward pass -------------------------------------------------
def _step_setup(rng):
    model = scn.models.DeepCNet(1, 2, num_classes=3)
    opt = scn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = _x(rng)
    return model, opt, x, np.array([0, 2])


def test_backward_after_an_optimizer_step_is_refused(rng):
    model, opt, x, y = _step_setup(rng)
    loss = scn.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    grads = [p.grad.copy() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"modified after the forward pass"):
        loss.backward()
    # nothing was accumulated by the refused backward
    for p, g in zip(model.parameters(), grads, strict=True):
        np.testing.assert_array_equal(p.grad, g)
    # a fresh forward works again
    opt.zero_grad()
    scn.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("change", ["assign", "augmented", "mark_modified", "load_state_dict"])
def test_backward_after_changing_data_is_refused(rng, change):
    model, _, x, y = _step_setup(rng)
    loss = scn.cross_entropy(model(x), y)
    p = model.classifier.bias
    if change == "assign":
        p.data = p.data + 1
    elif change == "augmented":
        p.data += 1
    elif change == "mark_modified":
        p.data[...] = 3
        p.mark_modified()
    else:
        model.load_state_dict(model.state_dict())
    who = r"Parameter\(shape=\(3,\)" if change != "load_state_dict" else "Parameter"
    with pytest.raises(RuntimeError, match=who + r".*modified after the forward pass"):
        loss.backward()
    assert all(q.grad is None for q in model.parameters())


def test_versions_count_changes():
    p = Parameter(np.zeros(3))
    v = p.version
    p.data = np.ones(3)
    p.data *= 2
    p.mark_modified()
    assert p.version == v + 3


# -- autograd shapes -----------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["mul", "rmul", "add", "radd", "sub"])
def test_broadcast_constants_give_a_leaf_its_own_shape(op):
    t = scn.Tensor(np.arange(3.0), requires_grad=True)
    c = np.arange(6.0).reshape(2, 3)
    y = {"mul": lambda: t * c, "rmul": lambda: c * t, "add": lambda: t + c,
         "radd": lambda: c + t, "sub": lambda: t - c}[op]()
    assert y.shape == (2, 3)
    y.sum().backward()
    assert t.grad.shape == (3,)
    expected = c.sum(axis=0) if op in ("mul", "rmul") else np.full(3, 2.0)
    np.testing.assert_allclose(t.grad, expected)


def test_broadcast_tensors_give_each_leaf_its_own_shape():
    a = scn.Tensor(np.ones((2, 1)), requires_grad=True)
    b = scn.Tensor(np.arange(3.0), requires_grad=True)
    (a * b).sum().backward()
    assert a.grad.shape == (2, 1) and b.grad.shape == (3,)
    np.testing.assert_allclose(a.grad, [[3.0], [3.0]])
    np.testing.assert_allclose(b.grad, [2.0, 2.0, 2.0])


def test_a_backward_rule_with_the_wrong_number_of_gradients_is_an_error():
    a = scn.Tensor(np.ones(2), requires_grad=True)
    b = scn.Tensor(np.ones(2), requires_grad=True)
    out = record(scn.Tensor(np.ones(2)), [a, b], lambda g: (g,), "broken")
    with pytest.raises(RuntimeError, match=r"broken returned 1 gradients for 2 inputs"):
        out.sum().backward()


def test_a_gradient_of_the_wrong_shape_never_reaches_a_leaf():
    a = scn.Tensor(np.ones(3), requires_grad=True)
    out = record(scn.Tensor(np.ones(3)), [a], lambda g: (np.ones((2, 3)),), "wide")
    with pytest.raises(RuntimeError, match=r"gradient of shape \(2, 3\) for a Tensor of shape"):
        out.sum().backward()
    assert a.grad is None


# -- non-finite values -----------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_ground_is_refused(bad):
    c = np.array([[0, 1, 1]], np.int32)
    f = np.ones((1, 2), np.float32)
    with pytest.raises(ValueError, match=r"ground contains NaN or Inf"):
        scn.SparseTensor(c, f, (4, 4), ground=[0.0, bad])
    t = scn.SparseTensor(c, f, (4, 4), ground=[0.0, bad], allow_nonfinite=True)
    assert not np.isfinite(t.ground).all()


def test_duplicates_that_sum_to_inf_are_refused():
    c = np.array([[0, 1, 1], [0, 2, 2], [0, 1, 1]], np.int32)
    f = np.array([[3e38], [1.0], [3e38]], np.float32)
    with pytest.raises(ValueError, match=r"duplicates of coords\[0\] = \[0, 1, 1\] overflow"):
        scn.SparseTensor(c, f, (4, 4))
    t = scn.SparseTensor(c, f, (4, 4), allow_nonfinite=True)
    assert t.n_active == 2 and np.isinf(t.features[0, 0])
    # finite sums of duplicates are fine (and summed)
    t = scn.SparseTensor(c, np.ones((3, 1), np.float32), (4, 4))
    np.testing.assert_array_equal(t.features[:, 0], [2.0, 1.0])


def test_ground_must_be_numbers():
    with pytest.raises(TypeError, match=r"ground must be an array of 1 numbers"):
        scn.SparseTensor(np.zeros((1, 3), np.int32), np.ones((1, 1)), (4, 4), ground=["a"])


# -- SparseTensor.replace ------------------------------------------------------------------------
def test_replace_validates_like_the_constructor(rng):
    x = _x(rng, channels=2, density=0.5)
    n = x.n_active
    with pytest.raises(ValueError, match=r"ground must have shape \(3,\), got \(2,\)"):
        x.replace(np.ones((n, 3), np.float32), np.zeros(2))
    bad = np.ones((n, 3), np.float32)
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match=r"features contain NaN or Inf"):
        x.replace(bad)
    with pytest.raises(ValueError, match=r"ground contains NaN or Inf"):
        x.replace(np.ones((n, 3), np.float32), [0, np.inf, 0])
    with pytest.raises(ValueError, match=rf"features must have shape \({n}, C\)"):
        x.replace(np.ones((n + 1, 3), np.float32))
    with pytest.raises(TypeError, match=r"features must be float32 or float64"):
        x.replace(np.ones((n, 3), np.int64))
    strided = np.asfortranarray(rng.standard_normal((n, 3)).astype(np.float32))
    y = x.replace(strided, np.arange(3.0))
    assert y.features.flags.c_contiguous and y.ground.dtype == np.float32
    np.testing.assert_array_equal(y.features, strided)
    # the result runs through a layer like any tensor
    scn.Convolution(3, 1, 2)(y)


# -- parameters: dtype of every one, layout ---------------------------------------------------
def test_a_float64_classifier_bias_in_a_float32_net_is_named(rng):
    model = scn.models.DeepCNet(1, 2, num_classes=3)
    model.classifier.bias.data = model.classifier.bias.data.astype(np.float64)
    with pytest.raises(TypeError, match=r"Linear: input is float32 but bias is float64"):
        model(_x(rng))


@pytest.mark.parametrize("make,name", [
    (lambda: scn.Convolution(1, 2, 2), "bias"),
    (lambda: scn.SubmanifoldConvolution(1, 2, 3), "bias"),
    (lambda: scn.NetworkInNetwork(1, 2), "bias"),
    (lambda: scn.BatchNorm(1), "bias"),
    (lambda: scn.Convolution(1, 2, 2), "weight"),
], ids=["conv", "submanifold", "nin", "batchnorm", "conv-weight"])
def test_every_parameter_dtype_is_checked(rng, make, name):
    layer = make()
    p = getattr(layer, name)
    p.data = p.data.astype(np.float64)
    with pytest.raises(TypeError, match=rf"input features are float32 but {name} is float64"):
        layer(_x(rng, spatial=(5, 5)))


@pytest.mark.parametrize("layout", ["fortran", "strided", "broadcast"])
def test_parameter_data_of_any_layout_becomes_c_contiguous(rng, layout):
    conv = scn.Convolution(2, 3, 2, seed=1)
    ref = conv.weight.data.copy()
    x = _x(rng, spatial=(5, 5), channels=2, density=0.5)
    y0 = conv(x).features
    if layout == "fortran":
        conv.weight.data = np.asfortranarray(ref)
    elif layout == "strided":
        conv.weight.data = np.repeat(ref, 2, axis=2)[:, :, ::2]
    else:
        conv.bias.data = np.broadcast_to(np.float32(0), (3,))
        conv.weight.data = ref
    for p in conv.parameters():
        assert p.data.flags.c_contiguous and p.data.flags.writeable
    np.testing.assert_array_equal(conv(x).features, y0)
    conv.bias.data += 1             # writable: in-place updates keep working
    np.testing.assert_allclose(conv(x).features, y0 + 1, rtol=1e-6, atol=1e-6)


def test_noncontiguous_gradients_passed_to_backward(rng):
    x = _x(rng, spatial=(5, 5), channels=2, density=0.5, requires_grad=True)
    conv = scn.Convolution(2, 3, 2)
    y = conv(x)
    g = rng.standard_normal((y.n_active, 6)).astype(np.float32)
    y.backward(g[:, ::2])                    # strided view
    want_x, want_w = x.grad.copy(), conv.weight.grad.copy()
    x.grad = conv.weight.grad = conv.bias.grad = None
    conv(x).backward(np.ascontiguousarray(g[:, ::2]))
    np.testing.assert_array_equal(x.grad, want_x)
    np.testing.assert_array_equal(conv.weight.grad, want_w)
    d = scn.Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    (d * 2.0).backward(np.asfortranarray(np.ones((2, 3), np.float32)))
    np.testing.assert_array_equal(d.grad, np.full((2, 3), 2.0))


def test_a_weight_edited_to_a_wrong_shape_is_blamed_on_the_weight(rng):
    conv = scn.Convolution(1, 4, 3)
    conv.weight.data = np.zeros((9, 1, 5), np.float32)
    with pytest.raises(ValueError, match=r"weight has shape \(9, 1, 5\), expected \(9, 1, 4\)"):
        conv(_x(rng, spatial=(5, 5)))
    nin = scn.NetworkInNetwork(1, 4)
    nin.weight.data = np.zeros((1, 5), np.float32)
    with pytest.raises(ValueError, match=r"weight has shape \(1, 5\), expected \(1, 4\)"):
        nin(_x(rng))
    lin = scn.Linear(3, 2)
    lin.weight.data = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"weight has shape \(3, 4\), expected \(3, 2\)"):
        lin(scn.Tensor(np.ones((1, 3), np.float32)))


# -- sizes and options ---------------------------------------------------------------------------
@pytest.mark.parametrize("call,exc,match", [
    (lambda x: F.max_pooling(x, 2, 0), ValueError, r"MaxPooling: stride must be in \[1, 2\*\*31"),
    (lambda x: F.max_pooling(x, 0), ValueError, r"MaxPooling: pool_size must be in"),
    (lambda x: F.max_pooling(x, 2, 2**31), ValueError, r"stride must be in \[1, 2\*\*31 - 1\], "
                                                       r"got 2147483648"),
    (lambda x: F.max_pooling(x, 2.0), TypeError, r"pool_size must be an int"),
    (lambda x: F.average_pooling(x, 2, -1), ValueError, r"AveragePooling: stride must be in"),
    (lambda x: F.average_pooling(x, True), TypeError, r"AveragePooling: pool_size must be an "
                                                      r"int"),
    (lambda x: F.convolution(x, scn.Convolution(1, 1, 2).weight, None, 2, 0), ValueError,
     r"stride must be in"),
    (lambda x: F.convolution(x, scn.Convolution(1, 1, 2).weight, None, 0), ValueError,
     r"filter_size must be in"),
    (lambda x: F.submanifold_convolution(x, scn.Convolution(1, 1, 2).weight, None, 2),
     ValueError, r"filter_size must be odd"),
    (lambda x: F.convolution_max_pooling(x, scn.Convolution(1, 1, 2).weight, None, 2, 1, 0),
     ValueError, r"pool_size must be in"),
], ids=["pool-stride-0", "pool-size-0", "pool-stride-huge", "pool-size-float",
        "avg-stride-neg", "avg-size-bool", "conv-stride-0", "conv-f-0", "sub-even",
        "fused-pool-0"])
def test_functional_entry_points_validate_sizes(rng, call, exc, match):
    with pytest.raises(exc, match=match):
        call(_x(rng, spatial=(6, 6)))


@pytest.mark.parametrize("make,match", [
    (lambda: scn.Convolution(1, 1, 2, stride=2**31), r"stride must be <= 2\*\*31 - 1"),
    (lambda: scn.MaxPooling(2**31), r"pool_size must be <= 2\*\*31 - 1"),
    (lambda: scn.AveragePooling(2, 2**40), r"stride must be <= 2\*\*31 - 1"),
    (lambda: scn.MaxPooling(2, dim=5), r"dim must be 1, 2, 3 or 4"),
    (lambda: scn.AveragePooling(2, dim=0), r"dim must be >= 1"),
    (lambda: scn.BatchNorm(2, eps=0), r"eps must be a finite number > 0"),
    (lambda: scn.BatchNorm(2, eps=-1e-5), r"eps must be a finite number > 0"),
    (lambda: scn.BatchNorm(2, eps=float("nan")), r"eps must be a finite number > 0"),
    (lambda: scn.BatchNorm(2, momentum=-0.1), r"momentum must be a number in \[0, 1\]"),
    (lambda: scn.BatchNorm(2, momentum=1.5), r"momentum must be a number in \[0, 1\]"),
    (lambda: scn.BatchNorm(2, momentum=float("nan")), r"momentum must be a number in"),
], ids=["conv-stride", "pool-size", "avg-stride", "pool-dim-5", "avg-dim-0", "bn-eps-0",
        "bn-eps-neg", "bn-eps-nan", "bn-mom-neg", "bn-mom-big", "bn-mom-nan"])
def test_layer_arguments_are_checked(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_batchnorm_momentum_limits_are_allowed(rng):
    x = _x(rng, density=0.5)
    for m in (0.0, 1.0):
        bn = scn.BatchNorm(1, momentum=m)
        bn(x)
        if m == 0:
            np.testing.assert_array_equal(bn.running_mean, [0.0])
        else:
            np.testing.assert_allclose(bn.running_mean, [x.features.mean()], rtol=1e-5)
    with pytest.raises(ValueError, match=r"eps must be"):
        F.batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, training=True,
                     eps=0.0)


@pytest.mark.parametrize("layer", [lambda: scn.MaxPooling(2, dim=3),
                                   lambda: scn.AveragePooling(2, dim=1)],
                         ids=["max", "avg"])
def test_pooling_checks_its_dimension(rng, layer):
    with pytest.raises(ValueError, match=r"-dimensional but the input is 2-dimensional"):
        layer()(_x(rng))


def test_batch_size_beyond_int32_is_refused():
    with pytest.raises(ValueError, match=r"batch_size must be at most 2\*\*31"):
        scn.SparseTensor(np.zeros((0, 3), np.int32), np.zeros((0, 1)), (4, 4),
                         batch_size=2**31 + 1)


# -- the fused path keeps every check ------------------------------------------------------------
@pytest.mark.parametrize("layers,match", [
    (lambda: [scn.Convolution(1, 2, 3, dim=3), scn.MaxPooling(2, dim=3)],
     r"Convolution\(.*dim=3.*is 3-dimensional but the input is 2-dimensional"),
    (lambda: [scn.Convolution(1, 2, 3), scn.MaxPooling(2, dim=3), scn.ReLU()],
     r"MaxPooling\(.*dim=3.*is 3-dimensional but the input is 2-dimensional"),
    (lambda: [scn.Convolution(2, 2, 3), scn.MaxPooling(2)],
     r"expects 2 input channels, but the input has 1"),
], ids=["conv-dim", "pool-dim", "channels"])
def test_fused_path_keeps_the_checks_of_its_layers(rng, layers, match):
    x = _x(rng, spatial=(8, 8))
    with pytest.raises(ValueError, match=match):
        scn.Sequential(*layers())(x)


def test_fused_path_blames_an_edited_weight(rng):
    seq = scn.Sequential(scn.Convolution(1, 2, 3), scn.MaxPooling(2))
    seq[0].weight.data = np.zeros((9, 1, 3), np.float32)
    with pytest.raises(ValueError, match=r"weight has shape \(9, 1, 3\), expected \(9, 1, 2\)"):
        seq(_x(rng, spatial=(8, 8)))


def _one_of_each():
    return {
        "conv": scn.Convolution(1, 1, 2), "conv-s2": scn.Convolution(1, 1, 2, 2),
        "sub": scn.SubmanifoldConvolution(1, 1, 3), "max": scn.MaxPooling(2),
        "max-overlap": scn.MaxPooling(3, 2), "avg": scn.AveragePooling(2),
        "nin": scn.NetworkInNetwork(1, 1), "relu": scn.ReLU(), "leaky": scn.LeakyReLU(0.3),
        "bn": scn.BatchNorm(1), "drop": scn.Dropout(0.5), "dense": scn.SparseToDense(),
    }


def test_which_layers_fuse_is_pinned():
    layers = _one_of_each()
    fused = {}
    for a, b, c in [(a, b, c) for a in layers for b in layers for c in layers]:
        kind, n, slope = fusion_at([layers[a], layers[b], layers[c]], 0)
        if kind is not None:
            fused[(a, b, c)] = (kind, n, slope)
    expected = {}
    for c in layers:
        for b in ("max",):
            slope = {"relu": 0.0, "leaky": 0.3}.get(c)
            for a in ("conv", "conv-s2"):
                expected[(a, b, c)] = ("conv+maxpool", 2 if slope is None else 3, slope)
    for a in ("max", "max-overlap"):
        for b, slope in (("relu", 0.0), ("leaky", 0.3)):
            for c in layers:
                expected[(a, b, c)] = ("maxpool+act", 2, slope)
    assert fused == expected
    # a subclass with its own forward is never fused
    class MyConv(scn.Convolution):
        pass
    assert fusion_at([MyConv(1, 1, 2), scn.MaxPooling(2)], 0)[0] is None


# -- allocations sized by the work, not by hostile numbers --------------------------------------
def test_to_dense_beyond_the_machines_memory_is_refused_before_allocating():
    x = scn.SparseTensor(np.array([[0, 5, 5]], np.int32), np.ones((1, 4), np.float32),
                         (2**20, 2**20))
    with pytest.raises(MemoryError, match=r"\(1, 1048576, 1048576, 4\) of float32 needs 16384"
                                          r"\.0 GiB"):
        x.to_dense()


def test_channelwise_dropout_draws_per_sample_present():
    big = 2**31
    x = scn.SparseTensor(np.array([[big - 1, 1, 1], [3, 0, 0]], np.int32),
                         np.ones((2, 8), np.float32), (4, 4), batch_size=big)
    tracemalloc.start()
    try:
        y = F.dropout(x, 0.5, np.random.default_rng(0), channelwise=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    assert set(np.unique(y.features)) <= {0.0, 2.0}
    # with every sample present, the masks are the draws of one row per sample
    rng = np.random.default_rng(1)
    x = random_sparse(rng, 3, (4, 4), 5, 1.0, np.float32)
    y = F.dropout(x, 0.5, np.random.default_rng(7), channelwise=True)
    rows = np.random.default_rng(7).random((3, 5)) < 0.5
    np.testing.assert_array_equal(y.features != 0, rows[x.coords[:, 0]] & (x.features != 0))


@pytest.mark.parametrize("make,match", [
    (lambda: scn.Convolution(2, 3, 2**20), r"filter_size\*\*dim = 1048576\*\*2 = \d+ exceeds"),
    (lambda: scn.SubmanifoldConvolution(1, 1, 4097, dim=2), r"filter_size\*\*dim = 4097\*\*2"),
    (lambda: scn.Convolution(2**16, 2**16, 3), r"would hold 38654705664 numbers"),
    (lambda: scn.NetworkInNetwork(2**20, 2**20), r"\(in_channels, out_channels\) = "
                                                  r"\(1048576, 1048576\) would hold"),
    (lambda: scn.Linear(2**31 - 1, 2), r"\(in_features, out_features\)"),
], ids=["window", "submanifold-window", "weight", "nin", "linear"])
def test_layers_refuse_huge_weights_before_allocating(make, match):
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=match):
            make()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_the_model_file_check_counts_every_layer_types_parameters():
    """scn.load bounds a spec's parameters before building it: the count must cover every
    registered layer type (a new type the count does not know would let a hostile file ask
    for any size)."""
    from sparsecnn.io import _param_count
    from sparsecnn.nn import LAYERS
    examples = {
        "AveragePooling": scn.AveragePooling(2), "BatchNorm": scn.BatchNorm(3),
        "Concat": scn.Concat(scn.Sequential(), scn.Convolution(2, 3, 1)),
        "Convolution": scn.Convolution(2, 3, 2), "Deconvolution": scn.Deconvolution(2, 3, 2, 2),
        "DeepCNet": scn.models.DeepCNet(2, 4), "DeepCNiN": scn.models.DeepCNiN(2, 4),
        "DepthwiseConvolution": scn.DepthwiseConvolution(3, 3), "Dropout": scn.Dropout(0.1),
        "FMPNet": scn.fmp_net(2, 4), "Flatten": scn.Flatten(),
        "FractionalMaxPooling": scn.FractionalMaxPooling(1.5),
        "GlobalAveragePooling": scn.GlobalAveragePooling(),
        "GlobalMaxPooling": scn.GlobalMaxPooling(),
        "InverseConvolution": scn.InverseConvolution(2, 3, 2, 2), "LeakyReLU": scn.LeakyReLU(),
        "Linear": scn.Linear(3, 2), "MaxPooling": scn.MaxPooling(2),
        "NetworkInNetwork": scn.NetworkInNetwork(2, 3), "ReLU": scn.ReLU(),
        "Residual": scn.Residual(scn.SubmanifoldConvolution(2, 2, 3)),
        "Sequential": scn.Sequential(scn.Convolution(1, 2, 2), scn.BatchNorm(2)),
        "SparseToDense": scn.SparseToDense(),
        "SubmanifoldConvolution": scn.SubmanifoldConvolution(2, 3, 3),
        "SubmanifoldDepthwiseConvolution": scn.SubmanifoldDepthwiseConvolution(3, 3),
        "UnPooling": scn.UnPooling(2),
        "ResNet": scn.models.ResNet((4, 8), 1), "UNet": scn.models.UNet((4, 8)),
    }
    assert set(examples) == set(LAYERS), sorted(set(LAYERS) ^ set(examples))
    for name, m in examples.items():
        real = sum(int(p.data.size) for p in m.parameters())
        assert _param_count(m.spec()) >= real, name
