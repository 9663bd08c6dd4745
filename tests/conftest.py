"""Shared fixtures: seeded rng, and the devices: cpu always; cuda on a GPU where there is one,
else in the CUDA simulation (SPARSECNN_CUDA_SIM=1 for that test)."""
import zlib

import numpy as np
import pytest

from sparsecnn import backend


def _cuda_mode() -> tuple[str | None, str]:
    """How device "cuda" runs in these tests: "gpu" (CuPy and a device; also when
    SPARSECNN_CUDA_SIM=1 is set by the caller), "sim" (no GPU: the CUDA simulation, as in CI),
    or None with the reason."""
    ok, why = backend.gpu_status()
    if ok:
        return "gpu", why
    from sparsecnn._gpu._launch import find_host_compiler
    if find_host_compiler() is None:
        return None, f"no GPU backend ({why}) and no host C++ compiler for the CUDA simulation"
    return "sim", "CUDA simulation"


CUDA_MODE, CUDA_WHY = _cuda_mode()


def _devices():
    cuda = pytest.param("cuda", marks=[pytest.mark.gpu] + (
        [] if CUDA_MODE else [pytest.mark.skip(reason=CUDA_WHY)]))
    return ["cpu", cuda]


DEVICES = _devices()


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """"cpu", and "cuda": a real GPU where there is one, else the CUDA simulation (the same
    kernels on the CPU, as CI runs them)."""
    if request.param == "cuda" and CUDA_MODE == "sim":
        monkeypatch.setenv("SPARSECNN_CUDA_SIM", "1")
    return request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test id, so a failure reproduces from its id alone."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
