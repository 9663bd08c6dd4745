"""malloc tuning: applied once on first kernel use (glibc), reported, and can be turned off."""
import os
import subprocess
import sys

import numpy as np
import pytest

import sparsecnn as scn
from sparsecnn._cpu import _memory

SCRIPT = """
import numpy as np, sparsecnn as scn
from sparsecnn._cpu._memory import malloc_tuning_status
x = scn.SparseTensor(np.array([[0, 1, 1]]), np.ones((1, 1), np.float32), (4, 4))
scn.Convolution(1, 2, 2)(x)
print(malloc_tuning_status())
"""


def _run(env_extra):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning is Linux-only")
def test_applied_on_first_use_and_opt_out():
    import platform
    on = _run({})
    if platform.libc_ver()[0] == "glibc":
        assert on.startswith("(True") and "32 MiB" in on
    off = _run({"SPARSECNN_MALLOC_TUNING": "0"})
    assert off.startswith("(False") and "SPARSECNN_MALLOC_TUNING=0" in off


def test_idempotent_and_results_unchanged():
    first = _memory.tune_malloc()
    assert _memory.tune_malloc() == first
    x = scn.SparseTensor(np.array([[0, 1, 1]]), np.ones((1, 1)), (4, 4))
    conv = scn.Convolution(1, 1, 2, dtype=np.float64)
    assert conv(x).n_active == 4
