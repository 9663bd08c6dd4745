"""The CPU and GPU kernel modules have the same interface (design.md, "Kernel interface"),
``sparsecnn._gpu`` imports without CuPy, and GPU-only tests skip cleanly without a GPU."""
import importlib
import inspect
import subprocess
import sys

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn import _cpu, _gpu, backend
from tests import dense_reference as ref
from tests.sparse_helpers import dense_of, np_, random_sparse

EXPECTED_KERNELS = {
    "build_hash", "build_conv_rulebook", "build_submanifold_rulebook", "conv_forward",
    "conv_backward", "maxpool_forward", "maxpool_backward", "avgpool_forward",
    "avgpool_backward",
}


def test_cpu_exports_the_minimum_kernel_set():
    assert EXPECTED_KERNELS <= set(_cpu.KERNEL_NAMES)
    assert len(set(_cpu.KERNEL_NAMES)) == len(_cpu.KERNEL_NAMES)
    for name in _cpu.KERNEL_NAMES:
        fn = getattr(_cpu, name)
        assert callable(fn)
        params = inspect.signature(fn).parameters       # binding=True: introspectable
        assert len(params) >= 1, name
        assert name in _cpu.__all__


@pytest.mark.parametrize("name", sorted(EXPECTED_KERNELS))
def test_cpu_signatures_follow_the_argument_order(name):
    """Arrays first (features, weight, bias, ground), then the rulebook, then scalars."""
    params = list(inspect.signature(getattr(_cpu, name)).parameters)
    if "in_idx" in params:
        i = params.index("in_idx")
        assert params[i:i + 3] == ["in_idx", "out_idx", "offsets"], params
        for earlier in ("features", "weight", "bias", "ground", "grad_out", "argmax"):
            if earlier in params:
                assert params.index(earlier) < i, params
        for later in ("n_in", "n_out"):
            if later in params:
                assert params.index(later) > i + 2, params


def _params(fn):
    """Names, kinds and defaults of a signature (annotations aside)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_gpu_exports_every_kernel_with_the_same_signature():
    problems = []
    for name in _cpu.KERNEL_NAMES:
        fn = getattr(_gpu, name, None)
        if fn is None:
            problems.append(f"missing {name}")
        elif _params(fn) != _params(getattr(_cpu, name)):
            problems.append(f"{name}{inspect.signature(fn)} != "
                            f"{name}{inspect.signature(getattr(_cpu, name))}")
    assert not problems, "; ".join(problems)
    assert tuple(getattr(_gpu, "KERNEL_NAMES", ())) == tuple(_cpu.KERNEL_NAMES)
    for name in _gpu.CAPABILITIES & _cpu.CAPABILITIES:       # shared optional kernels too
        assert _params(getattr(_gpu, name)) == _params(getattr(_cpu, name))


def test_gpu_package_imports_without_cupy():
    """A fresh interpreter in which ``import cupy`` fails still imports sparsecnn._gpu."""
    code = (
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'cupy' or name.startswith('cupy.') or name.startswith('cupy_'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, _Block())\n"
        "import sparsecnn._gpu as g\n"
        "import sparsecnn as scn\n"
        "ok, why = scn.backend.gpu_status()\n"
        "assert not g.has_cupy()\n"
        "assert ok is False and 'pip install sparsecnn[cuda12]' in why, why\n"
        "assert 'cupy' not in sys.modules\n"
        "print('OK')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "OK"


def test_gpu_module_is_importable_here():
    mod = importlib.import_module("sparsecnn._gpu")
    assert callable(mod.status) and callable(mod.has_cupy)


@pytest.mark.skipif(_gpu.has_cupy(), reason="CuPy is installed here")
def test_gpu_status_without_cupy():
    ok, why = backend.gpu_status()
    assert ok is False
    assert isinstance(why, str)
    assert "CuPy is not installed" in why
    assert "pip install sparsecnn[cuda12]" in why
    with pytest.raises(backend.GPUUnavailableError, match=r"pip install sparsecnn\[cuda12\]"):
        backend.require_device("cuda")
    with pytest.raises(backend.GPUUnavailableError):
        backend.kernels("cuda")
    with pytest.raises(backend.GPUUnavailableError):
        backend.xp("cuda")


def test_cpu_backend_modules():
    assert backend.kernels("cpu") is _cpu
    assert backend.xp("cpu") is np
    assert backend.device_of(np.zeros(2)) == "cpu"
    assert backend.parse_device(None) == "cpu"
    assert backend.parse_device(" CUDA ") == backend.parse_device("gpu") == "cuda"


@pytest.mark.gpu
def test_net_matches_dense_oracle_on_every_device(device, rng):
    """Forward and gradients of a small net on ``device`` equal the dense oracle (the cuda
    case is skipped cleanly where no GPU backend works)."""
    net = scn.Sequential(scn.Convolution(2, 4, 3, 2, dtype=np.float64), scn.LeakyReLU(0.3),
                         scn.MaxPooling(2, 2), scn.NetworkInNetwork(4, 3, dtype=np.float64))
    for p in net.parameters():
        p.data = rng.standard_normal(p.shape)
    params = [p.data.copy() for p in net.parameters()]
    layers = [("conv", 3, 2), ("act", 0.3), ("maxpool", 2, 2), ("nin",)]
    x = random_sparse(rng, 2, (9, 9), 2, 0.3, np.float64, ground=False)
    xd, _ = dense_of(x)
    net.to(device)
    y = net(x.to(device)).to_dense()
    assert y.device == device
    np.testing.assert_allclose(y.numpy(), ref.sequential_forward(xd, layers, params),
                               rtol=1e-10, atol=1e-10)
    G = rng.standard_normal(y.shape)
    y.backward(backend.to_device(G, device))
    _, gparams = ref.sequential_backward(xd, layers, params, G)
    for p, gp in zip(net.parameters(), gparams, strict=True):
        np.testing.assert_allclose(np_(p.grad), gp, rtol=1e-9, atol=1e-10)
