"""Tests of the dense NumPy oracle ``tests/dense_reference.py``.

* hand-computed tiny cases for every op,
* cross-checks against scipy.signal.correlate for the valid convolution,
* vector-Jacobian-product checks of every backward against central
  differences: <J v, u> == <v, J^T u> for random v, u, one input at a time.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.signal import correlate

from tests import dense_reference as ref

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def assert_vjp(fwd, args, diff, bwd, seed, h=1e-6, rtol=1e-6, atol=0.0):
    """Check bwd against central differences of fwd.

    fwd(*args) -> array; bwd(*args, u) -> tuple of grads, one per index in
    ``diff`` (positions in args).  Each differentiated input is perturbed on
    its own in a random direction v and <(f(a+hv)-f(a-hv))/2h, u> is compared
    with <v, grad> (to ``atol``, the differences' rounding noise, where a gradient is ~0).
    """
    rng = np.random.default_rng(seed)
    args = [np.asarray(a, dtype=np.float64) if i in diff else a for i, a in enumerate(args)]
    y = np.asarray(fwd(*args), dtype=np.float64)
    u = rng.standard_normal(y.shape)
    grads = bwd(*args, u)
    if not isinstance(grads, tuple):
        grads = (grads,)
    assert len(grads) == len(diff)
    for i, g in zip(diff, grads, strict=True):
        g = np.asarray(g)
        assert g.shape == np.shape(args[i]), (i, g.shape, np.shape(args[i]))
        v = rng.standard_normal(np.shape(args[i]))
        plus = list(args)
        minus = list(args)
        plus[i] = args[i] + h * v
        minus[i] = args[i] - h * v
        jv = (np.asarray(fwd(*plus), np.float64) - np.asarray(fwd(*minus), np.float64)) / (2 * h)
        lhs = float(np.sum(jv * u))
        rhs = float(np.sum(v * g))
        scale = float(np.sum(np.abs(jv * u)) + np.sum(np.abs(v * g))) + 1e-12
        assert abs(lhs - rhs) <= rtol * scale + atol, f"input {i}: <Jv,u>={lhs!r} <v,J^T u>={rhs!r}"


def separated(rng, shape, gap=0.1):
    """Distinct values at least `gap` apart in random order (no near-ties for max pooling)."""
    n = int(np.prod(shape))
    return (rng.permutation(n) * gap + rng.uniform(0, gap / 10, n) - n * gap / 2).reshape(shape)


def away_from_zero(rng, shape, margin=0.05):
    """Random values with |x| >= margin (ReLU kinks are not crossed by finite differences)."""
    z = rng.standard_normal(shape)
    return np.sign(z) * (margin + np.abs(z))


def shape_id(val):
    return "x".join(map(str, val)) if isinstance(val, tuple) else None


# --------------------------------------------------------------------------
# layout helpers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_weight_layout_roundtrip_and_offset_order(d):
    f, cin, cout = 3, 2, 4
    rng = np.random.default_rng(d)
    w = rng.standard_normal((f**d, cin, cout))
    tw = ref.weight_to_torch_layout(w, f, d)
    assert tw.shape == (cout, cin) + (f,) * d
    np.testing.assert_array_equal(ref.weight_from_torch_layout(tw), w)
    for k, off in enumerate(ref.window_offsets(f, d)):
        # row-major offset index
        assert k == int(np.ravel_multi_index(off, (f,) * d))
        np.testing.assert_array_equal(w[k], tw[(slice(None), slice(None)) + off].T)


def test_pooled_shape_rules():
    assert ref.pooled_shape((7, 9), 3, 2) == (3, 4)
    assert ref.pooled_shape((5,), 5, 3) == (1,)
    with pytest.raises(ValueError):
        ref.pooled_shape((8,), 3, 2)
    with pytest.raises(ValueError):
        ref.pooled_shape((2,), 3, 1)


# --------------------------------------------------------------------------
# hand-computed cases
# --------------------------------------------------------------------------


def test_conv_1d_hand():
    x = np.array([[[1.0, 2.0, 3.0]]])  # (B=1, C=1, N=3)
    w = np.array([2.0, -1.0]).reshape(2, 1, 1)
    b = np.array([0.5])
    y = ref.conv_forward(x, w, b, f=2, s=1)
    # y0 = .5 + 2*1 - 1*2 ; y1 = .5 + 2*2 - 1*3
    np.testing.assert_allclose(y, [[[0.5, 1.5]]])
    gx, gw, gb = ref.conv_backward(x, w, b, 2, 1, np.array([[[1.0, 10.0]]]))
    np.testing.assert_allclose(gx, [[[2.0, 2.0 * 10 - 1.0, -10.0]]])
    np.testing.assert_allclose(gw.ravel(), [1.0 + 20.0, 2.0 + 30.0])
    np.testing.assert_allclose(gb, [11.0])


def test_conv_1d_stride_hand():
    x = np.arange(1.0, 6.0).reshape(1, 1, 5)  # [1,2,3,4,5]
    w = np.array([1.0, 10.0, 100.0]).reshape(3, 1, 1)
    y = ref.conv_forward(x, w, np.zeros(1), f=3, s=2)
    np.testing.assert_allclose(y, [[[1 + 20 + 300, 3 + 40 + 500]]])
    gx, gw, gb = ref.conv_backward(x, w, np.zeros(1), 3, 2, np.ones((1, 1, 2)))
    np.testing.assert_allclose(gx, [[[1, 10, 101, 10, 100]]])  # x2 shared by both windows
    np.testing.assert_allclose(gw.ravel(), [1 + 3, 2 + 4, 3 + 5])
    with pytest.raises(ValueError):
        ref.conv_forward(np.zeros((1, 1, 6)), w, np.zeros(1), 3, 2)


def test_conv_2d_offset_orientation_hand():
    x = np.arange(9.0).reshape(1, 1, 3, 3)
    # only offset (i0, i1) = (0, 1) -> k = 0*2 + 1 = 1
    w = np.zeros((4, 1, 1))
    w[1] = 1.0
    y = ref.conv_forward(x, w, np.zeros(1), f=2, s=1)
    np.testing.assert_array_equal(y, [[[[1.0, 2.0], [4.0, 5.0]]]])
    # offset (1, 0) -> k = 2
    w = np.zeros((4, 1, 1))
    w[2] = 1.0
    y = ref.conv_forward(x, w, np.zeros(1), f=2, s=1)
    np.testing.assert_array_equal(y, [[[[3.0, 4.0], [6.0, 7.0]]]])


def test_conv_channels_hand():
    # two input channels, two output channels, f=1 on a 1-site grid: y = W^T x + b
    x = np.array([1.0, 2.0]).reshape(1, 2, 1)
    w = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2)  # w[0, ci, co]
    y = ref.conv_forward(x, w, np.array([10.0, 20.0]), f=1, s=1)
    np.testing.assert_allclose(y.ravel(), [10 + 1 * 1 + 2 * 3, 20 + 1 * 2 + 2 * 4])


def test_maxpool_2x2_hand():
    x = np.array(
        [
            [1.0, 5.0, 2.0, 0.0],
            [3.0, 4.0, 8.0, 7.0],
            [0.0, 0.0, 6.0, 6.0],
            [-1.0, 9.0, 6.0, 6.0],
        ]
    ).reshape(1, 1, 4, 4)
    y = ref.maxpool_forward(x, 2, 2)
    np.testing.assert_array_equal(y, [[[[5.0, 8.0], [9.0, 6.0]]]])
    gx = ref.maxpool_backward(x, 2, 2, np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2))
    expected = np.zeros((4, 4))
    expected[0, 1] = 1.0
    expected[1, 2] = 2.0
    expected[3, 1] = 3.0
    expected[2, 2] = 4.0  # four-way tie: first in row-major window order
    np.testing.assert_array_equal(gx[0, 0], expected)


def test_maxpool_tie_first_rowmajor_hand():
    # window [[1, 5], [5, 5]]: ties at (0,1), (1,0), (1,1) -> (0,1) wins
    x = np.array([[1.0, 5.0], [5.0, 5.0]]).reshape(1, 1, 2, 2)
    gx = ref.maxpool_backward(x, 2, 2, np.ones((1, 1, 1, 1)))
    np.testing.assert_array_equal(gx[0, 0], [[0.0, 1.0], [0.0, 0.0]])


def test_maxpool_overlapping_1d_hand():
    x = np.array([1.0, 5.0, 2.0, 4.0, 3.0]).reshape(1, 1, 5)
    np.testing.assert_array_equal(ref.maxpool_forward(x, 3, 2), [[[5.0, 4.0]]])
    gx = ref.maxpool_backward(x, 3, 2, np.ones((1, 1, 2)))
    np.testing.assert_array_equal(gx, [[[0, 1, 0, 1, 0]]])
    x = np.array([1.0, 2.0, 9.0, 0.0, 3.0]).reshape(1, 1, 5)  # shared maximum
    np.testing.assert_array_equal(ref.maxpool_forward(x, 3, 2), [[[9.0, 9.0]]])
    gx = ref.maxpool_backward(x, 3, 2, np.array([[[1.0, 2.0]]]))
    np.testing.assert_array_equal(gx, [[[0, 0, 3, 0, 0]]])


def test_avgpool_hand():
    x = np.array([[1.0, 2.0, 0.0, 0.0], [3.0, 4.0, 8.0, 4.0]]).reshape(1, 1, 2, 4)
    y = ref.avgpool_forward(x, 2, 2)
    np.testing.assert_allclose(y, [[[[2.5, 3.0]]]])
    gx = ref.avgpool_backward(x, 2, 2, np.array([1.0, 2.0]).reshape(1, 1, 1, 2))
    np.testing.assert_allclose(gx[0, 0], [[0.25, 0.25, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5]])
    # overlapping 1D: windows [1,2,3], [3,4,5]
    x = np.arange(1.0, 6.0).reshape(1, 1, 5)
    np.testing.assert_allclose(ref.avgpool_forward(x, 3, 2), [[[2.0, 4.0]]])
    gx = ref.avgpool_backward(x, 3, 2, np.ones((1, 1, 2)))
    np.testing.assert_allclose(gx, [[[1 / 3, 1 / 3, 2 / 3, 1 / 3, 1 / 3]]])


def test_submanifold_1d_hand():
    # grid of 5 sites, active at 0 and 3 (values 3 and 7), ground 2, f=3
    mask = np.array([[True, False, False, True, False]])
    x = np.array([3.0, 2.0, 2.0, 7.0, 2.0]).reshape(1, 1, 5)  # inactive entries hold ground
    ground = np.array([2.0])
    w = np.array([1.0, 10.0, 100.0]).reshape(3, 1, 1)
    b = np.array([0.5])
    y = ref.submanifold_forward(x, mask, ground, w, b, 3)
    # site 0: window (-1, 0, 1) = (ground, 3, 2) -> .5 + 2 + 30 + 200
    # site 3: window (2, 3, 4) = (2, 7, 2) -> .5 + 2 + 70 + 200
    # inactive: .5 + 2*(1 + 10 + 100)
    np.testing.assert_allclose(y, [[[232.5, 222.5, 222.5, 272.5, 222.5]]])

    gx, gg, gw, gb = ref.submanifold_backward(x, mask, ground, w, b, 3, np.ones((1, 1, 5)))
    np.testing.assert_allclose(gx, [[[10.0, 100.0, 1.0, 10.0, 100.0]]])
    # padding at -1 (weight 1) + 3 inactive outputs * 111
    np.testing.assert_allclose(gg, [1.0 + 333.0])
    # w0: pad 2 + x2 2 + 3*ground ; w1: 3 + 7 + 3*2 ; w2: x1 2 + x4 2 + 3*2
    np.testing.assert_allclose(gw.ravel(), [10.0, 16.0, 10.0])
    np.testing.assert_allclose(gb, [5.0])

    active, inactive_sum = ref.fold_ground_grad(gx, mask)
    np.testing.assert_allclose(active, [[[10.0, 0.0, 0.0, 10.0, 0.0]]])
    np.testing.assert_allclose(inactive_sum, [201.0])
    # total d(sum y)/d ground with inactive entries tied to ground: 101 + 101 + 333
    np.testing.assert_allclose(gg + inactive_sum, [535.0])


def test_submanifold_rejects_even_filter():
    with pytest.raises(ValueError):
        x, mask = np.zeros((1, 1, 4)), np.ones((1, 4), bool)
        ref.submanifold_forward(x, mask, np.zeros(1), np.zeros((2, 1, 1)), np.zeros(1), 2)


def test_batchnorm_masked_hand():
    x = np.array([1.0, 3.0, 100.0, -50.0]).reshape(1, 1, 4)
    mask = np.array([[True, True, False, False]])
    # active stats: mean 2, biased var 1
    gamma, beta = np.array([2.0]), np.array([1.0])
    y, mean, var = ref.batchnorm_forward(x, mask, gamma, beta, 0.0, train=True)
    np.testing.assert_allclose(mean, [2.0])
    np.testing.assert_allclose(var, [1.0])
    np.testing.assert_allclose(y, [[[-1.0, 3.0, 197.0, -103.0]]])
    # eval mode uses the running statistics
    y = ref.batchnorm_forward(
        x, mask, gamma, beta, 0.0, train=False,
        running_mean=np.array([1.0]), running_var=np.array([4.0]),
    )
    np.testing.assert_allclose(y, [[[1.0, 3.0, 100.0, -50.0]]])
    # gradient at an inactive entry is only the direct term gamma/sqrt(var+eps) * grad_y
    gy = np.array([0.3, -0.7, 1.0, 2.0]).reshape(1, 1, 4)
    gx, gg, gb = ref.batchnorm_backward(x, mask, gamma, beta, 0.0, gy, train=True)
    np.testing.assert_allclose(gx[0, 0, 2:], [2.0, 4.0])
    np.testing.assert_allclose(gb, [gy.sum()])
    np.testing.assert_allclose(gg, [np.sum(gy * np.array([-1.0, 1.0, 98.0, -52.0]))])


def test_nin_hand():
    x = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2)  # channels [1,2] and [3,4] at 2 sites
    w = np.array([[1.0], [10.0]])
    y = ref.nin_forward(x, w, np.array([0.5]))
    np.testing.assert_allclose(y, [[[31.5, 42.5]]])


def test_activations_hand():
    x = np.array([-2.0, 0.0, 3.0])
    np.testing.assert_array_equal(ref.relu_forward(x), [0.0, 0.0, 3.0])
    np.testing.assert_array_equal(ref.relu_backward(x, np.ones(3)), [0.0, 0.0, 1.0])
    np.testing.assert_allclose(ref.leaky_relu_forward(x, 0.1), [-0.2, 0.0, 3.0])
    np.testing.assert_allclose(ref.leaky_relu_backward(x, 0.1, np.ones(3)), [0.1, 0.1, 1.0])


def test_linear_hand():
    x = np.array([[1.0, 2.0]])
    w = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 3.0]])
    y = ref.linear_forward(x, w, np.array([0.0, 1.0, 2.0]))
    np.testing.assert_allclose(y, [[1.0, 3.0, 10.0]])
    gx, gw, gb = ref.linear_backward(x, w, np.zeros(3), np.array([[1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(gx, [[3.0, 4.0]])
    np.testing.assert_allclose(gw, [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    np.testing.assert_allclose(gb, [1.0, 1.0, 1.0])


def test_cross_entropy_hand():
    assert ref.cross_entropy_forward(np.zeros((1, 2)), np.array([0])) == pytest.approx(math.log(2))
    logits = np.array([[0.0, math.log(3.0)]])  # softmax = [1/4, 3/4]
    assert ref.cross_entropy_forward(logits, np.array([0])) == pytest.approx(math.log(4))
    grad = ref.cross_entropy_backward(logits, np.array([0]))
    np.testing.assert_allclose(grad, [[0.25 - 1, 0.75]])
    # smoothing 0.2, 2 classes: target [0.9, 0.1]
    expected = -(0.9 * math.log(0.25) + 0.1 * math.log(0.75))
    assert ref.cross_entropy_forward(logits, np.array([0]), 0.2) == pytest.approx(expected)
    grad = ref.cross_entropy_backward(logits, np.array([0]), 0.2)
    np.testing.assert_allclose(grad, [[-0.65, 0.65]])
    # batch mean, and numerically stable for huge logits
    big = np.array([[1000.0, 0.0], [0.0, 1000.0]])
    assert ref.cross_entropy_forward(big, np.array([0, 0])) == pytest.approx(500.0)


def test_to_dense_mask_gather_hand():
    coords = np.array([[0, 1, 2], [1, 0, 0], [0, 0, 1]])
    feats = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    dense = ref.to_dense(coords, feats, (2, 3), 2, ground=np.array([-1.0, -2.0]))
    assert dense.shape == (2, 2, 2, 3)
    expected = np.empty((2, 2, 2, 3))
    expected[:, 0] = -1.0
    expected[:, 1] = -2.0
    expected[0, :, 1, 2] = [1.0, 2.0]
    expected[1, :, 0, 0] = [3.0, 4.0]
    expected[0, :, 0, 1] = [5.0, 6.0]
    np.testing.assert_array_equal(dense, expected)
    mask = ref.active_mask(coords, (2, 3), 2)
    assert mask.sum() == 3 and mask[0, 1, 2] and mask[1, 0, 0] and mask[0, 0, 1]
    np.testing.assert_array_equal(ref.gather_sites(dense, coords), feats)
    np.testing.assert_array_equal(ref.to_dense(coords, feats, (2, 3), 2)[1, :, 1, 1], [0.0, 0.0])
    with pytest.raises(ValueError):
        ref.to_dense(np.array([[0, 0, 0], [0, 0, 0]]), feats[:2], (2, 3), 1)
    with pytest.raises(ValueError):
        ref.to_dense(np.array([[0, 2, 0]]), feats[:1], (2, 3), 1)


def test_dtype_preserved_float32():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    w = rng.standard_normal((9, 3, 4)).astype(np.float32)
    b = np.zeros(4, np.float32)
    y = ref.conv_forward(x, w, b, 3, 1)
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in ref.conv_backward(x, w, b, 3, 1, np.ones_like(y)))
    assert ref.maxpool_forward(x, 1, 1).dtype == np.float32
    mask = rng.random((2, 5, 5)) < 0.5
    gamma, beta = np.ones(3, np.float32), np.zeros(3, np.float32)
    out = ref.batchnorm_forward(x, mask, gamma, beta, 1e-5, train=True)
    assert all(o.dtype == np.float32 for o in out)
    loss = ref.cross_entropy_forward(np.zeros((2, 3), np.float32), np.array([0, 1]))
    assert loss.dtype == np.float32


# --------------------------------------------------------------------------
# cross-check: conv vs scipy.signal.correlate via the torch layout
# --------------------------------------------------------------------------


def conv_via_scipy(x, w, b, f, s):
    d = x.ndim - 2
    tw = ref.weight_to_torch_layout(w, f, d)
    bsz, cin = x.shape[:2]
    cout = tw.shape[0]
    outs = []
    for bi in range(bsz):
        chans = []
        for co in range(cout):
            acc = sum(correlate(x[bi, ci], tw[co, ci], mode="valid") for ci in range(cin))
            chans.append(acc[(slice(None, None, s),) * d] + b[co])
        outs.append(chans)
    return np.array(outs)


@pytest.mark.parametrize(
    "d,n,f,s",
    [(1, 7, 3, 2), (2, 6, 2, 2), (2, 7, 3, 1), (3, 5, 3, 1), (3, 5, 3, 2), (4, 4, 2, 2)],
    ids=lambda v: str(v),
)
def test_conv_matches_scipy(d, n, f, s):
    rng = np.random.default_rng(100 + d * 10 + f)
    x = rng.standard_normal((2, 2) + (n,) * d)
    w = rng.standard_normal((f**d, 2, 3))
    b = rng.standard_normal(3)
    expected = conv_via_scipy(x, w, b, f, s)
    np.testing.assert_allclose(ref.conv_forward(x, w, b, f, s), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(1, 3),
    f=st.integers(1, 3),
    s=st.integers(1, 3),
    outs=st.lists(st.integers(1, 3), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_conv_matches_scipy_property(d, f, s, outs, seed):
    rng = np.random.default_rng(seed)
    spatial = tuple((o - 1) * s + f for o in outs[:d])  # non-square grids
    x = rng.standard_normal((1, 2) + spatial)
    w = rng.standard_normal((f**d, 2, 2))
    b = rng.standard_normal(2)
    y = ref.conv_forward(x, w, b, f, s)
    assert y.shape == (1, 2) + tuple(outs[:d])
    np.testing.assert_allclose(y, conv_via_scipy(x, w, b, f, s), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------
# VJP checks against central differences
# --------------------------------------------------------------------------

CONV_CASES = [
    # (d, spatial, f, s, cin, cout)
    (1, (7,), 3, 2, 2, 3),
    (1, (5,), 1, 1, 3, 2),
    (2, (6, 6), 2, 2, 2, 3),
    (2, (5, 7), 3, 1, 1, 2),
    (2, (7, 7), 3, 2, 3, 1),
    (3, (4, 4, 4), 2, 2, 2, 2),
    (3, (5, 4, 5), 3, 1, 1, 2),
    (4, (3, 3, 3, 3), 2, 1, 2, 2),
    (4, (4, 4, 4, 4), 2, 2, 1, 2),
]


def case_id(case):
    d, sp, f, s, *channels = case
    return f"d{d}-{'x'.join(map(str, sp))}-f{f}-s{s}" + "".join(f"-c{c}" for c in channels)


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv_vjp(case):
    d, sp, f, s, cin, cout = case
    rng = np.random.default_rng(CONV_CASES.index(case))
    x = rng.standard_normal((2, cin) + sp)
    w = rng.standard_normal((f**d, cin, cout))
    b = rng.standard_normal(cout)
    assert_vjp(
        lambda x, w, b: ref.conv_forward(x, w, b, f, s),
        [x, w, b],
        [0, 1, 2],
        lambda x, w, b, u: ref.conv_backward(x, w, b, f, s, u),
        seed=1,
    )


SUBMANIFOLD_CASES = [
    # (d, spatial, f, cin, cout, density)
    (1, (9,), 3, 2, 3, 0.4),
    (1, (6,), 5, 1, 2, 0.5),
    (2, (5, 6), 3, 2, 2, 0.3),
    (2, (4, 4), 1, 3, 2, 0.5),
    (2, (6, 5), 5, 1, 2, 0.3),
    (3, (4, 3, 4), 3, 2, 2, 0.3),
]


def submanifold_id(case):
    d, sp, f, cin, cout, density = case
    return f"d{d}-{'x'.join(map(str, sp))}-f{f}-c{cin}-c{cout}-p{density}"


@pytest.mark.parametrize("case", SUBMANIFOLD_CASES, ids=submanifold_id)
def test_submanifold_vjp(case):
    d, sp, f, cin, cout, density = case
    rng = np.random.default_rng(7)
    mask = rng.random((2,) + sp) < density
    mask[0, (0,) * d] = True  # an active site on the border
    ground = rng.standard_normal(cin)
    x = np.where(mask[:, None], rng.standard_normal((2, cin) + sp), ref._chan(ground, d))
    w = rng.standard_normal((f**d, cin, cout))
    b = rng.standard_normal(cout)
    # all entries of x independent, ground separately
    assert_vjp(
        lambda x, g, w, b: ref.submanifold_forward(x, mask, g, w, b, f),
        [x, ground, w, b],
        [0, 1, 2, 3],
        lambda x, g, w, b, u: ref.submanifold_backward(x, mask, g, w, b, f, u),
        seed=2,
    )

    # inactive entries tied to ground: total ground grad = grad_ground + folded inactive sum
    def tied_forward(xa, g):
        xt = np.where(mask[:, None], xa, ref._chan(g, d))
        return ref.submanifold_forward(xt, mask, g, w, b, f)

    def tied_backward(xa, g, u):
        xt = np.where(mask[:, None], xa, ref._chan(g, d))
        gx, gg, _, _ = ref.submanifold_backward(xt, mask, g, w, b, f, u)
        active, inactive_sum = ref.fold_ground_grad(gx, mask)
        return active, gg + inactive_sum

    assert_vjp(tied_forward, [x, ground], [0, 1], tied_backward, seed=3)


def test_submanifold_inactive_equals_ground_output():
    # no active sites: every output is g_out;
    # all sites active and ground 0: a zero-padded "same" convolution
    rng = np.random.default_rng(11)
    w = rng.standard_normal((9, 2, 3))
    b = rng.standard_normal(3)
    g = rng.standard_normal(2)
    x = np.broadcast_to(g.reshape(1, 2, 1, 1), (1, 2, 4, 5)).copy()
    y = ref.submanifold_forward(x, np.zeros((1, 4, 5), bool), g, w, b, 3)
    np.testing.assert_allclose(y, np.broadcast_to((b + g @ w.sum(0)).reshape(1, 3, 1, 1), y.shape))
    x = rng.standard_normal((1, 2, 4, 5))
    y = ref.submanifold_forward(x, np.ones((1, 4, 5), bool), np.zeros(2), w, b, 3)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    np.testing.assert_allclose(y, ref.conv_forward(xp, w, b, 3, 1))


POOL_CASES = [
    (1, (7,), 3, 2),
    (1, (6,), 2, 2),
    (2, (6, 6), 2, 2),
    (2, (7, 5), 3, 2),
    (2, (5, 5), 3, 1),
    (3, (4, 4, 4), 2, 2),
    (3, (5, 5, 3), 3, 1),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_maxpool_vjp(case):
    d, sp, f, s = case
    rng = np.random.default_rng(3)
    x = separated(rng, (2, 2) + sp)
    assert_vjp(
        lambda x: ref.maxpool_forward(x, f, s),
        [x],
        [0],
        lambda x, u: ref.maxpool_backward(x, f, s, u),
        seed=4,
        h=1e-5,
    )


@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_avgpool_vjp(case):
    d, sp, f, s = case
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3) + sp)
    assert_vjp(
        lambda x: ref.avgpool_forward(x, f, s),
        [x],
        [0],
        lambda x, u: ref.avgpool_backward(x, f, s, u),
        seed=6,
    )


@pytest.mark.parametrize("sp", [(5,), (3, 4), (2, 3, 2)], ids=shape_id)
def test_nin_vjp(sp):
    rng = np.random.default_rng(len(sp))
    x = rng.standard_normal((2, 3) + sp)
    w = rng.standard_normal((3, 4))
    b = rng.standard_normal(4)
    assert_vjp(ref.nin_forward, [x, w, b], [0, 1, 2], ref.nin_backward, seed=7)


@pytest.mark.parametrize("slope", [0.0, 0.1, 0.333], ids=lambda v: f"slope{v}")
def test_activation_vjp(slope):
    rng = np.random.default_rng(8)
    x = away_from_zero(rng, (2, 3, 4, 5))
    if slope == 0.0:
        assert_vjp(ref.relu_forward, [x], [0], ref.relu_backward, seed=9)
    assert_vjp(
        lambda x: ref.leaky_relu_forward(x, slope),
        [x],
        [0],
        lambda x, u: ref.leaky_relu_backward(x, slope, u),
        seed=9,
    )


@pytest.mark.parametrize("sp", [(7,), (4, 5), (3, 3, 3)], ids=shape_id)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batchnorm_vjp(sp, train):
    rng = np.random.default_rng(10 + len(sp))
    c = 3
    x = rng.standard_normal((2, c) + sp) * 2 + 1
    mask = rng.random((2,) + sp) < 0.5
    mask[0, (0,) * len(sp)] = True
    mask[1, (1,) * len(sp)] = True
    gamma = rng.standard_normal(c)
    beta = rng.standard_normal(c)
    eps = 1e-3
    kw = dict(train=train)
    if not train:
        kw.update(running_mean=rng.standard_normal(c), running_var=rng.random(c) + 0.5)

    def fwd(x, gamma, beta):
        out = ref.batchnorm_forward(x, mask, gamma, beta, eps, **kw)
        return out[0] if train else out

    def bwd(x, gamma, beta, u):
        return ref.batchnorm_backward(x, mask, gamma, beta, eps, u, **kw)

    assert_vjp(fwd, [x, gamma, beta], [0, 1, 2], bwd, seed=12)


def test_batchnorm_stats_active_only():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((3, 2, 4, 4))
    mask = rng.random((3, 4, 4)) < 0.4
    _, mean, var = ref.batchnorm_forward(x, mask, np.ones(2), np.zeros(2), 1e-5, train=True)
    active = np.moveaxis(x, 1, -1)[mask]  # (n_active, C)
    np.testing.assert_allclose(mean, active.mean(0))
    np.testing.assert_allclose(var, active.var(0))
    # changing inactive entries changes their outputs but not the statistics
    x2 = np.where(mask[:, None], x, 50.0)
    _, mean2, var2 = ref.batchnorm_forward(x2, mask, np.ones(2), np.zeros(2), 1e-5, train=True)
    np.testing.assert_allclose(mean2, mean)
    np.testing.assert_allclose(var2, var)


def test_linear_vjp():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((3, 4))
    w = rng.standard_normal((4, 5))
    b = rng.standard_normal(5)
    assert_vjp(ref.linear_forward, [x, w, b], [0, 1, 2], ref.linear_backward, seed=15)


@pytest.mark.parametrize("smoothing", [0.0, 0.1], ids=lambda v: f"ls{v}")
def test_cross_entropy_vjp(smoothing):
    rng = np.random.default_rng(16)
    logits = rng.standard_normal((4, 5)) * 3
    labels = np.array([0, 4, 2, 2])
    assert_vjp(
        lambda z: np.asarray(ref.cross_entropy_forward(z, labels, smoothing)),
        [logits],
        [0],
        lambda z, u: ref.cross_entropy_backward(z, labels, smoothing) * u,
        seed=17,
    )


# --------------------------------------------------------------------------
# DeepCNet / DeepCNiN
# --------------------------------------------------------------------------


def size_chain(l):
    """Independent arithmetic: sizes after conv3, then (pool2/2, conv2) x l."""
    n = 3 * 2**l
    sizes = [n]
    n = n - 3 + 1
    sizes.append(n)
    for _ in range(l):
        assert (n - 2) % 2 == 0
        n = (n - 2) // 2 + 1
        sizes.append(n)
        n = n - 2 + 1
        sizes.append(n)
    return sizes


@pytest.mark.parametrize("l", [1, 2, 3, 4, 5], ids=lambda v: f"l{v}")
def test_deepcnet_size_chain(l):
    assert ref.deepcnet_input_size(l) == 3 * 2**l
    sizes = size_chain(l)
    assert sizes[-1] == 1
    if l == 2:
        assert sizes == [12, 10, 5, 4, 2, 1]
    # the layers really produce this chain (2D, k=1, one sample)
    n = ref.deepcnet_input_size(l)
    rng = np.random.default_rng(l)
    h = rng.standard_normal((1, 1, n, n))
    observed = [n]
    for spec in ref.deepcnet_layers(l):
        if spec[0] in ("conv", "maxpool"):
            f, s = spec[1], spec[2]
            if spec[0] == "conv":
                h = ref.conv_forward(h, np.ones((f * f, h.shape[1], 1)), np.zeros(1), f, s)
            else:
                h = ref.maxpool_forward(h, f, s)
            assert h.shape[2] == h.shape[3]
            observed.append(h.shape[2])
    assert observed == sizes
    k, ncls = 1, 3
    for nin, shapes_fn, fwd in [
        (False, ref.deepcnet_param_shapes, ref.deepcnet_forward),
        (True, ref.deepcnin_param_shapes, ref.deepcnin_forward),
    ]:
        shapes = shapes_fn(l, k, 2, 1, ncls)
        assert len(shapes) == 2 * (l + 1) * (2 if nin else 1) + 2
        params = [rng.standard_normal(sh) * 0.3 for sh in shapes]
        y = fwd(rng.standard_normal((2, 1, n, n)), params, l, 0.0)
        assert y.shape == (2, ncls)
    with pytest.raises(ValueError):
        ref.deepcnet_forward(np.zeros((1, 1, n + 1, n + 1)), params, l, 0.0)


def test_deepcnet_param_shapes_widths():
    assert ref.deepcnet_param_shapes(2, 4, 2, 3, 10) == [
        (9, 3, 4), (4,), (4, 4, 8), (8,), (4, 8, 12), (12,), (12, 10), (10,)
    ]
    assert ref.deepcnin_param_shapes(1, 2, 2, 1, 5) == [
        (9, 1, 2), (2,), (2, 2), (2,), (4, 2, 4), (4,), (4, 4), (4,), (4, 5), (5,)
    ]
    assert ref.deepcnet_layers(1, 0.1) == [
        ("conv", 3, 1), ("act", 0.1), ("maxpool", 2, 2), ("conv", 2, 1), ("act", 0.1), ("linear",)
    ]
    assert ref.deepcnin_layers(1) == [
        ("conv", 3, 1), ("act", 0.0), ("maxpool", 2, 2), ("nin",), ("act", 0.0),
        ("conv", 2, 1), ("act", 0.0), ("nin",), ("act", 0.0), ("linear",),
    ]


def test_deepcnet_l1_explicit_composition():
    """DeepCNet(1) written out by hand from the per-layer functions."""
    rng = np.random.default_rng(20)
    x = rng.standard_normal((2, 1, 6, 6))
    p = [rng.standard_normal(sh) for sh in ref.deepcnet_param_shapes(1, 2, 2, 1, 3)]
    h = ref.leaky_relu_forward(ref.conv_forward(x, p[0], p[1], 3, 1), 0.1)
    h = ref.maxpool_forward(h, 2, 2)
    h = ref.leaky_relu_forward(ref.conv_forward(h, p[2], p[3], 2, 1), 0.1)
    assert h.shape == (2, 4, 1, 1)
    expected = ref.linear_forward(h[:, :, 0, 0], p[4], p[5])
    np.testing.assert_allclose(ref.deepcnet_forward(x, p, 1, 0.1), expected)


@pytest.mark.parametrize(
    "net,l,d,slope",
    [
        ("deepcnet", 1, 2, 0.0),
        ("deepcnet", 2, 2, 0.1),
        ("deepcnet", 1, 3, 0.2),
        ("deepcnin", 1, 2, 0.1),
        ("deepcnin", 2, 1, 0.0),
    ],
    ids=lambda v: str(v),
)
def test_network_vjp(net, l, d, slope):
    rng = np.random.default_rng(21 + l + d)
    k, cin, ncls = 2, 2, 3
    shapes_fn = ref.deepcnet_param_shapes if net == "deepcnet" else ref.deepcnin_param_shapes
    fwd = ref.deepcnet_forward if net == "deepcnet" else ref.deepcnin_forward
    bwd = ref.deepcnet_backward if net == "deepcnet" else ref.deepcnin_backward
    params = [rng.standard_normal(sh) * 0.5 for sh in shapes_fn(l, k, d, cin, ncls)]
    n = ref.deepcnet_input_size(l)
    x = rng.standard_normal((2, cin) + (n,) * d)
    npar = len(params)

    def f(x, *ps):
        return fwd(x, list(ps), l, slope)

    def b(x, *ps_and_u):
        *ps, u = ps_and_u
        gx, gps = bwd(x, list(ps), l, slope, u)
        assert len(gps) == npar
        return (gx, *gps)

    assert_vjp(f, [x, *params], list(range(1 + npar)), b, seed=22, h=1e-6, rtol=1e-6)


def test_sequential_with_loss_end_to_end():
    """Chain rule through the loss: d loss / d params from sequential_backward with the CE gradient.
    """
    rng = np.random.default_rng(30)
    layers = [("conv", 3, 1), ("act", 0.1), ("avgpool", 2, 2), ("nin",), ("act", 0.0), ("linear",)]
    params = [
        rng.standard_normal((9, 1, 2)), rng.standard_normal(2),
        rng.standard_normal((2, 2)), rng.standard_normal(2),
        rng.standard_normal((2 * 2 * 2, 4)), rng.standard_normal(4),
    ]
    x = rng.standard_normal((3, 1, 6, 6))
    labels = np.array([1, 3, 0])

    def loss(x, *ps):
        logits = ref.sequential_forward(x, layers, list(ps))
        return np.asarray(ref.cross_entropy_forward(logits, labels))

    def grads(x, *ps_and_u):
        *ps, u = ps_and_u
        logits = ref.sequential_forward(x, layers, list(ps))
        gz = ref.cross_entropy_backward(logits, labels) * u
        gx, gps = ref.sequential_backward(x, layers, list(ps), gz)
        return (gx, *gps)

    assert_vjp(loss, [x, *params], list(range(1 + len(params))), grads, seed=31)


# --------------------------------------------------------------------------
# zero-ground semantics (ground_state=False)
# --------------------------------------------------------------------------


def test_window_mask_hand():
    mask = np.array([[True, False, False, False, False, True]])
    np.testing.assert_array_equal(ref.window_mask(mask, 2, 2), [[True, False, True]])
    np.testing.assert_array_equal(ref.window_mask(mask, 3, 1), [[True, False, False, True]])
    # stride beyond the filter: sites between windows are in none
    np.testing.assert_array_equal(ref.window_mask(mask[:, 1:5], 1, 3), [[False, False]])


def test_conv_zero_1d_hand():
    # sites 0 and 2 active (1 and 3); the inactive entry (99) is 0 to the layer
    x = np.array([[[1.0, 99.0, 3.0, 99.0]]])
    mask = np.array([[True, False, True, False]])
    w = np.array([2.0, -1.0]).reshape(2, 1, 1)
    b = np.array([0.5])
    y = ref.conv_zero_forward(x, mask, w, b, 2, 1)
    # every window holds an active site: .5 + 2*1 - 0, .5 + 0 - 3, .5 + 2*3 - 0
    np.testing.assert_allclose(y, [[[2.5, -2.5, 6.5]]])
    y = ref.conv_zero_forward(x, mask, w, b, 2, 2)
    np.testing.assert_allclose(y, [[[2.5, 6.5]]])
    # an output whose window holds no active site is 0: no bias there
    x = np.array([[[1.0, 99.0, 99.0, 3.0]]])
    mask = np.array([[True, False, False, True]])
    np.testing.assert_allclose(ref.conv_zero_forward(x, mask, w, b, 2, 1), [[[2.5, 0.0, -2.5]]])
    # and gradient arriving there goes nowhere
    gx, gw, gb = ref.conv_zero_backward(x, mask, w, b, 2, 1, np.array([[[1.0, 5.0, 10.0]]]))
    np.testing.assert_allclose(gx, [[[2.0, 0.0, 0.0, -10.0]]])
    np.testing.assert_allclose(gw.ravel(), [1.0, 30.0])
    np.testing.assert_allclose(gb, [11.0])


def test_submanifold_zero_1d_hand():
    # the hand case of test_submanifold_1d_hand without a ground: inactive and outside = 0
    mask = np.array([[True, False, False, True, False]])
    x = np.array([3.0, 2.0, 2.0, 7.0, 2.0]).reshape(1, 1, 5)
    w = np.array([1.0, 10.0, 100.0]).reshape(3, 1, 1)
    b = np.array([0.5])
    y = ref.submanifold_zero_forward(x, mask, w, b, 3)
    np.testing.assert_allclose(y, [[[30.5, 0.0, 0.0, 70.5, 0.0]]])
    gx, gw, gb = ref.submanifold_zero_backward(x, mask, w, b, 3, np.array([[[1.0, 5, 5, 2, 5]]]))
    np.testing.assert_allclose(gx, [[[10.0, 0.0, 0.0, 20.0, 0.0]]])
    np.testing.assert_allclose(gw.ravel(), [0.0, 3.0 + 14.0, 0.0])
    np.testing.assert_allclose(gb, [3.0])


def test_pooling_zero_1d_hand():
    x = np.array([[[-5.0, 9.0, -1.0, -2.0, 4.0, 8.0]]])
    mask = np.array([[True, False, True, True, False, False]])
    # max over the active sites only (may be negative); no active site: 0
    np.testing.assert_allclose(ref.maxpool_zero_forward(x, mask, 2, 2), [[[-5.0, -1.0, 0.0]]])
    gx = ref.maxpool_zero_backward(x, mask, 2, 2, np.array([[[1.0, 2.0, 3.0]]]))
    np.testing.assert_allclose(gx, [[[1.0, 0.0, 2.0, 0.0, 0.0, 0.0]]])
    # overlapping windows, ties among active sites go to the first
    x2 = np.array([[[1.0, 1.0, 0.5]]])
    m2 = np.ones((1, 3), bool)
    gx = ref.maxpool_zero_backward(x2, m2, 2, 1, np.array([[[1.0, 2.0]]]))
    np.testing.assert_allclose(gx, [[[1.0, 2.0, 0.0]]])
    # average: the whole window's mean, inactive sites counting as 0
    np.testing.assert_allclose(ref.avgpool_zero_forward(x, mask, 2, 2), [[[-2.5, -1.5, 0.0]]])
    np.testing.assert_allclose(ref.avgpool_zero_forward(x, mask, 3, 3), [[[-2.0, -2 / 3]]])
    gx = ref.avgpool_zero_backward(x, mask, 2, 2, np.array([[[1.0, 2.0, 3.0]]]))
    np.testing.assert_allclose(gx, [[[0.5, 0.0, 1.0, 1.0, 0.0, 0.0]]])


def test_nin_and_batchnorm_zero_hand():
    x = np.array([1.0, 3.0, 100.0, -50.0]).reshape(1, 1, 4)
    mask = np.array([[True, True, False, False]])
    y = ref.nin_zero_forward(x, mask, np.array([[2.0, -1.0]]), np.array([1.0, 0.5]))
    np.testing.assert_allclose(y, [[[3.0, 7.0, 0.0, 0.0], [-0.5, -2.5, 0.0, 0.0]]])
    gx, gw, gb = ref.nin_zero_backward(x, mask, np.array([[2.0, -1.0]]), np.array([1.0, 0.5]),
                                       np.ones((1, 2, 4)))
    np.testing.assert_allclose(gx, [[[1.0, 1.0, 0.0, 0.0]]])
    np.testing.assert_allclose(gw, [[4.0, 4.0]])
    np.testing.assert_allclose(gb, [2.0, 2.0])
    gamma, beta = np.array([2.0]), np.array([1.0])
    y, mean, var = ref.batchnorm_zero_forward(x, mask, gamma, beta, 0.0, train=True)
    np.testing.assert_allclose(y, [[[-1.0, 3.0, 0.0, 0.0]]])
    np.testing.assert_allclose([mean[0], var[0]], [2.0, 1.0])
    y = ref.batchnorm_zero_forward(x, mask, gamma, beta, 0.0, train=False,
                                   running_mean=np.array([1.0]), running_var=np.array([4.0]))
    np.testing.assert_allclose(y, [[[1.0, 3.0, 0.0, 0.0]]])
    gx, gg, gb = ref.batchnorm_zero_backward(x, mask, gamma, beta, 0.0, np.ones((1, 1, 4)),
                                             train=False, running_mean=np.array([1.0]),
                                             running_var=np.array([4.0]))
    np.testing.assert_allclose(gx, [[[1.0, 1.0, 0.0, 0.0]]])
    np.testing.assert_allclose(gg, [0.0 + 1.0])
    np.testing.assert_allclose(gb, [2.0])


def _zero_mask(rng, shape, density=0.4):
    mask = rng.random(shape) < density
    mask[(0,) * len(shape)] = True
    return mask


@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv_zero_vjp(case):
    d, sp, f, s, cin, cout = case
    rng = np.random.default_rng(100 + CONV_CASES.index(case))
    mask = _zero_mask(rng, (2,) + sp)
    x = rng.standard_normal((2, cin) + sp)
    w = rng.standard_normal((f**d, cin, cout))
    b = rng.standard_normal(cout)
    assert_vjp(lambda x, w, b: ref.conv_zero_forward(x, mask, w, b, f, s), [x, w, b],
               [0, 1, 2], lambda x, w, b, u: ref.conv_zero_backward(x, mask, w, b, f, s, u),
               seed=41)


@pytest.mark.parametrize("case", SUBMANIFOLD_CASES, ids=submanifold_id)
def test_submanifold_zero_vjp(case):
    d, sp, f, cin, cout, density = case
    rng = np.random.default_rng(42)
    mask = _zero_mask(rng, (2,) + sp, density)
    x = rng.standard_normal((2, cin) + sp)
    w = rng.standard_normal((f**d, cin, cout))
    b = rng.standard_normal(cout)
    assert_vjp(lambda x, w, b: ref.submanifold_zero_forward(x, mask, w, b, f), [x, w, b],
               [0, 1, 2], lambda x, w, b, u: ref.submanifold_zero_backward(x, mask, w, b, f, u),
               seed=43)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("case", POOL_CASES, ids=case_id)
def test_pooling_zero_vjp(case, kind):
    d, sp, f, s = case
    rng = np.random.default_rng(44)
    mask = _zero_mask(rng, (2,) + sp)
    x = separated(rng, (2, 2) + sp)
    fwd = ref.maxpool_zero_forward if kind == "max" else ref.avgpool_zero_forward
    bwd = ref.maxpool_zero_backward if kind == "max" else ref.avgpool_zero_backward
    assert_vjp(lambda x: fwd(x, mask, f, s), [x], [0], lambda x, u: bwd(x, mask, f, s, u),
               seed=45, h=1e-5)


@pytest.mark.parametrize("sp", [(5,), (3, 4), (2, 3, 2)], ids=shape_id)
def test_nin_zero_vjp(sp):
    rng = np.random.default_rng(46)
    mask = _zero_mask(rng, (2,) + sp)
    x = rng.standard_normal((2, 3) + sp)
    w = rng.standard_normal((3, 4))
    b = rng.standard_normal(4)
    assert_vjp(lambda x, w, b: ref.nin_zero_forward(x, mask, w, b), [x, w, b], [0, 1, 2],
               lambda x, w, b, u: ref.nin_zero_backward(x, mask, w, b, u), seed=47)


@pytest.mark.parametrize("sp", [(7,), (4, 5), (3, 3, 3)], ids=shape_id)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batchnorm_zero_vjp(sp, train):
    rng = np.random.default_rng(48 + len(sp))
    mask = _zero_mask(rng, (2,) + sp, 0.5)
    mask[1, (1,) * len(sp)] = True
    x = rng.standard_normal((2, 3) + sp) * 2 + 1
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    kw = dict(train=train)
    if not train:
        kw.update(running_mean=rng.standard_normal(3), running_var=rng.random(3) + 0.5)

    def fwd(x, gamma, beta):
        out = ref.batchnorm_zero_forward(x, mask, gamma, beta, 1e-3, **kw)
        return out[0] if train else out

    assert_vjp(fwd, [x, gamma, beta], [0, 1, 2],
               lambda x, gamma, beta, u: ref.batchnorm_zero_backward(x, mask, gamma, beta,
                                                                     1e-3, u, **kw), seed=49)


# --------------------------------------------------------------------------
# network oracle (both modes, mask and ground carried along)
# --------------------------------------------------------------------------


def _net_case(rng, d, gs, *, subm=True, bn=True, linear=False):
    """A small network touching every layer kind, its params and an input."""
    sp = (14,) * d if d < 3 else (10,) * 3
    layers = [("act", 0.2), ("conv", 3, 1, gs)]
    cin, c = 2, 3
    shapes = [(3**d, cin, c), (c,)]
    if subm:
        layers.append(("subm", 3, gs))
        shapes += [(3**d, c, c), None]
    layers += [("maxpool", 2, 2, gs), ("act", 0.0), ("nin", not gs), ("act", 0.1)]
    shapes += [(c, c), (c,)]
    if bn:
        layers.append(("bn", gs, 1e-2, None, None))
        shapes += [(c,), (c,)]
    layers += [("avgpool", 2, 1, gs), ("conv", 1, 2, gs)]
    shapes += [(1, c, 2), (2,)]
    out_sp = (sp[0] - 2) // 2 - 1
    out_sp = (out_sp - 1) // 2 + 1
    if linear:
        layers.append(("linear",))
        shapes += [(2 * out_sp**d, 4), (4,)]
    params = [None if sh is None else rng.standard_normal(sh) * 0.7 for sh in shapes]
    mask = rng.random((2,) + sp) < 0.25
    if d < 3:   # active sites in a corner only: inactive sites at every layer
        mask[(slice(None),) + (slice(6, None),) * d] = False
    mask[0, (1,) * d] = True
    mask[1, (2,) * d] = True
    x = rng.standard_normal((2, cin) + sp)
    ground = rng.standard_normal(cin)
    return layers, params, x, mask, ground


@pytest.mark.parametrize("gs", [True, False], ids=["ground", "zero"])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_net_oracle_vjp(d, gs):
    """net_backward against central differences of net_forward: the active features, the
    input ground (tied to every inactive entry) and every parameter."""
    rng = np.random.default_rng(50 + d)
    layers, params, x, mask, ground = _net_case(rng, d, gs, linear=d == 2)
    assert ref.net_branch_margin(x, mask, ground, layers, params) > 1e-6   # no kink crossed
    live = [i for i, p in enumerate(params) if p is not None]

    def fwd(x, g, *ps):
        full = list(params)
        for i, p in zip(live, ps, strict=True):
            full[i] = p
        return ref.net_forward(x, mask, g, layers, full)[0]

    def bwd(x, g, *ps_and_u):
        *ps, u = ps_and_u
        full = list(params)
        for i, p in zip(live, ps, strict=True):
            full[i] = p
        gx, gg, gps = ref.net_backward(x, mask, g, layers, full, u)
        assert all((gp is None) == (p is None) for gp, p in zip(gps, full, strict=True))
        assert (gx[np.broadcast_to(~mask[:, None], gx.shape)] == 0).all()
        return (gx, gg, *[gps[i] for i in live])

    args = [x, ground, *[params[i] for i in live]]
    assert_vjp(fwd, args, list(range(len(args))), bwd, seed=51, h=1e-6, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("d", [1, 2])
def test_net_oracle_ground_mode_is_the_dense_network(d):
    """Without submanifold convolutions and batch norm, the ground-state network is the plain
    dense network of the input's dense view: values at every site, and its ground is the
    value of its inactive sites."""
    rng = np.random.default_rng(60 + d)
    layers, params, x, mask, ground = _net_case(rng, d, True, subm=False, bn=False)
    layers = [("nin", True) if spec == ("nin", False) else spec for spec in layers]
    dense_layers = [spec[:-1] if spec[0] in ("conv", "maxpool", "avgpool", "nin") else spec
                    for spec in layers]
    xd = np.where(mask[:, None], x, ref._chan(ground, d))
    y, y_mask, y_ground = ref.net_forward(x, mask, ground, layers, params)
    np.testing.assert_allclose(y, ref.sequential_forward(xd, dense_layers, params))
    assert not y_mask.all() and y_mask.any()
    inactive = np.moveaxis(y, 1, -1)[~y_mask]
    np.testing.assert_allclose(inactive, np.broadcast_to(y_ground, inactive.shape))
    # and gradients: the dense network's input gradient, split into sites and ground
    u = rng.standard_normal(y.shape)
    gx, gg, gps = ref.net_backward(x, mask, ground, layers, params, u)
    gxd, gpd = ref.sequential_backward(xd, dense_layers, params, u)
    active, inactive_sum = ref.fold_ground_grad(gxd, mask)
    np.testing.assert_allclose(gx, active)
    np.testing.assert_allclose(gg, inactive_sum)
    for a, b in zip(gps, gpd, strict=True):
        np.testing.assert_allclose(a, b)


def test_net_oracle_zero_mode_ignores_the_input_ground():
    rng = np.random.default_rng(70)
    layers, params, x, mask, ground = _net_case(rng, 2, False)
    layers = [spec for spec in layers if spec[0] != "act" or spec is not layers[0]]
    y0, m0, g0 = ref.net_forward(x, mask, np.zeros(2), layers, params)
    y1, m1, g1 = ref.net_forward(x + 50 * ~mask[:, None], mask, ground, layers, params)
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(m0, m1)
    np.testing.assert_array_equal(g0, 0)
    np.testing.assert_array_equal(np.moveaxis(y1, 1, -1)[~m1], 0)
    _, gg, _ = ref.net_backward(x, mask, ground, layers, params, rng.standard_normal(y1.shape))
    np.testing.assert_array_equal(gg, 0)
