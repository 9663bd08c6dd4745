"""Data-parallel training on MPI (through ``mpi4py``; imported only when it is used).

``mpiexec -n N python3 -m sparsecnn train ...`` (or ``scn.train.fit(..., comm=...)``) splits
every step's global batch across the N ranks: rank r renders and augments only the samples
``shard_bounds(n, r, N)`` of each batch the seeded iterator plans, and its gradient (scaled by
``local_B / B``) is summed with the others' in ONE ``Allreduce`` of one flat buffer per step, so
the update is that of one process with batch B and every rank applies the same update.

Reduction order. The gradient buffer is reduced with ``MPI.SUM`` by ``Allreduce`` on one
contiguous buffer of the parameters' dtype. MPICH chooses the algorithm (and with it the order
in which the N contributions are added) from the message size, N and the process layout
only, so for a fixed N and model the result is the same in every run (determinism); the
algorithms it uses for SUM on floats (recursive doubling, reduce-scatter + allgather) add each
pair of partial sums once and hand the same bits to every rank, which the tests check after
every step (an ``allgather`` of a hash of the parameters). A reduction that must not rely on
this can pass ``order="rank"`` to :class:`GradientReducer`: the buffers are gathered on rank 0,
summed in rank order and broadcast (identical on every rank by construction, but rank 0
receives N buffers: for small N only).

GPUs. With ``device="cuda"`` every rank uses its own GPU, ``local_rank() % device_count``
(:func:`use_local_device`, called by ``fit``), and on a real GPU the gradients are packed,
summed and unpacked on the device with NCCL (``cupy.cuda.nccl``; :func:`nccl_communicator`,
:func:`nccl_allreduce_sum`): no gradient byte goes through the host (the has-a-gradient flags,
a few bytes, are read back). NCCL's ring and tree algorithms are deterministic for a fixed
N, message size and topology. Under the CUDA simulation (``SPARSECNN_CUDA_SIM=1``) device
arrays live in host memory and the reduction goes through MPI on host buffers as on the CPU:
the tests here reach the communicator, not NCCL (``bench/gpu_check.py`` runs a one-rank NCCL
allreduce on a GPU machine; several GPUs are needed to see NCCL move data between them).
"""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import backend

# variables the common launchers set in every process they start
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE",
                       "PMIX_SIZE", "MPI_LOCALNRANKS")


def launched_size() -> int:
    """The number of processes the MPI launcher (mpiexec) says it started; 1 without one."""
    for name in _LAUNCHER_SIZE_VARS:
        v = os.environ.get(name, "").strip()
        if v.isdigit() and int(v) > 0:
            return int(v)
    return 1


def mpi_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("mpi4py") is not None


def default_comm() -> Any | None:
    """``MPI.COMM_WORLD`` when this process was started by mpiexec with more than one process
    and mpi4py can be imported; else None (and mpi4py is not imported)."""
    if launched_size() <= 1 or not mpi_available():
        return None
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 else None


def resolve_comm(comm: Any | None) -> Any | None:
    """The communicator ``fit`` works with: the default (:func:`default_comm`) for None,
    no communicator for False, else ``comm`` itself; a communicator of one process gives None
    (which then runs exactly the one-process code)."""
    if comm is False:
        return None
    if comm is None:
        comm = default_comm()
        if comm is None:
            return None
    for attr in ("Get_rank", "Get_size", "Allreduce"):
        if not hasattr(comm, attr):
            raise TypeError(f"comm must be an mpi4py communicator, None or False, got "
                            f"{type(comm).__name__}")
    return comm if comm.Get_size() > 1 else None


# the process's index among the ranks on its node, as the common launchers publish it
_LAUNCHER_LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                             "MV2_COMM_WORLD_LOCAL_RANK", "PMIX_LOCAL_RANK", "SLURM_LOCALID")


def local_rank(comm: Any | None = None) -> int:
    """This process's rank among those on its node: from the launcher's environment
    (MPICH ``MPI_LOCALRANKID``, Open MPI ``OMPI_COMM_WORLD_LOCAL_RANK``, MVAPICH, PMIx, Slurm),
    else the rank in a shared-memory split of ``comm`` (collective: every rank must call it),
    else ``PMI_RANK`` (the global rank: right on one node), else 0."""
    for name in _LAUNCHER_LOCAL_RANK_VARS:
        v = os.environ.get(name, "").strip()
        if v.isdigit():
            return int(v)
    if comm is not None and hasattr(comm, "Split_type"):
        from mpi4py import MPI
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            return int(node.Get_rank())
        finally:
            node.Free()
    v = os.environ.get("PMI_RANK", "").strip()
    return int(v) if v.isdigit() else 0


def use_local_device(comm: Any | None = None) -> int | None:
    """Make this rank's GPU ``local_rank % device_count`` CuPy's current device; returns its
    index (None under the CUDA simulation, which has one simulated device, or without CuPy)."""
    lr = local_rank(comm)
    if backend.simulation():
        return None
    try:
        import cupy
    except ImportError:
        return None
    count = cupy.cuda.runtime.getDeviceCount()   # pragma: no cover - needs a GPU
    if count < 1:                                # pragma: no cover
        return None
    dev = lr % count                             # pragma: no cover
    cupy.cuda.Device(dev).use()                  # pragma: no cover
    return dev                                   # pragma: no cover


# -- NCCL (real GPUs only; nothing here runs under the simulation) ------------------------------
def nccl_communicator(comm: Any | None = None) -> Any:  # pragma: no cover - needs a GPU
    """A ``cupy.cuda.nccl.NcclCommunicator`` over the ranks of ``comm`` (None: this process
    alone): rank 0 makes the unique id, MPI broadcasts it, every rank joins. Collective."""
    from cupy.cuda import nccl
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    uid = nccl.get_unique_id() if rank == 0 else None
    if comm is not None:
        uid = comm.bcast(uid, root=0)
    return nccl.NcclCommunicator(size, uid, rank)


def nccl_allreduce_sum(ncomm: Any, buf: Any) -> None:  # pragma: no cover - needs a GPU
    """Sum the CuPy array ``buf`` (float32 or float64, contiguous) over the NCCL communicator
    in place, on the current stream, and wait for it."""
    import cupy
    from cupy.cuda import nccl
    kinds = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
    if buf.dtype not in kinds or not buf.flags.c_contiguous:
        raise TypeError(f"nccl_allreduce_sum needs a contiguous float32/float64 array, got "
                        f"{buf.dtype}")
    stream = cupy.cuda.get_current_stream()
    ncomm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, kinds[buf.dtype], nccl.NCCL_SUM,
                    stream.ptr)
    stream.synchronize()


_abort_hook_installed = False


def install_abort_hook(comm: Any) -> None:
    """Make an uncaught exception on this rank end the whole job (``comm.Abort``) instead of
    leaving the other ranks waiting in a collective forever: ``sys.excepthook`` prints one
    line ``sparsecnn: error (rank r of N): Type: message``, then the traceback as usual, then
    aborts. ``fit`` installs it when it trains on more than one rank (the CLI catches errors
    itself and aborts the same way). Installed once per process."""
    global _abort_hook_installed
    if _abort_hook_installed or comm is None or comm.Get_size() <= 1:
        return
    import sys
    previous = sys.excepthook
    rank, size = comm.Get_rank(), comm.Get_size()

    def hook(kind, value, tb):
        try:
            # the one line first: Abort may end the process before the launcher has
            # forwarded everything written after it
            print(f"sparsecnn: error (rank {rank} of {size}): {kind.__name__}: {value}",
                  file=sys.stderr, flush=True)
            previous(kind, value, tb)
            sys.stderr.flush()
            sys.stdout.flush()
            time.sleep(0.2)     # let the launcher forward the output before the abort
        finally:
            comm.Abort(130 if issubclass(kind, KeyboardInterrupt) else 1)

    sys.excepthook = hook
    _abort_hook_installed = True


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """The fixed slice ``[lo, hi)`` of a batch of n samples that ``rank`` of ``size`` takes:
    contiguous, in rank order, sizes differing by at most one (the larger ones last)."""
    return (rank * n) // size, ((rank + 1) * n) // size


def library_version() -> str:
    """The MPI library's one-line version (imports mpi4py)."""
    from mpi4py import MPI
    lines = [s.strip() for s in MPI.Get_library_version().splitlines() if s.strip()]
    return " ".join(lines[0].split()) if lines else "unknown"


class GradientReducer:
    """Sums the gradients of ``params`` over the ranks of ``comm`` in one flat buffer.

    ``reduce(params, scale)`` multiplies the local gradients by ``scale`` (``local_B / B``),
    packs them into one contiguous host buffer (parameters without a gradient contribute
    zeros), reduces it, and writes the sums back as the parameters' gradients. A parameter
    keeps ``grad = None`` only where no rank has a gradient for it (as one process would).
    """

    def __init__(self, comm: Any, order: str = "mpi") -> None:
        if order not in ("mpi", "rank"):
            raise ValueError(f"order must be 'mpi' or 'rank', got {order!r}")
        self.comm = comm
        self.order = order
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.bytes_per_step = 0
        self.seconds = 0.0
        self.steps = 0
        self.bn_sync: BatchNormSync | None = None   # fit(sync_batchnorm=True)
        self._nccl: Any = None

    def _sum(self, buf: np.ndarray) -> np.ndarray:
        from mpi4py import MPI
        if self.order == "mpi":
            out = np.empty_like(buf)
            self.comm.Allreduce(buf, out, op=MPI.SUM)
            return out
        parts = np.empty((self.size, buf.size), buf.dtype) if self.rank == 0 else None
        self.comm.Gather(buf, parts, root=0)
        out = np.empty_like(buf)
        if self.rank == 0:
            acc = parts[0].copy()
            for r in range(1, self.size):
                acc += parts[r]
            out[...] = acc
        self.comm.Bcast(out, root=0)
        return out

    def reduce(self, params: Sequence[Any], scale: float) -> None:
        import time
        params = list(params)
        if not params:
            return
        dtype = np.result_type(*[p.data.dtype for p in params])
        if (self.order == "mpi" and backend.device_of(params[0].data) == "cuda"
                and not backend.simulation()):
            return self._reduce_on_device(params, scale, dtype)  # pragma: no cover - a GPU
        sizes = [int(p.data.size) for p in params]
        n = sum(sizes)
        buf = np.zeros(n + len(params), dtype)   # gradients, then one has-a-gradient flag each
        off = 0
        for i, (p, s) in enumerate(zip(params, sizes)):
            if p.grad is not None:
                g = backend.to_host(p.grad).reshape(-1)
                np.multiply(g, scale, out=buf[off:off + s], casting="unsafe")
                buf[n + i] = 1
            off += s
        t0 = time.perf_counter()
        out = self._sum(buf)
        self.seconds += time.perf_counter() - t0
        self.bytes_per_step = int(buf.nbytes)
        self.steps += 1
        off = 0
        for i, (p, s) in enumerate(zip(params, sizes)):
            if out[n + i] > 0:
                g = out[off:off + s].reshape(p.data.shape).astype(p.data.dtype, copy=False)
                p.grad = backend.to_device(g, backend.device_of(p.data))
            off += s

    def _reduce_on_device(self, params: list[Any], scale: float,
                          dtype: Any) -> None:  # pragma: no cover - needs a GPU
        """``reduce`` on a real GPU: one flat device buffer summed by NCCL."""
        import time

        import cupy
        if self._nccl is None:
            self._nccl = nccl_communicator(self.comm)
        sizes = [int(p.data.size) for p in params]
        n = sum(sizes)
        buf = cupy.zeros(n + len(params), dtype)
        off = 0
        for i, (p, s) in enumerate(zip(params, sizes)):
            if p.grad is not None:
                cupy.multiply(p.grad.reshape(-1), scale, out=buf[off:off + s],
                              casting="unsafe")
                buf[n + i] = 1
            off += s
        t0 = time.perf_counter()
        nccl_allreduce_sum(self._nccl, buf)
        self.seconds += time.perf_counter() - t0
        self.bytes_per_step = int(buf.nbytes)
        self.steps += 1
        flags = cupy.asnumpy(buf[n:])
        off = 0
        for i, (p, s) in enumerate(zip(params, sizes)):
            if flags[i] > 0:
                p.grad = buf[off:off + s].reshape(p.data.shape).astype(p.data.dtype, copy=True)
            off += s

    def sum_float64(self, values: Sequence[float]) -> np.ndarray:
        """Sum a few numbers (counts, loss sums) over the ranks, in float64."""
        from mpi4py import MPI
        buf = np.asarray(values, np.float64)
        out = np.empty_like(buf)
        self.comm.Allreduce(buf, out, op=MPI.SUM)
        return out

    def average_buffers(self, arrays: Sequence[Any]) -> list[Any]:
        """The mean over the ranks of each array (batch norm running statistics)."""
        arrays = list(arrays)
        if not arrays:
            return []
        host = [np.asarray(backend.to_device(a, "cpu"), np.float64).reshape(-1) for a in arrays]
        flat = self.sum_float64(np.concatenate(host)) / self.size
        out, off = [], 0
        for a, h in zip(arrays, host):
            v = flat[off:off + h.size].reshape(a.shape).astype(a.dtype)
            out.append(backend.to_device(v, backend.device_of(a)))
            off += h.size
        return out


class BatchNormSync:
    """Sums batch norm statistics over the ranks of ``comm`` (``BatchNorm.sync``).

    ``sum(values, dtype, device)`` allreduces a few per-channel arrays and numbers (float64 on
    the host: they are a few channels long) and returns them as ``dtype`` arrays on ``device``.
    ``weight`` is this rank's share of the global batch (local B / B), set by ``fit`` before
    every backward: batch norm's backward works in units of this rank's loss. Every rank must
    run the same batch norms in the same order, each with at least one sample.
    """

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.weight = 1.0
        self.calls = 0

    def sum(self, values: Sequence[Any], dtype: Any, device: str) -> list[Any]:
        from mpi4py import MPI
        host = [np.asarray(backend.to_host(v) if not np.isscalar(v) else v,
                           np.float64).reshape(-1) for v in values]
        buf = np.concatenate(host)
        out = np.empty_like(buf)
        self.comm.Allreduce(buf, out, op=MPI.SUM)
        self.calls += 1
        res, off = [], 0
        for v, h in zip(values, host):
            part = out[off:off + h.size]
            off += h.size
            if np.isscalar(v):
                res.append(float(part[0]))
            else:
                res.append(backend.to_device(part.reshape(v.shape).astype(dtype), device))
        return res


def params_digest(params: Sequence[Any]) -> str:
    """A SHA-256 of the parameters' bytes (to check that ranks hold the same model)."""
    h = hashlib.sha256()
    for p in params:
        h.update(np.ascontiguousarray(backend.to_device(p.data, "cpu")).tobytes())
    return h.hexdigest()
