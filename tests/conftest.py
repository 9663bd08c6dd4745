"""Shared fixtures: seeded rng, the device list (cpu always, cuda only where it works)."""
import zlib

import numpy as np
import pytest

from sparsecnn import backend


def _devices():
    ok, why = backend.gpu_status()
    cuda = pytest.param("cuda", marks=[pytest.mark.gpu] + (
        [] if ok else [pytest.mark.skip(reason=f"no GPU backend: {why}")]))
    return ["cpu", cuda]


DEVICES = _devices()


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test id, so a failure reproduces from its id alone."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)
