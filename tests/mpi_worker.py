"""Run under ``mpiexec -n N python3 -m tests.mpi_worker OUT.npz [dropout]`` by tests/test_mpi.py.

Trains a small DeepCNet data-parallel with :func:`sparsecnn.train.fit` (the default
communicator, as the CLI does), checks after every optimizer step that every rank holds bitwise
the same parameters (an allgather of a hash) and lets rank 0 write the parameters, the history
and the number of checked steps to OUT.npz.
"""
from __future__ import annotations

import json
import sys

import numpy as np

import sparsecnn as scn
from sparsecnn import data, distributed, optim
from sparsecnn import train as T

SETTINGS = dict(epochs=2, batch_size=8, lr=0.05, lr_decay=0.05, progress=False, seed=3)


def model(dropout: float = 0.0):
    return scn.models.DeepCNet(2, 4, num_classes=3, activation="vleaky", dropout=dropout,
                               seed=1)


def datasets():
    return data.synthetic_strokes(3, 7, seed=0), data.synthetic_strokes(3, 3, seed=1)


def main() -> int:
    out = sys.argv[1]
    dropout = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    comm = distributed.default_comm()
    assert comm is not None and comm.Get_size() > 1, "run me under mpiexec -n N, N > 1"
    checked = [0]
    step = optim.SGD.step

    def checked_step(self, *a, **k):
        r = step(self, *a, **k)
        digests = comm.allgather(distributed.params_digest(self.params))
        if len(set(digests)) != 1:
            raise AssertionError(f"ranks differ after step {checked[0] + 1}: {digests}")
        checked[0] += 1
        return r

    optim.SGD.step = checked_step
    m = model(dropout)
    train, test = datasets()
    hist = T.fit(m, train, test, **SETTINGS)
    if comm.Get_rank() == 0:
        np.savez(out, *[p.data for p in m.parameters()], steps=checked[0],
                 history=json.dumps(hist), size=comm.Get_size())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
