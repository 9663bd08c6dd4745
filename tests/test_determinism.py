"""Bitwise reproducibility (design.md: no float atomics on the CPU): the same input gives the
same bits in the output and in every gradient, run to run and whatever the number of OpenMP
threads."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import _cpu
from sparsecnn._cpu import _rulebook


def _input(rng, batch=6, n=24, density=0.15, channels=1):
    total = batch * n * n
    flat = rng.choice(total, int(density * total), replace=False)
    coords = np.stack(np.unravel_index(flat, (batch, n, n)), 1).astype(np.int32)
    feats = rng.standard_normal((len(coords), channels)).astype(np.float32)
    return coords, feats


def _run(model, coords, feats, n, batch, labels):
    """Fresh SparseTensor (rulebooks rebuilt), forward, loss, backward -> every array."""
    x = scn.SparseTensor(coords, feats, (n, n), batch_size=batch, requires_grad=True)
    model.zero_grad()
    logits = model(x)
    loss = scn.cross_entropy(logits, labels)
    loss.backward()
    return [logits.numpy(), loss.numpy(), x.grad, x.ground_grad,
            *[p.grad for p in model.parameters()]]


def _assert_bitwise_equal(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b, strict=True)):
        assert u.dtype == v.dtype and u.shape == v.shape, i
        assert u.tobytes() == v.tobytes(), f"array {i} differs (max |diff| " \
                                           f"{np.abs(u.astype(float) - v).max()})"


@pytest.mark.parametrize("arch,activation", [("DeepCNet", "relu"), ("DeepCNet", "vleaky"),
                                             ("DeepCNiN", "leaky")])
def test_same_input_twice_is_bitwise_identical(arch, activation, rng):
    model = getattr(scn.models, arch)(3, 8, num_classes=7, activation=activation, seed=11)
    coords, feats = _input(rng)
    labels = rng.integers(0, 7, 6)
    first = _run(model, coords, feats, 24, 6, labels)
    assert all(np.isfinite(a).all() for a in first)
    assert any(np.abs(a).max() > 0 for a in first[4:])
    second = _run(model, coords, feats, 24, 6, labels)
    _assert_bitwise_equal(first, second)
    # a second model built with the same seed gives the same bits too
    twin = getattr(scn.models, arch)(3, 8, num_classes=7, activation=activation, seed=11)
    _assert_bitwise_equal(first, _run(twin, coords, feats, 24, 6, labels))


def test_rulebooks_are_bitwise_identical(rng):
    coords, feats = _input(rng, batch=8, n=48, density=0.3)
    shape = np.array([48, 48], np.int64)
    a = _rulebook.build_conv_rulebook(coords, shape, 3, 1)[:4]
    b = _rulebook.build_conv_rulebook(coords.copy(), shape, 3, 1)[:4]
    _assert_bitwise_equal(list(a), list(b))
    keys, vals, _, _ = _cpu.build_hash(coords, shape)
    c = _rulebook.build_submanifold_rulebook(coords, shape, keys, vals, 3)
    d = _rulebook.build_submanifold_rulebook(coords, shape, keys, vals, 3)
    _assert_bitwise_equal(list(c), list(d))


SCRIPT = textwrap.dedent("""
    import hashlib
    import numpy as np
    import sparsecnn as scn
    from sparsecnn import _cpu

    rng = np.random.default_rng(1234)
    h = hashlib.sha256()

    def run(model, coords, feats, spatial, batch, labels=None):
        x = scn.SparseTensor(coords, feats, spatial, batch_size=batch, requires_grad=True)
        y = model(x)
        if labels is not None:
            out = y
            scn.cross_entropy(y, labels).backward()
        else:
            out = y.to_dense()
            out.backward(np.asarray(rng.standard_normal(out.shape), out.dtype))
        for a in [out.numpy(), x.grad, x.ground_grad] + [p.grad for p in model.parameters()]:
            h.update(np.ascontiguousarray(a).tobytes())

    def sites(batch, n, density):
        total = batch * n * n
        flat = rng.choice(total, int(density * total), replace=False)
        return np.stack(np.unravel_index(flat, (batch, n, n)), 1).astype(np.int32)

    # DeepCNet(3, 8): the paper's network, float32
    c = sites(8, 24, 0.2)
    f = rng.standard_normal((len(c), 1)).astype(np.float32)
    run(scn.models.DeepCNet(3, 8, num_classes=10, activation="vleaky", seed=3), c, f,
        (24, 24), 8, rng.integers(0, 10, 8))
    # a wider input: > 8192 pairs per offset (several backward chunks), C_in 1 and 8
    c = sites(4, 72, 0.5)
    for dtype in (np.float32, np.float64):
        f = rng.standard_normal((len(c), 1)).astype(dtype)
        net = scn.Sequential(
            scn.SubmanifoldConvolution(1, 8, 3, dtype=dtype, seed=1), scn.LeakyReLU(1 / 3),
            scn.Convolution(8, 8, 3, 1, dtype=dtype, seed=2), scn.ReLU(),
            scn.AveragePooling(2, 2), scn.MaxPooling(5, 2),
            scn.NetworkInNetwork(8, 4, dtype=dtype, seed=3))
        run(net, c, f, (72, 72), 4)
    print(_cpu.max_threads(), h.hexdigest())
""")


def _hash_with_threads(n_threads):
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(scn.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS=str(n_threads),
               PYTHONPATH=pkg_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       env=env, timeout=300, cwd=pkg_root)
    assert r.returncode == 0, r.stderr
    threads, digest = r.stdout.split()
    return int(threads), digest


@pytest.mark.skipif(not _cpu.USE_OPENMP, reason="built without OpenMP")
def test_bitwise_identical_across_thread_counts():
    t1, h1 = _hash_with_threads(1)
    t2, h2 = _hash_with_threads(2)
    t3, h3 = _hash_with_threads(3)
    assert (t1, t2, t3) == (1, 2, 3)
    assert h1 == h2 == h3, f"1 thread: {h1}\n2 threads: {h2}\n3 threads: {h3}"
