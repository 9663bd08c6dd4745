"""Per-site losses and metrics: site_cross_entropy and site_accuracy, against the dense
oracle (itself checked by finite differences) and hand-computed cases, on both devices."""
import math

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn.metrics import site_accuracy
from tests import dense_reference as ref
from tests.sparse_helpers import assert_close, np_, random_sparse
from tests.test_dense_reference import assert_vjp


# -- the oracle --------------------------------------------------------------------------------
@pytest.mark.parametrize("ignore", [None, 2])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_oracle_site_cross_entropy_vjp(ignore, eps):
    rng = np.random.default_rng(3)
    z = rng.standard_normal((7, 4))
    lab = np.array([0, 2, 3, 2, 1, 0, 3])
    assert_vjp(lambda z: np.asarray(ref.site_cross_entropy_forward(z, lab, ignore, eps)), [z],
               [0], lambda z, u: ref.site_cross_entropy_backward(z, lab, ignore, eps) * u,
               seed=1)


def test_oracle_site_cross_entropy_hand():
    z = np.zeros((3, 2))
    # uniform logits: log 2 per scored site; the ignored one changes nothing
    assert math.isclose(ref.site_cross_entropy_forward(z, [0, 1, -1], -1), math.log(2))
    g = ref.site_cross_entropy_backward(z, [0, 1, -1], -1)
    np.testing.assert_allclose(g, [[-0.25, 0.25], [0.25, -0.25], [0, 0]])


# -- the library vs the oracle ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ignore", [None, -100])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("d,density", [(1, 1.0), (2, 0.3), (3, "one")])
def test_site_cross_entropy_matches_dense(device, rng, dtype, ignore, eps, d, density):
    C = 5
    x = random_sparse(rng, 2, (4,) * d, C, density, dtype, device=device)
    n = x.n_active
    lab = rng.integers(0, C, n)
    if ignore is not None and n > 1:
        lab[rng.random(n) < 0.4] = ignore
        lab[0] = 1                                # at least one labelled site
    labels = scn.backend.to_device(lab, device) if device != "cpu" else lab
    loss = scn.site_cross_entropy(x, labels, ignore_index=ignore, label_smoothing=eps)
    f = np_(x.features)
    assert loss.shape == () and loss.dtype == dtype and loss.device == device
    assert_close(loss.numpy(), ref.site_cross_entropy_forward(f, lab, ignore, eps), dtype)
    loss.backward()
    assert_close(x.grad, ref.site_cross_entropy_backward(f, lab, ignore, eps), dtype)
    np.testing.assert_array_equal(np_(x.ground_grad), np.zeros(C))   # the ground: none


def test_site_cross_entropy_flows_to_parameters(device, rng):
    """Through a layer: the gradient of the ground is zero, so the parameters get only the
    active sites' share (compared with the oracle's dense chain)."""
    x = random_sparse(rng, 1, (5, 5), 3, 0.4, np.float64, device=device)
    nin = scn.NetworkInNetwork(3, 4, dtype=np.float64, seed=1).to(device)
    nin.bias.data = nin.bias.data + 0.5
    lab = rng.integers(0, 4, x.n_active)
    y = nin(x)
    scn.site_cross_entropy(y, lab).backward()
    W, f = np_(nin.weight.data), np_(x.features)
    gy = ref.site_cross_entropy_backward(f @ W + np_(nin.bias.data), lab)
    assert_close(nin.weight.grad, f.T @ gy, np.float64)
    assert_close(nin.bias.grad, gy.sum(0), np.float64)
    np.testing.assert_allclose(np_(x.ground_grad), 0.0)


def test_site_cross_entropy_hand(device):
    c = np.array([[0, 0], [0, 2], [0, 3]], np.int32)
    f = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    dev = (lambda a: scn.backend.to_device(a, device)) if device != "cpu" else (lambda a: a)
    x = scn.SparseTensor(dev(c), dev(f), (4,), requires_grad=True, ground=dev(np.ones(2)))
    loss = scn.site_cross_entropy(x, np.array([1, 0, 7]), ignore_index=7)
    want = (math.log(2) + math.log(1 + math.exp(-2))) / 2
    assert math.isclose(loss.item(), want, rel_tol=1e-12)
    loss.backward()
    s = 1 / (1 + math.exp(-2))
    np.testing.assert_allclose(np_(x.grad), [[0.25, -0.25], [(s - 1) / 2, (1 - s) / 2],
                                            [0, 0]], rtol=1e-12, atol=1e-15)


def test_site_cross_entropy_deterministic(device, rng):
    x = random_sparse(rng, 3, (16, 16), 6, 0.5, np.float32, device=device)
    lab = rng.integers(0, 6, x.n_active)
    a = scn.site_cross_entropy(x, lab).numpy()
    b = scn.site_cross_entropy(x, lab).numpy()
    assert a.tobytes() == b.tobytes()


def test_site_cross_entropy_bad_input(rng):
    x = random_sparse(rng, 1, (4, 4), 3, 0.5)
    n = x.n_active
    with pytest.raises(TypeError, match="logits must be a SparseTensor"):
        scn.site_cross_entropy(x.to_dense(), np.zeros(n, int))
    with pytest.raises(TypeError, match="labels must be integers"):
        scn.site_cross_entropy(x, np.zeros(n))
    with pytest.raises(ValueError, match=r"labels must have shape \(n_active,\)"):
        scn.site_cross_entropy(x, np.zeros(n + 1, int))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        scn.site_cross_entropy(x, np.full(n, 3))
    with pytest.raises(ValueError, match="no labelled active site"):
        scn.site_cross_entropy(x, np.full(n, -1), ignore_index=-1)
    with pytest.raises(ValueError, match="label_smoothing"):
        scn.site_cross_entropy(x, np.zeros(n, int), label_smoothing=1.0)
    with pytest.raises(TypeError, match="ignore_index"):
        scn.site_cross_entropy(x, np.zeros(n, int), ignore_index=0.5)
    empty = random_sparse(rng, 1, (4, 4), 3, 0.0)
    with pytest.raises(ValueError, match="no labelled active site"):
        scn.site_cross_entropy(empty, np.zeros(0, int))


# -- site_accuracy -------------------------------------------------------------------------------
def test_site_accuracy(device, rng):
    x = random_sparse(rng, 2, (6, 6), 4, 0.5, np.float32, device=device)
    f = np_(x.features)
    lab = rng.integers(0, 4, x.n_active)
    assert site_accuracy(x, lab) == pytest.approx(np.mean(f.argmax(1) == lab))
    assert site_accuracy(x, lab, topk=4) == 1.0
    lab2 = lab.copy()
    lab2[::2] = -1
    keep = lab2 != -1
    want = np.mean(f[keep].argmax(1) == lab2[keep])
    assert site_accuracy(x, lab2, ignore_index=-1) == pytest.approx(want)
    dev_lab = scn.backend.to_device(lab, device) if device != "cpu" else lab
    assert site_accuracy(x.features, dev_lab) == site_accuracy(x, lab)


def test_site_accuracy_hand_and_errors():
    z = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [3.0, 0.0]])
    assert site_accuracy(z, np.array([1, 1, 0, 9]), ignore_index=9) == 1 / 3   # tie: wrong
    with pytest.raises(ValueError, match="no labelled site"):
        site_accuracy(z, np.full(4, 9), ignore_index=9)
    with pytest.raises(ValueError, match="shape mismatch"):
        site_accuracy(z, np.zeros(3, int))
    with pytest.raises(TypeError, match="labels must be an integer"):
        site_accuracy(z, np.zeros(4))
    with pytest.raises(ValueError, match="0 sites"):
        site_accuracy(np.zeros((0, 2)), np.zeros(0, int))
