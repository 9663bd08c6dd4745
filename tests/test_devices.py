"""Device "cuda" against the CPU: the same geometry exactly, the same values and gradients to
tolerance, bitwise the same result on a rerun and with the simulation's schedule reversed;
training on the device; device moves of tensors, models, optimizer state and checkpoints;
mixing devices is an error; the host copies one training step makes.

Where there is no GPU these run in the CUDA simulation (the ``device`` fixture, or the
``cuda`` fixture below, sets SPARSECNN_CUDA_SIM=1), as CI runs them."""
from __future__ import annotations

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import backend
from sparsecnn import train as T
from sparsecnn._gpu import _geometry
from tests.conftest import CUDA_MODE, CUDA_WHY
from tests.sparse_helpers import np_, random_sparse

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(CUDA_MODE is None, reason=str(CUDA_WHY))]


@pytest.fixture
def cuda(monkeypatch):
    if CUDA_MODE == "sim":
        monkeypatch.setenv("SPARSECNN_CUDA_SIM", "1")
    return "cuda"


def _rulebook_arrays(rb):
    return [np_(a) for a in (rb.in_idx, rb.out_idx, rb.offsets)]


@pytest.mark.parametrize("d,f,s", [(1, 3, 2), (2, 2, 2), (2, 3, 1), (3, 2, 1), (3, 3, 3)])
@pytest.mark.parametrize("density", [0.0, "one", 0.2, 1.0])
def test_geometry_is_the_cpus_exactly(d, f, s, density, cuda, rng):
    n = {1: 11, 2: 7, 3: 5}[d] if s != 3 else 6
    n = f + s * ((n - f) // s)
    x = random_sparse(rng, 3, (n,) * d, 1, density, np.float32)
    xc = x.to(cuda)
    rb, out = x.geometry.conv(f, s)
    rbc, outc = xc.geometry.conv(f, s)
    assert outc.device == "cuda" and backend.device_of(rbc.in_idx) == "cuda"
    np.testing.assert_array_equal(np_(outc.coords), out.coords)
    for a, b in zip(_rulebook_arrays(rbc), _rulebook_arrays(rb), strict=True):
        np.testing.assert_array_equal(a, b)
    if f % 2:
        sub, subc = x.geometry.submanifold(f), xc.geometry.submanifold(f)
        for a, b in zip(_rulebook_arrays(subc), _rulebook_arrays(sub), strict=True):
            np.testing.assert_array_equal(a, b)


def _net(dtype, seed=0):
    return scn.Sequential(
        scn.SubmanifoldConvolution(2, 4, 3, dtype=dtype, seed=seed), scn.BatchNorm(4, dtype=dtype),
        scn.LeakyReLU(1 / 3), scn.Convolution(4, 6, 2, dtype=dtype, seed=seed + 1),
        scn.MaxPooling(2), scn.ReLU(), scn.AveragePooling(2, 1),
        scn.NetworkInNetwork(6, 3, dtype=dtype, seed=seed + 2), scn.SparseToDense())


def _step(device, dtype, x_host, G):
    """Forward and backward of _net on ``device``: (output, input grads, parameter grads)."""
    net = _net(dtype).to(device)
    x = scn.SparseTensor(backend.to_device(x_host.coords, device),
                         backend.to_device(x_host.features, device), x_host.spatial_shape,
                         x_host.batch_size, requires_grad=True,
                         ground=backend.to_device(x_host.ground, device))
    y = net(x)
    y.backward(backend.to_device(G, device))
    return ([np_(y.data), np_(x.grad), np_(x.ground_grad)]
            + [np_(p.grad) for p in net.parameters()])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_network_on_the_device_equals_cpu_and_itself(dtype, cuda, rng, monkeypatch):
    x = random_sparse(rng, 2, (11, 11), 2, 0.3, dtype, requires_grad=False)
    G = rng.standard_normal((2, 3, 4, 4)).astype(dtype)
    on_cpu = _step("cpu", dtype, x, G)
    on_gpu = _step(cuda, dtype, x, G)
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-10)
    for a, b in zip(on_gpu, on_cpu, strict=True):
        np.testing.assert_allclose(a, b, **tol)
    again = _step(cuda, dtype, x, G)               # bitwise the same on a rerun
    for a, b in zip(again, on_gpu, strict=True):
        np.testing.assert_array_equal(a, b)
    if CUDA_MODE == "sim":                          # and with the schedule reversed
        monkeypatch.setenv("SPARSECNN_CUDA_SIM_REVERSE", "1")
        rev = _step(cuda, dtype, x, G)
        for a, b in zip(rev, on_gpu, strict=True):
            np.testing.assert_array_equal(a, b)


def test_tensors_built_from_device_arrays_stay_there(cuda, rng):
    c = np.array([[0, 1, 2], [1, 0, 0], [0, 3, 3]], np.int32)
    f = rng.standard_normal((3, 2)).astype(np.float32)
    before = dict(backend.transfers)
    x = scn.SparseTensor(backend.to_device(c, cuda), backend.to_device(f, cuda), (4, 4))
    assert x.device == "cuda" and backend.device_of(x.coords) == "cuda"
    assert x.batch_size == 2 and backend.device_of(x.geometry.table[0]) == "cuda"
    # the two arrays and the shape go there; two small reads come back: the ranges and
    # finiteness, and the hash's count of distinct sites
    assert backend.transfers["to_device"] - before.get("to_device", 0) == 3
    assert backend.transfers["to_host"] - before.get("to_host", 0) == 2
    np.testing.assert_array_equal(x.to("cpu").coords, c)
    # bad device input gets the host checks' messages
    bad = c.copy()
    bad[1, 2] = 4
    with pytest.raises(ValueError, match=r"coords\[1\] = \[1, 0, 4\] is outside the grid"):
        scn.SparseTensor(backend.to_device(bad, cuda), backend.to_device(f, cuda), (4, 4))
    nan = f.copy()
    nan[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or Inf \(first at row 2\)"):
        scn.SparseTensor(backend.to_device(c, cuda), backend.to_device(nan, cuda), (4, 4))
    with pytest.raises(ValueError, match=r"coords are on 'cuda' but features on 'cpu'"):
        scn.SparseTensor(backend.to_device(c, cuda), f, (4, 4))
    # duplicates are summed, as on the host
    dup = np.concatenate([c, c[:1]])
    y = scn.SparseTensor(backend.to_device(dup, cuda),
                         backend.to_device(np.ones((4, 2), np.float32), cuda), (4, 4))
    assert y.device == "cuda" and y.n_active == 3
    np.testing.assert_array_equal(np_(y.features)[:, 0], [2.0, 1.0, 1.0])


def test_mixing_devices_is_a_clear_error(cuda, rng):
    x = random_sparse(rng, 1, (5, 5), 1, 0.4, np.float32)
    conv = scn.Convolution(1, 2, 3).to(cuda)
    with pytest.raises(ValueError, match=r"input is on 'cpu' but weight is on 'cuda'"):
        conv(x)
    t = scn.Tensor(backend.to_device(np.ones(3, np.float32), cuda))
    with pytest.raises(ValueError, match=r"the tensor is on 'cuda' but the other operand"):
        t + np.ones(3)
    with pytest.raises(TypeError, match=r"host numpy.ndarray"):
        t.data + np.ones(3)


def test_model_optimizer_and_checkpoint_move_between_devices(cuda, rng, tmp_path):
    model = scn.models.DeepCNet(2, 4, num_classes=3, seed=0)
    opt = scn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = random_sparse(rng, 2, (12, 12), 1, 0.2, np.float32, requires_grad=False)
    labels = np.array([0, 2])
    scn.cross_entropy(model(x), labels).backward()
    opt.step()
    opt.zero_grad()
    model.to(cuda)
    assert all(backend.device_of(p.data) == "cuda" for p in model.parameters())
    scn.cross_entropy(model(x.to(cuda)), labels).backward()
    opt.step()                                     # momentum buffers follow the parameters
    assert all(backend.device_of(b) == "cuda" for b in opt.momentum_buffers)
    path = tmp_path / "on-gpu.npz"
    scn.save(model, path)                          # saved from the device ...
    back = scn.load(path)                          # ... loads on the CPU
    assert back.device == "cpu"
    for a, b in zip(back.parameters(), model.parameters(), strict=True):
        np.testing.assert_array_equal(a.data, np_(b.data))
    back.to(cuda)                                  # ... and back
    model.eval()
    back.eval()
    np.testing.assert_array_equal(back(x.to(cuda)).numpy(), model(x.to(cuda)).numpy())


def test_training_on_the_device_equals_cpu_and_counts_host_copies(cuda, monkeypatch):
    train = scn.data.synthetic_strokes(3, 4, seed=0)
    kw = dict(batch_size=6, lr=0.02, lr_decay=0.05, progress=False, epochs=1)
    cpu_model = scn.models.DeepCNet(3, 4, num_classes=3, activation="vleaky", seed=0)
    gpu_model = scn.models.DeepCNet(3, 4, num_classes=3, activation="vleaky", seed=0)
    T.fit(cpu_model, train, **kw)
    # count the host copies of the training steps
    counts = []
    orig = T.cross_entropy

    def counting(*a, **k):
        counts.append((backend.transfers["to_host"], _geometry.host_reads))
        return orig(*a, **k)
    monkeypatch.setattr(T, "cross_entropy", counting)
    T.fit(gpu_model, train, device=cuda, **kw)
    assert gpu_model.device == "cuda"
    for a, b in zip(gpu_model.parameters(), cpu_model.parameters(), strict=True):
        np.testing.assert_allclose(np_(a.data), b.data, rtol=1e-4, atol=1e-5)
    # between the losses of two steps: the loss and the accuracy read back, and one read of
    # the sizes per rulebook of the step's new geometry (DeepCNet(3): 4 convolutions and 3
    # poolings); nothing else
    assert len(counts) == 2
    (h0, r0), (h1, r1) = counts
    assert r1 - r0 == 7
    assert h1 - h0 == 2 + 7


def test_a_window_far_larger_than_its_pairs_is_refused_on_the_gpu(cuda):
    """No (n_out, K) table is built for a huge window over few sites (the GPU kernels have no
    pair-list path yet): a clear MemoryError, not a memory bomb; the CPU computes it."""
    x = scn.SparseTensor(np.array([[0, 0, 0], [0, 1999, 1999]], np.int32),
                         np.ones((2, 1), np.float32), (2000, 2000))
    pool = scn.MaxPooling(1000)
    on_cpu = pool(x)
    rb, _ = x.to(cuda).geometry.conv(1000, 1000, "MaxPooling")
    assert "gpu_window" not in rb.cache          # the rulebook kernel did not fill one
    with pytest.raises(MemoryError, match=r"run this layer on the CPU"):
        pool(x.to(cuda))
    assert on_cpu.n_active == 2
