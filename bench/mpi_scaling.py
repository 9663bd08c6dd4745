"""Data-parallel scaling on this machine: 1 rank x T threads against N ranks x 1 thread.

    python3 bench/mpi_scaling.py [--steps 6] [--ranks 2] [--threads 2] [--json OUT]

Runs training steps (forward, backward, gradient allreduce, SGD update) of DeepCNet(5, 32)
(10 classes) on the benchmark's handwriting workload (bench/workload.py: 64 stroke samples on
96x96, 11,808 active sites) with the SAME global batch of 64 in both layouts:

* ``1 x T``: one process, ``OMP_NUM_THREADS=T``, no communicator;
* ``N x 1``: ``mpiexec -n N``, ``OMP_NUM_THREADS=1`` per rank, each rank computes its fixed
  shard of the 64 samples (``distributed.shard_bounds``) and the gradients are summed by
  :class:`sparsecnn.distributed.GradientReducer` (its ``bytes_per_step`` and ``seconds``).

Prints one JSON object: samples per second of each layout, the allreduce bytes and mean
seconds per step, and the forward+backward milliseconds per sample of the one-process run
(the ``t`` of the README's scaling model). The first step of each run is a warm-up (not timed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _worker(steps: int) -> dict:
    sys.path.insert(0, str(HERE))
    import numpy as np
    from workload import generate_workload

    import sparsecnn as scn
    from sparsecnn import distributed, optim

    comm = distributed.default_comm()
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    red = distributed.GradientReducer(comm) if comm is not None else None
    w = generate_workload(seed=0, batch=64, size=96, region=64)
    lo, hi = distributed.shard_bounds(64, rank, size)
    c = w["coords"]
    keep = (c[:, 0] >= lo) & (c[:, 0] < hi)
    coords = c[keep].copy()
    coords[:, 0] -= lo
    feats = w["features"][keep]
    labels = np.random.default_rng(0).integers(0, 10, 64)[lo:hi]
    model = scn.models.DeepCNet(5, 32, num_classes=10, seed=0)
    opt = optim.SGD(model.parameters(), 0.001, momentum=0.9)
    step_s, fb_s = [], []
    for i in range(steps + 1):
        if comm is not None:
            comm.Barrier()
        t0 = time.perf_counter()
        x = scn.SparseTensor(coords, feats, (96, 96), batch_size=hi - lo)
        loss = scn.cross_entropy(model(x), labels)
        loss.backward()
        t1 = time.perf_counter()
        if red is not None:
            red.reduce(model.parameters(), (hi - lo) / 64)
        opt.step()
        opt.zero_grad()
        if comm is not None:
            comm.Barrier()
        if i > 0:
            step_s.append(time.perf_counter() - t0)
            fb_s.append(t1 - t0)
        if i == 0 and red is not None:
            red.seconds, red.steps = 0.0, 0
    step = float(np.median(step_s))
    out = {"ranks": size, "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0),
           "global_batch": 64, "steps": steps, "step_ms": step * 1e3,
           "samples_per_second": 64 / step,
           "fwd_bwd_ms_per_sample": float(np.median(fb_s)) * 1e3 / (hi - lo),
           "parameters": int(sum(p.data.size for p in model.parameters()))}
    if red is not None:
        out["allreduce_bytes_per_step"] = red.bytes_per_step
        out["allreduce_ms_per_step"] = red.seconds / red.steps * 1e3
    return out if rank == 0 else {}


def _mpiexec() -> str | None:
    found = shutil.which("mpiexec")
    if found:
        return found
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else None


def _run(cmd: list[str], threads: int, timeout: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure(steps: int = 6, ranks: int = 2, threads: int = 2, timeout: float = 600) -> dict:
    """Both layouts, each in fresh processes; raises RuntimeError without mpiexec."""
    mpiexec = _mpiexec()
    if mpiexec is None:
        raise RuntimeError("mpiexec not found (pip install 'sparsecnn[mpi]')")
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", "--steps", str(steps)]
    one = _run(me, threads, timeout)
    many = _run([mpiexec, "-n", str(ranks), *me], 1, timeout)
    return {"one_process": one, "mpi": many,
            "speedup": many["samples_per_second"] / one["samples_per_second"],
            "cpus": os.cpu_count()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        out = _worker(a.steps)
        if out:
            print(json.dumps(out))
        return 0
    res = measure(a.steps, a.ranks, a.threads)
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
