"""Run under ``mpiexec -n N python3 -m tests.mpi_worker OUT.npz [dropout] [bn] [sync] [cuda]``
by tests/test_mpi.py (``bn``: batch norm after every convolution; ``sync``: with
``sync_batchnorm=True``; ``cuda``: ``device="cuda"``).

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
from sparsecnn import backend, data, distributed, optim
from sparsecnn import train as T

SETTINGS = dict(epochs=2, batch_size=8, lr=0.05, lr_decay=0.05, progress=False, seed=3)


def model(dropout: float = 0.0, bn: bool = False):
    m = scn.models.DeepCNet(2, 4, num_classes=3, activation="vleaky", dropout=dropout,
                            seed=1)
    if bn:   # a BatchNorm after every convolution
        layers = []
        for layer in m.features:
            layers.append(layer)
            if isinstance(layer, scn.Convolution):
                layers.append(scn.BatchNorm(layer.out_channels))
        m.features = scn.Sequential(*layers)
    return m


def datasets():
    return data.synthetic_strokes(3, 7, seed=0), data.synthetic_strokes(3, 3, seed=1)


def main() -> int:
    out = sys.argv[1]
    flags = sys.argv[2:]
    dropout = next((float(f) for f in flags if f[0].isdigit()), 0.0)
    settings = dict(SETTINGS, sync_batchnorm="sync" in flags,
                    device="cuda" if "cuda" in flags else "cpu")
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
    m = model(dropout, bn="bn" in flags)
    train, test = datasets()
    hist = T.fit(m, train, test, **settings)
    if comm.Get_rank() == 0:
        device = backend.device_of(next(iter(m.parameters())).data)
        m.to("cpu")
        bufs = [b for mod in m.modules() for b in mod._buffers().values()]
        np.savez(out, *[p.data for p in m.parameters()],
                 **{f"buf_{i}": b for i, b in enumerate(bufs)}, steps=checked[0],
                 history=json.dumps(hist), size=comm.Get_size(), device=device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
