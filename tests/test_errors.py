"""Bad input (design.md, "Bad input"): every public entry point raises ValueError/TypeError
whose message names the argument; empty batches are allowed and give the ground state."""
import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import backend
from sparsecnn._gpu import has_cupy
from tests import dense_reference as ref

COORDS = np.array([[0, 1, 2], [1, 3, 0], [0, 4, 4]], np.int32)
FEATS = np.arange(6, dtype=np.float64).reshape(3, 2)


def sparse(coords=COORDS, feats=FEATS, spatial=(5, 5), **kw):
    return scn.SparseTensor(coords, feats, spatial, **kw)


# --------------------------------------------------------------------------------------------
# SparseTensor construction


@pytest.mark.parametrize("row,value,match", [
    (1, [-1, 3, 0], r"coords\[1\] has a negative batch index -1"),
    (2, [0, -1, 4], r"coords\[2\] = \[0, -1, 4\] is outside the grid: coordinate 0 "
                    r"must be in \[0, 5\)"),
    (0, [0, 1, 5], r"coords\[0\] = \[0, 1, 5\] is outside the grid: coordinate 1 "
                   r"must be in \[0, 5\)"),
    (1, [1, 7, 0], r"coords\[1\] = \[1, 7, 0\] is outside the grid: coordinate 0"),
], ids=["negative-batch", "negative-coord", "too-large-last-dim", "too-large-first-dim"])
def test_coords_out_of_range_names_the_row(row, value, match):
    c = COORDS.copy()
    c[row] = value
    with pytest.raises(ValueError, match=match):
        sparse(c)


def test_coords_beyond_batch_size():
    with pytest.raises(ValueError, match=r"batch_size=1 but coords use batch index 1"):
        sparse(batch_size=1)


@pytest.mark.parametrize("coords,match", [
    (COORDS.astype(np.float64), r"coords must be an integer array, got dtype float64"),
    (COORDS.astype(np.float32), r"coords must be an integer array, got dtype float32"),
    (COORDS.astype(bool), r"coords must be an integer array, got dtype bool"),
    (COORDS.astype(str), r"coords must be an integer array"),
], ids=["float64", "float32", "bool", "str"])
def test_coords_wrong_dtype(coords, match):
    with pytest.raises(TypeError, match=match):
        sparse(coords)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float16, bool, np.complex128],
                         ids=["int32", "int64", "float16", "bool", "complex"])
def test_features_wrong_dtype(dtype):
    with pytest.raises(TypeError, match=r"features must be float32 or float64, got dtype"):
        sparse(feats=FEATS.astype(dtype))


@pytest.mark.parametrize("coords,feats,spatial,match", [
    (COORDS[:, :2], FEATS, (5, 5), r"coords must have shape \(n, 3\)"),
    (COORDS[None], FEATS, (5, 5), r"coords must have shape \(n, 3\)"),
    (COORDS.ravel(), FEATS, (5, 5), r"coords must have shape \(n, 3\)"),
    (COORDS, FEATS[:, 0], (5, 5), r"features must have shape \(n, C\)"),
    (COORDS, FEATS[:2], (5, 5), r"features has 2 rows but coords has 3"),
    (COORDS, FEATS, (5, 5, 5), r"coords must have shape \(n, 4\)"),
    (COORDS, FEATS, (5, 5, 5, 5, 5), r"spatial_shape must have 1 to 4 dimensions, got 5"),
    (COORDS, FEATS, (), r"spatial_shape must have 1 to 4 dimensions, got 0"),
    (COORDS, FEATS, (5, 0), r"spatial_shape must be positive"),
    (COORDS, FEATS, (5, -3), r"spatial_shape must be positive"),
], ids=["coords-too-narrow", "coords-3d", "coords-1d", "features-1d", "rows-mismatch",
        "coords-vs-3d-grid", "5-dims", "0-dims", "zero-size", "negative-size"])
def test_wrong_shapes(coords, feats, spatial, match):
    with pytest.raises(ValueError, match=match):
        sparse(coords, feats, spatial)


@pytest.mark.parametrize("spatial", [(5, 2.5), "55", 5, (5, None)],
                         ids=["float", "string", "scalar", "none"])
def test_spatial_shape_not_ints(spatial):
    with pytest.raises(TypeError, match=r"spatial_shape must be a sequence of ints"):
        sparse(spatial=spatial)


@pytest.mark.parametrize("batch_size", [1.5, "2", True], ids=["float", "str", "bool"])
def test_batch_size_not_int(batch_size):
    with pytest.raises((TypeError, ValueError), match=r"batch_size"):
        sparse(batch_size=batch_size)


def test_negative_batch_size():
    # the message is about batch_size itself, not about a batch index (there is none)
    for kw in [dict(coords=np.zeros((0, 3), np.int32), feats=np.zeros((0, 2))), {}]:
        with pytest.raises(ValueError, match=r"^batch_size must be >= 0, got -1$"):
            sparse(batch_size=-1, **kw)


def test_ground_wrong_shape():
    with pytest.raises(ValueError, match=r"ground must have shape \(2,\), got \(3,\)"):
        sparse(ground=np.zeros(3))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_features(bad, dtype):
    f = FEATS.astype(dtype)
    f[2, 1] = bad
    with pytest.raises(ValueError, match=r"features contain NaN or Inf \(first at row 2\); "
                                         r"pass allow_nonfinite=True"):
        sparse(feats=f)
    x = sparse(feats=f, allow_nonfinite=True)
    assert x.dtype == dtype
    dense = np.moveaxis(x.numpy(), 1, -1)
    got = dense[0, 4, 4, 1]
    assert (np.isnan(got) and np.isnan(bad)) or got == bad
    np.testing.assert_array_equal(dense[0, 1, 2], f[0])


def test_bug_coords_beyond_int32_are_not_silently_wrapped():
    """A spatial size >= 2**31 is accepted, but coords are stored as int32: a coordinate of
    2**32 + 5 must either be rejected or kept, never become another site."""
    try:
        x = scn.SparseTensor(np.array([[0, 2**32 + 5]], np.int64), np.ones((1, 1)), (2**33,))
    except ValueError as e:
        assert "spatial_shape" in str(e) or "coords" in str(e)
        return
    assert int(x.coords[0, 1]) == 2**32 + 5, f"site moved to {x.coords.tolist()}"


def test_bug_batch_index_beyond_int32_raises():
    with pytest.raises(ValueError, match=r"coords|batch"):
        scn.SparseTensor(np.array([[2**31, 1]], np.int64), np.ones((1, 1)), (4,))


def test_from_dense_rejects_nan():
    a = np.zeros((1, 1, 3, 3))
    a[0, 0, 1, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN"):
        scn.SparseTensor.from_dense(a)


def test_from_dense_rejects_inf():
    a = np.zeros((1, 1, 3, 3))
    a[0, 0, 1, 2] = np.inf
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        scn.SparseTensor.from_dense(a)


@pytest.mark.parametrize("array,threshold,exc,match", [
    (np.ones((2, 3)), 0.0, ValueError, r"array must have shape \(B, C, \*spatial\)"),
    (np.ones((1, 1, 2, 2, 2, 2, 2)), 0.0, ValueError, r"array must have shape"),
    (np.ones((1, 1, 4, 4), np.int64), 0.0, TypeError, r"array must be float32 or float64"),
    (np.ones((1, 1, 4, 4)), -1.0, ValueError, r"threshold must be a finite number >= 0"),
    (np.ones((1, 1, 4, 4)), np.nan, ValueError, r"threshold must be a finite number >= 0, got "
                                                r"nan"),
    (np.ones((1, 1, 4, 4)), np.inf, ValueError, r"threshold must be a finite number >= 0"),
    (np.ones((1, 1, 4, 4)), "0.5", ValueError, r"threshold must be a finite number >= 0"),
], ids=["2d", "5-spatial", "int", "negative-threshold", "nan-threshold", "inf-threshold",
        "str-threshold"])
def test_from_dense_bad_input(array, threshold, exc, match):
    with pytest.raises(exc, match=match):
        scn.SparseTensor.from_dense(array, threshold)


def test_astype_bad_dtype():
    with pytest.raises(TypeError, match=r"dtype must be float32 or float64, got int32"):
        sparse().astype(np.int32)
    with pytest.raises(TypeError, match=r"dtype must be float32 or float64"):
        scn.Convolution(1, 1, 1).astype(np.float16)


def test_tensor_bad_data():
    with pytest.raises(TypeError, match=r"data must be float32 or float64, got dtype int64"):
        scn.Tensor(np.arange(3))


# --------------------------------------------------------------------------------------------
# layers vs tensors


def _x(channels=2, spatial=(7, 7), dtype=np.float64, dim=None):
    rng = np.random.default_rng(0)
    if dim is not None:
        spatial = (7,) * dim
    d = len(spatial)
    coords = np.concatenate([np.zeros((3, 1), np.int32),
                             rng.integers(0, spatial, (3, d)).astype(np.int32)], 1)
    coords = np.unique(coords, axis=0)
    return scn.SparseTensor(coords, rng.standard_normal((len(coords), channels)).astype(dtype),
                            spatial)


@pytest.mark.parametrize("layer,expected", [
    (lambda: scn.Convolution(3, 4, 3, dtype=np.float64), 3),
    (lambda: scn.SubmanifoldConvolution(5, 4, 3, dtype=np.float64), 5),
    (lambda: scn.NetworkInNetwork(1, 4, dtype=np.float64), 1),
    (lambda: scn.BatchNorm(4, dtype=np.float64), 4),
], ids=["conv", "submanifold", "nin", "batchnorm"])
def test_channel_mismatch(layer, expected):
    with pytest.raises(ValueError, match=rf"expects {expected} input channels, but the input "
                                         rf"has 2"):
        layer()(_x(2))


def test_channel_mismatch_deepcnet():
    m = scn.models.DeepCNet(1, 2, in_channels=3, dtype=np.float64)
    with pytest.raises(ValueError, match=r"expects 3 input channels, got 2"):
        m(_x(2, spatial=(6, 6)))


def test_dimension_mismatch():
    with pytest.raises(ValueError, match=r"2-dimensional but the input is 3-dimensional"):
        scn.Convolution(2, 2, 3, dtype=np.float64)(_x(dim=3))
    with pytest.raises(ValueError, match=r"2-dimensional but the input is 1-dimensional"):
        scn.SubmanifoldConvolution(2, 2, 3, dtype=np.float64)(_x(dim=1))


@pytest.mark.parametrize("layer,f,s,N,fits", [
    (lambda: scn.Convolution(2, 2, 3, 2, dtype=np.float64), 3, 2, 8, "7 or 9"),
    (lambda: scn.Convolution(2, 2, 2, 3, dtype=np.float64), 2, 3, 7, "5 or 8"),
    (lambda: scn.Convolution(2, 2, 5, 1, dtype=np.float64), 5, 1, 4, "5"),
    (lambda: scn.MaxPooling(2, 2), 2, 2, 7, "6 or 8"),
    (lambda: scn.MaxPooling(3), 3, 3, 7, "6 or 9"),
    (lambda: scn.AveragePooling(3, 2), 3, 2, 6, "5 or 7"),
], ids=["conv-3/2-on-8", "conv-2/3-on-7", "conv-5-on-4", "maxpool-2/2-on-7",
        "maxpool-3-on-7", "avgpool-3/2-on-6"])
def test_size_rule_says_what_fits(layer, f, s, N, fits):
    x = _x(2, spatial=(N, N))
    with pytest.raises(ValueError, match=rf"\(N - {f}\) % {s} == 0.*spatial_shape\[0\] = {N};"
                                         rf" an input size of {fits} would fit"):
        layer()(x)
    lo = int(fits.split()[0])
    # the suggested size really fits
    layer()(_x(2, spatial=(lo, lo)))


def test_size_rule_names_the_failing_dimension():
    x = _x(2, spatial=(7, 8))
    with pytest.raises(ValueError, match=r"spatial_shape\[1\] = 8; an input size of 7 or 9"):
        scn.Convolution(2, 2, 3, 2, dtype=np.float64)(x)


def test_deepcnet_wrong_input_size():
    m = scn.models.DeepCNet(2, 2, dtype=np.float64)
    with pytest.raises(ValueError, match=r"needs spatial_shape \(12, 12\).*got \(7, 7\)"):
        m(_x(1, spatial=(7, 7)))


@pytest.mark.parametrize("layer", [
    lambda: scn.Convolution(2, 3, 3, dtype=np.float64),
    lambda: scn.SubmanifoldConvolution(2, 3, 3, dtype=np.float64),
    lambda: scn.NetworkInNetwork(2, 3, dtype=np.float64),
    lambda: scn.BatchNorm(2, dtype=np.float64),
], ids=["conv", "submanifold", "nin", "batchnorm"])
def test_dtype_mismatch(layer):
    x = _x(2, dtype=np.float32)
    with pytest.raises(TypeError, match=r"input features are float32 but weight is float64"):
        layer()(x)


def test_dtype_mismatch_model_and_linear():
    m = scn.models.DeepCNet(1, 2, dtype=np.float64)
    with pytest.raises(TypeError, match=r"input features are float32 but weight is float64"):
        m(_x(1, spatial=(6, 6), dtype=np.float32))
    lin = scn.Linear(3, 2, dtype=np.float64)
    with pytest.raises(TypeError, match=r"Linear: input is float32 but weight is float64"):
        lin(scn.Tensor(np.ones((2, 3), np.float32)))
    with pytest.raises(ValueError, match=r"Linear expects input of shape \(B, 3\)"):
        lin(scn.Tensor(np.ones((2, 4))))


@pytest.mark.parametrize("layer", [
    scn.Convolution(1, 1, 1), scn.SubmanifoldConvolution(1, 1, 1), scn.MaxPooling(1),
    scn.AveragePooling(1), scn.NetworkInNetwork(1, 1), scn.ReLU(), scn.LeakyReLU(),
    scn.BatchNorm(1), scn.SparseToDense(),
], ids=lambda m: type(m).__name__)
def test_layer_rejects_dense_input(layer):
    with pytest.raises(TypeError, match=r"expects a SparseTensor input, got ndarray"):
        layer(np.ones((1, 1, 3, 3), np.float32))


def test_model_rejects_dense_input():
    with pytest.raises(TypeError, match=r"DeepCNet expects a SparseTensor, got ndarray"):
        scn.models.DeepCNet(1, 2)(np.ones((1, 1, 6, 6), np.float32))


# --------------------------------------------------------------------------------------------
# layer constructors


@pytest.mark.parametrize("make,exc,match", [
    (lambda: scn.SubmanifoldConvolution(1, 1, 2), ValueError,
     r"filter_size must be odd for a submanifold convolution, got 2"),
    (lambda: scn.SubmanifoldConvolution(1, 1, 4, dim=3), ValueError, r"filter_size must be odd"),
    (lambda: scn.Convolution(-1, 2, 3), ValueError, r"in_channels must be >= 1, got -1"),
    (lambda: scn.Convolution(1, 0, 3), ValueError, r"out_channels must be >= 1, got 0"),
    (lambda: scn.Convolution(1, 2, 0), ValueError, r"filter_size must be >= 1, got 0"),
    (lambda: scn.Convolution(1, 2, 3, -2), ValueError, r"stride must be >= 1, got -2"),
    (lambda: scn.Convolution(1, 2, 3.0), TypeError, r"filter_size must be an int, got 3.0"),
    (lambda: scn.Convolution(1, 2, True), TypeError, r"filter_size must be an int, got True"),
    (lambda: scn.Convolution("1", 2, 3), TypeError, r"in_channels must be an int"),
    (lambda: scn.Convolution(1, 2, 3, 1.5), TypeError, r"stride must be an int"),
    (lambda: scn.Convolution(1, 2, 3, dim=5), ValueError, r"dim must be 1, 2, 3 or 4, got 5"),
    (lambda: scn.Convolution(1, 2, 3, dim=0), ValueError, r"dim must be >= 1"),
    (lambda: scn.SubmanifoldConvolution(1, 2, 3, dim=7), ValueError, r"dim must be 1, 2, 3"),
    (lambda: scn.SubmanifoldConvolution(0, 2, 3), ValueError, r"in_channels must be >= 1"),
    (lambda: scn.MaxPooling(0), ValueError, r"pool_size must be >= 1, got 0"),
    (lambda: scn.MaxPooling(2, -1), ValueError, r"stride must be >= 1, got -1"),
    (lambda: scn.AveragePooling(2.5), TypeError, r"pool_size must be an int"),
    (lambda: scn.NetworkInNetwork(0, 2), ValueError, r"in_channels must be >= 1"),
    (lambda: scn.NetworkInNetwork(2, 1.0), TypeError, r"out_channels must be an int"),
    (lambda: scn.BatchNorm(-4), ValueError, r"channels must be >= 1, got -4"),
    (lambda: scn.LeakyReLU(1.5), ValueError, r"negative_slope must be a number in \[0, 1\)"),
    (lambda: scn.LeakyReLU(-0.1), ValueError, r"negative_slope"),
    (lambda: scn.Dropout(1.0), ValueError, r"p must be a probability in \[0, 1\)"),
    (lambda: scn.Dropout(-0.2), ValueError, r"p must be a probability"),
    (lambda: scn.Linear(0, 3), ValueError, r"in_features must be >= 1"),
    (lambda: scn.Sequential(scn.ReLU(), "relu"), TypeError,
     r"Sequential: layer 1 is a str, not a Module"),
    (lambda: scn.models.DeepCNet(0, 8), ValueError, r"l must be >= 1, got 0"),
    (lambda: scn.models.DeepCNet(2, 8.0), TypeError, r"k must be an int"),
    (lambda: scn.models.DeepCNet(2, 8, activation="tanh"), ValueError,
     r"activation must be one of \['leaky', 'relu', 'vleaky'\]"),
    (lambda: scn.models.DeepCNiN(2, 8, activation=1.5), ValueError, r"activation must be"),
    (lambda: scn.models.DeepCNet(2, 8, dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
    (lambda: scn.models.DeepCNiN(2, 8, num_classes=0), ValueError, r"num_classes must be >= 1"),
], ids=["sub-even-f", "sub-even-f-3d", "conv-neg-cin", "conv-zero-cout", "conv-zero-f",
        "conv-neg-stride", "conv-float-f", "conv-bool-f", "conv-str-cin", "conv-float-stride",
        "conv-dim5", "conv-dim0", "sub-dim7", "sub-zero-cin", "maxpool-0", "maxpool-neg-stride",
        "avgpool-float", "nin-zero", "nin-float", "bn-neg", "leaky-1.5", "leaky-neg",
        "dropout-1", "dropout-neg", "linear-0", "sequential-str", "deepcnet-l0",
        "deepcnet-float-k", "deepcnet-tanh", "deepcnin-slope", "deepcnet-dropout",
        "deepcnin-classes"])
def test_bad_constructor_args(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# --------------------------------------------------------------------------------------------
# empty batches give the ground state


@pytest.mark.parametrize("d,f,s", [(1, 3, 2), (2, 2, 2), (2, 3, 1), (3, 2, 1)])
@pytest.mark.parametrize("ground", [False, True], ids=["ground0", "ground-random"])
def test_empty_batch_convolution_gives_ground(d, f, s, ground, rng):
    C_in, C_out, B = 2, 3, 2
    N = f + 2 * s
    g = rng.standard_normal(C_in) if ground else None
    x = scn.SparseTensor(np.zeros((0, 1 + d), np.int32), np.zeros((0, C_in)), (N,) * d,
                         batch_size=B, ground=g, requires_grad=True)
    assert x.n_active == 0 and x.batch_size == B
    conv = scn.Convolution(C_in, C_out, f, s, dim=d, dtype=np.float64)
    conv.bias.data = rng.standard_normal(C_out)
    y = conv(x)
    assert y.n_active == 0
    g_in = np.zeros(C_in) if g is None else g
    g_out = conv.bias.data + g_in @ conv.weight.data.sum(axis=0)
    dense = y.to_dense().numpy()
    assert dense.shape == (B, C_out, *((N - f) // s + 1,) * d)
    np.testing.assert_allclose(np.moveaxis(dense, 1, -1), np.broadcast_to(
        g_out, (B, *dense.shape[2:], C_out)), rtol=1e-12, atol=1e-12)
    # and it matches the dense network on the all-ground input
    xd = np.broadcast_to(g_in.reshape(1, C_in, *(1,) * d), (B, C_in, *(N,) * d))
    np.testing.assert_allclose(dense, ref.conv_forward(xd, conv.weight.data, conv.bias.data,
                                                       f, s), rtol=1e-10, atol=1e-12)
    # gradients flow to the ground and the parameters
    G = rng.standard_normal(dense.shape)
    y.to_dense().backward(G)
    assert x.grad.shape == (0, C_in)
    np.testing.assert_allclose(conv.bias.grad, G.sum(axis=tuple(i for i in range(G.ndim)
                                                                if i != 1)), rtol=1e-10)
    np.testing.assert_allclose(x.ground_grad,
                               conv.weight.data.sum(0) @ (G.sum(axis=(0, *range(2, G.ndim)))),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", ["DeepCNet", "DeepCNiN"])
def test_empty_batch_model_gives_classifier_of_ground(arch, rng):
    levels, B = 2, 3
    m = getattr(scn.models, arch)(levels, 3, num_classes=4, activation="vleaky", dtype=np.float64)
    for p in m.parameters():
        p.data = p.data + 0.3 * rng.standard_normal(p.shape)
    n = m.input_size
    x = scn.SparseTensor(np.zeros((0, 3), np.int32), np.zeros((0, 1)), (n, n), batch_size=B)
    logits = m(x).numpy()
    assert logits.shape == (B, 4)
    # the ground state, propagated through the features, then the classifier
    feats = m.features(x)
    assert feats.n_active == 0
    expected_row = feats.ground @ m.classifier.weight.data + m.classifier.bias.data
    np.testing.assert_allclose(logits, np.broadcast_to(expected_row, (B, 4)), rtol=1e-12)
    # which is the dense network on an all-zero input
    fwd = ref.deepcnet_forward if arch == "DeepCNet" else ref.deepcnin_forward
    params = [p.data for p in m.parameters()]
    np.testing.assert_allclose(logits, fwd(np.zeros((B, 1, n, n)), params, levels, 1 / 3),
                               rtol=1e-10, atol=1e-12)
    assert np.abs(expected_row).max() > 0
    # an empty sample inside a non-empty batch gets the same logits
    x2 = scn.SparseTensor(np.array([[1, 3, 4]], np.int32), np.ones((1, 1)), (n, n),
                          batch_size=3)
    lg2 = m(x2).numpy()
    np.testing.assert_allclose(lg2[[0, 2]], np.broadcast_to(expected_row, (2, 4)), rtol=1e-12)
    assert not np.allclose(lg2[1], expected_row)


def test_zero_samples_model():
    m = scn.models.DeepCNet(1, 2, num_classes=5, dtype=np.float64)
    x = scn.SparseTensor(np.zeros((0, 3), np.int32), np.zeros((0, 1)), (6, 6))
    assert x.batch_size == 0
    assert m(x).shape == (0, 5)


# --------------------------------------------------------------------------------------------
# devices


@pytest.mark.parametrize("device", ["tpu", "cuda:1", "", "CPUX"])
def test_unknown_device(device):
    with pytest.raises(ValueError, match=rf"unknown device {device!r}: expected 'cpu' or 'cuda'"):
        sparse().to(device)
    with pytest.raises(ValueError, match=r"unknown device"):
        scn.Convolution(1, 1, 1).to(device)
    with pytest.raises(ValueError, match=r"unknown device"):
        scn.models.DeepCNet(1, 2).to(device)


@pytest.mark.parametrize("device", [0, None.__class__, 1.5], ids=["int", "type", "float"])
def test_device_not_a_string(device):
    with pytest.raises(TypeError, match=r"device must be a string"):
        sparse().to(device)
    with pytest.raises(TypeError, match=r"device must be a string"):
        scn.Sequential(scn.ReLU()).to(device)


def test_cpu_device_is_noop():
    x = sparse()
    assert x.to("cpu") is x and x.to("CPU") is x
    conv = scn.Convolution(1, 2, 3)
    w = conv.weight.data
    assert conv.to("cpu") is conv and conv.weight.data is w


needs_no_cupy = pytest.mark.skipif(has_cupy(), reason="CuPy is installed here")


@needs_no_cupy
@pytest.mark.parametrize("device", ["cuda", "gpu", "cuda:0"])
def test_cuda_without_cupy_says_what_to_install(device, monkeypatch):
    monkeypatch.delenv("SPARSECNN_CUDA_SIM", raising=False)
    with pytest.raises(backend.GPUUnavailableError, match=r"pip install sparsecnn\[cuda12\]"):
        sparse().to(device)
    for model in (scn.Convolution(1, 2, 3), scn.models.DeepCNet(1, 2),
                  scn.Sequential(scn.NetworkInNetwork(2, 2), scn.BatchNorm(2))):
        with pytest.raises(backend.GPUUnavailableError,
                           match=r"CuPy is not installed.*pip install sparsecnn\[cuda12\]"):
            model.to(device)
        assert model.device == "cpu"


@needs_no_cupy
def test_cuda_without_cupy_is_a_value_error(monkeypatch):
    monkeypatch.delenv("SPARSECNN_CUDA_SIM", raising=False)
    with pytest.raises((ValueError, TypeError)):
        sparse().to("cuda")


# --------------------------------------------------------------------------------------------
# backward and losses


def test_backward_needs_grad_for_non_scalar():
    x = sparse(requires_grad=True)
    y = x.to_dense()
    with pytest.raises(ValueError, match=r"grad is required for a non-scalar tensor "
                                         r"\(shape \(2, 2, 5, 5\)\)"):
        y.backward()
    with pytest.raises(ValueError, match=r"grad has shape \(2, 2\), expected \(2, 2, 5, 5\)"):
        y.backward(np.ones((2, 2)))
    with pytest.raises(TypeError, match=r"grad must be float32 or float64"):
        y.backward(np.ones(y.shape, np.int64))
    with pytest.raises(ValueError, match=r"a sparse tensor needs grad"):
        scn.NetworkInNetwork(2, 2, dtype=np.float64)(x).backward()
    with pytest.raises(ValueError, match=r"grad has shape \(2, 2\), expected \(3, 2\)"):
        scn.NetworkInNetwork(2, 2, dtype=np.float64)(x).backward(np.ones((2, 2)))
    assert x.grad is None        # nothing was accumulated by the failed calls


def test_sparse_backward_checks_ground_grad_shape():
    x = sparse(requires_grad=True)
    with pytest.raises(ValueError, match=r"grad"):
        x.backward((np.ones((3, 2)), np.ones(7)))
    assert x.ground_grad is None


def test_backward_without_requires_grad():
    y = sparse().to_dense()
    with pytest.raises(RuntimeError, match=r"does not require grad"):
        y.backward(np.ones(y.shape))


def test_item_of_non_scalar():
    with pytest.raises(ValueError, match=r"item\(\) needs a single value"):
        scn.Tensor(np.ones(3)).item()


LOGITS = np.array([[0.1, 0.2, 0.3, 0.4, 0.5], [1.0, -1.0, 0.0, 2.0, 0.5],
                   [0.0, 0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("labels,exc,match", [
    (np.array([0.0, 1.0, 2.0]), TypeError, r"labels must be integers, got dtype float64"),
    (np.array([0, 1]), ValueError, r"labels must have shape \(3,\), got \(2,\)"),
    (np.array([[0, 1, 2]]), ValueError, r"labels must have shape \(3,\)"),
    (np.array([0, 5, 2]), ValueError, r"labels must be in \[0, 5\), got values in \[0, 5\]"),
    (np.array([0, -1, 2]), ValueError, r"labels must be in \[0, 5\), got values in \[-1, 2\]"),
    (["a", "b", "c"], TypeError, r"labels must be integers"),
], ids=["float", "short", "2d", "too-large", "negative", "strings"])
def test_cross_entropy_bad_labels(labels, exc, match):
    with pytest.raises(exc, match=match):
        scn.cross_entropy(scn.Tensor(LOGITS), labels)


def test_cross_entropy_bad_logits_and_options():
    with pytest.raises(TypeError, match=r"logits must be a Tensor, got ndarray"):
        scn.cross_entropy(LOGITS, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"logits must have shape \(B, n_classes\)"):
        scn.cross_entropy(scn.Tensor(LOGITS[0]), np.array([0]))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
        scn.cross_entropy(scn.Tensor(LOGITS), np.array([0, 1, 2]), label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"empty batch"):
        scn.cross_entropy(scn.Tensor(np.zeros((0, 5))), np.zeros(0, np.int64))
    # and the good call works
    loss = scn.cross_entropy(scn.Tensor(LOGITS), np.array([4, 3, 0], np.int32))
    assert np.isclose(loss.item(),
                      ref.cross_entropy_forward(LOGITS, np.array([4, 3, 0])))
