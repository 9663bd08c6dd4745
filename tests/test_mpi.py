"""Data-parallel training on MPI: `mpiexec -n 2` and `-n 3` (uneven shards) in subprocesses.

Equivalence: N ranks end with the parameters of one process with the same global batch, to
atol 1e-5 / rtol 1e-5. Why that tolerance: the parameters are float32 (eps 1.2e-7, values below
~1); one process sums each gradient over the whole batch in one order, N ranks sum per shard and
then across ranks, so each gradient differs by a few float32 ulps, and 4 SGD steps at lr 0.05
keep the difference near 1e-7 (measured: <= 9e-8); 1e-5 is ~100x that and ~1000x below what a
wrong scaling (a gradient that is N times too large or a shard counted twice) gives. Every rank
holds bitwise the same parameters after every step (tests/mpi_worker.py checks an allgather of
a hash after each optimizer step); two runs with the same seed and N are bitwise identical.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sparsecnn import distributed
from sparsecnn import train as T
from sparsecnn.data import BatchIterator, synthetic_strokes
from tests import mpi_worker as W

ROOT = Path(__file__).resolve().parents[1]


def _mpiexec() -> str | None:
    found = shutil.which("mpiexec")
    if found:
        return found
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else None


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(
    not distributed.mpi_available() or MPIEXEC is None,
    reason="mpi4py or mpiexec not found (pip install 'sparsecnn[mpi]')")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"     # N ranks share the 2 cores
    env.pop("SPARSECNN_FAULT_INJECT", None)
    env.update(extra)
    return env


def _mpirun(n: int, args: list[str], *, timeout: float = 120, cwd: Path | None = None,
            **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *args], cwd=cwd or ROOT,
                          env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _worker(n: int, out: Path, *extra: str) -> np.lib.npyio.NpzFile:
    p = _mpirun(n, ["-m", "tests.mpi_worker", str(out), *extra])
    assert p.returncode == 0, p.stdout + p.stderr
    return np.load(out)


def _params(z) -> list[np.ndarray]:
    return [z[f"arr_{i}"] for i in range(len([k for k in z.files if k.startswith("arr_")]))]


def test_shards_are_fixed_contiguous_and_cover_the_batch():
    for n in range(0, 12):
        for size in (1, 2, 3, 5):
            b = [distributed.shard_bounds(n, r, size) for r in range(size)]
            assert b[0][0] == 0 and b[-1][1] == n
            assert all(b[i][1] == b[i + 1][0] for i in range(size - 1))
            assert max(h - lo for lo, h in b) - min(h - lo for lo, h in b) <= 1


def test_sharded_iterator_renders_what_the_whole_batch_renders():
    ds = synthetic_strokes(3, 5, seed=0)
    kw = dict(size=12, seed=4, augment=True, prefetch=0)
    whole = list(BatchIterator(ds, 7, **kw).batches(1))
    for size in (2, 3, 8):
        parts = [list(BatchIterator(ds, 7, shard=(r, size), **kw).batches(1))
                 for r in range(size)]
        for b, full in enumerate(whole):
            got = [p[b] for p in parts if p[b] is not None]
            assert sum(g.batch_size for g in got) == full.batch_size
            np.testing.assert_array_equal(np.concatenate([g.labels for g in got]), full.labels)
            feats = np.concatenate([g.features for g in got])
            np.testing.assert_array_equal(feats, full.features)


def test_without_mpiexec_there_is_no_communicator(monkeypatch):
    for name in distributed._LAUNCHER_SIZE_VARS:
        monkeypatch.delenv(name, raising=False)
    assert distributed.launched_size() == 1
    assert distributed.default_comm() is None and distributed.resolve_comm(None) is None
    assert distributed.resolve_comm(False) is None
    with pytest.raises(TypeError, match="communicator"):
        distributed.resolve_comm(object())


@pytest.fixture(scope="module")
def single():
    m = W.model()
    train, test = W.datasets()
    hist = T.fit(m, train, test, comm=False, **W.SETTINGS)
    return [p.data.copy() for p in m.parameters()], hist


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_n_ranks_train_the_model_of_one_process(n, single, tmp_path):
    ref, ref_hist = single
    z = _worker(n, tmp_path / "a.npz")
    assert int(z["size"]) == n
    assert int(z["steps"]) == 4          # 21 samples, batch 8 (uneven over 3), 2 epochs
    got = _params(z)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    hist = json.loads(str(z["history"]))
    for h, r in zip(hist, ref_hist):     # sharded evaluation: the same counts
        assert h["test_accuracy"] == r["test_accuracy"]
        assert h["train_accuracy"] == r["train_accuracy"]
        assert abs(h["train_loss"] - r["train_loss"]) < 1e-5
        assert abs(h["test_loss"] - r["test_loss"]) < 1e-5


@needs_mpi
def test_same_seed_and_n_give_bitwise_identical_models(tmp_path):
    a = _params(_worker(3, tmp_path / "a.npz", "0.2"))    # with dropout: per-rank masks
    b = _params(_worker(3, tmp_path / "b.npz", "0.2"))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@needs_mpi
def test_cli_train_under_mpiexec(tmp_path):
    args = ["-m", "sparsecnn", "train", "--data", "synthetic", "--classes", "3", "--l", "2",
            "--k", "4", "--epochs", "1", "--out", "m.npz", "--log", "log.jsonl",
            "--checkpoint", "ck.npz", "--quiet"]
    p = _mpirun(2, args, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("model saved to m.npz") == 1        # rank 0 alone prints
    assert "data-parallel on 2 MPI ranks" in p.stdout
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "test_accuracy" in json.loads(lines[0])
    assert (tmp_path / "m.npz").exists() and (tmp_path / "ck.npz").exists()


@needs_mpi
def test_info_shows_mpi_library_and_ranks():
    p = _mpirun(2, ["-m", "sparsecnn", "info"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("MPI        ") == 1 and p.stdout.count("sparsecnn ") == 1
    assert "2 ranks (this is rank 0):" in p.stdout and "this is rank 1" not in p.stdout
    lines = [ln.strip() for ln in p.stdout.splitlines() if ln.strip().startswith("rank ")]
    assert [ln.split(":")[0] for ln in lines] == ["rank 0", "rank 1"], p.stdout
    assert all("local rank" in ln and "device cpu" in ln for ln in lines), p.stdout


@needs_mpi
def test_info_gathers_the_ranks_simulated_devices():
    p = _mpirun(2, ["-m", "sparsecnn", "info"], SPARSECNN_CUDA_SIM="1")
    assert p.returncode == 0, p.stderr
    lines = [ln.strip() for ln in p.stdout.splitlines() if ln.strip().startswith("rank ")]
    assert len(lines) == 2 and all("device cuda = CUDA simulation" in ln for ln in lines)


@needs_mpi
def test_a_failing_rank_ends_the_whole_job_in_bounded_time(tmp_path):
    args = ["-m", "sparsecnn", "train", "--data", "synthetic", "--classes", "3", "--l", "2",
            "--k", "4", "--epochs", "3", "--out", "m.npz", "--quiet"]
    t0 = time.monotonic()
    # bounded: the job ends soon after the fault (~3 s here); 120 s leaves room for three
    # interpreters starting on a loaded 2-core CI machine
    p = _mpirun(3, args, cwd=tmp_path, timeout=120, SPARSECNN_FAULT_INJECT="1:3")
    assert time.monotonic() - t0 < 120
    assert p.returncode != 0
    errors = [ln for ln in p.stderr.splitlines() if "error (rank" in ln]
    assert errors == ["sparsecnn train: error (rank 1 of 3): RuntimeError: injected fault on "
                      "rank 1 at step 3 (SPARSECNN_FAULT_INJECT)"], p.stderr
    assert not (tmp_path / "m.npz").exists()


@needs_mpi
def test_a_killed_rank_ends_the_whole_job_in_bounded_time(tmp_path):
    """A rank that dies mid-run (SIGKILL: no Python cleanup, no abort of its own): the
    launcher ends the others, and the job exits non-zero, in bounded time."""
    args = ["-m", "sparsecnn", "train", "--data", "synthetic", "--classes", "3", "--l", "2",
            "--k", "4", "--epochs", "3", "--out", "m.npz", "--quiet"]
    t0 = time.monotonic()
    p = _mpirun(3, args, cwd=tmp_path, timeout=120, SPARSECNN_FAULT_INJECT="1:3:kill")
    assert time.monotonic() - t0 < 120
    assert p.returncode != 0
    assert "signal 9" in p.stdout + p.stderr, p.stdout + p.stderr   # the kill ended it
    assert not (tmp_path / "m.npz").exists()


@needs_mpi
def test_resume_with_another_number_of_ranks(tmp_path):
    base = ["-m", "sparsecnn", "train", "--data", "synthetic", "--classes", "3", "--l", "2",
            "--k", "4", "--repeats", "1", "--quiet"]
    one = subprocess.run([sys.executable, *base, "--epochs", "2", "--out", "one.npz"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    p = _mpirun(2, [*base, "--epochs", "1", "--out", "a.npz", "--checkpoint", "ck.npz"],
                cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    p = _mpirun(3, [*base, "--epochs", "2", "--out", "b.npz", "--checkpoint", "ck.npz",
                    "--resume"], cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    import sparsecnn as scn
    a, b = scn.load(tmp_path / "one.npz"), scn.load(tmp_path / "b.npz")
    for x, y in zip(a.parameters(), b.parameters()):
        np.testing.assert_allclose(y.data, x.data, rtol=1e-5, atol=1e-5)


def _buffers(z) -> list[np.ndarray]:
    return [z[f"buf_{i}"] for i in range(len([k for k in z.files if k.startswith("buf_")]))]


@pytest.fixture(scope="module")
def single_bn():
    m = W.model(bn=True)
    train, test = W.datasets()
    T.fit(m, train, test, comm=False, **W.SETTINGS)
    bufs = [b.copy() for mod in m.modules() for b in mod._buffers().values()]
    return [p.data.copy() for p in m.parameters()], bufs


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_sync_batchnorm_gives_the_statistics_of_one_process(n, single_bn, tmp_path):
    """sync_batchnorm=True: N ranks with local batch B/N train the batch-norm model of one
    process with batch B (parameters and running statistics to 1e-5, the tolerance and reason
    of the module docstring); per-rank statistics (the default) do not."""
    ref, ref_bufs = single_bn
    z = _worker(n, tmp_path / "s.npz", "bn", "sync")
    got, bufs = _params(z), _buffers(z)
    assert len(got) == len(ref) and len(bufs) == len(ref_bufs) == 6
    for a, b in zip(got + bufs, ref + ref_bufs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    if n == 2:
        local = _params(_worker(n, tmp_path / "l.npz", "bn"))
        assert max(float(np.abs(a - b).max()) for a, b in zip(local, ref)) > 1e-3


def test_batchnorm_sync_requires_a_sample_per_rank(monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)        # fit's abort hook: undone
    monkeypatch.setattr(distributed, "_abort_hook_installed", False)

    class FakeComm:
        def Get_rank(self):
            return 0

        def Get_size(self):
            return 4

        def Allreduce(self, *a, **k):   # pragma: no cover - not reached
            raise AssertionError

    train, _ = W.datasets()
    with pytest.raises(ValueError, match="at least one sample per rank"):
        T.fit(W.model(bn=True), train, comm=FakeComm(), sync_batchnorm=True, batch_size=3,
              epochs=1, progress=False)


@needs_mpi
def test_cuda_simulation_ranks_train_the_model_of_the_cpu(single, single_bn, tmp_path):
    """device="cuda" under SPARSECNN_CUDA_SIM=1 on 2 ranks: the device path up to the
    communicator (device arrays on host memory, reduced through MPI; NCCL needs a real GPU,
    see bench/gpu_check.py) gives the one-process CPU model to the tolerance above."""
    from sparsecnn import backend
    if not backend.gpu_status()[0] and not _sim_ok():
        pytest.skip("the CUDA simulation needs a host C++ compiler with OpenMP")
    ref, _ = single
    p = _mpirun(2, ["-m", "tests.mpi_worker", str(tmp_path / "g.npz"), "cuda"], timeout=600,
                SPARSECNN_CUDA_SIM="1")
    assert p.returncode == 0, p.stdout + p.stderr
    z = np.load(tmp_path / "g.npz")
    assert str(z["device"]) == "cuda"    # trained on the (simulated) device
    got = _params(z)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # synchronised batch norm on the device: its statistics go through the host (MPI) too
    p = _mpirun(2, ["-m", "tests.mpi_worker", str(tmp_path / "b.npz"), "bn", "sync", "cuda"],
                timeout=600, SPARSECNN_CUDA_SIM="1")
    assert p.returncode == 0, p.stdout + p.stderr
    z = np.load(tmp_path / "b.npz")
    for a, b in zip(_params(z) + _buffers(z), single_bn[0] + single_bn[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _sim_ok() -> bool:
    from sparsecnn import _gpu
    return _gpu.find_host_compiler() is not None


def test_local_rank_from_the_launchers_environment(monkeypatch):
    for name in (*distributed._LAUNCHER_LOCAL_RANK_VARS, "PMI_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.local_rank() == 0
    monkeypatch.setenv("PMI_RANK", "5")
    assert distributed.local_rank() == 5            # the global rank: one node
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "2")
    assert distributed.local_rank() == 2
    monkeypatch.setenv("MPI_LOCALRANKID", "1")
    assert distributed.local_rank() == 1            # MPICH's first
    monkeypatch.setenv("SPARSECNN_CUDA_SIM", "1")
    assert distributed.use_local_device() is None   # one simulated device: nothing to pick


@needs_mpi
def test_an_uncaught_error_in_fit_on_one_rank_aborts_the_job(tmp_path):
    """The Python API under plain ``mpiexec -n 3 python3 script.py`` (no CLI, no
    ``-m mpi4py``): fit's abort hook ends every rank in bounded time with the rank's line."""
    t0 = time.monotonic()
    p = _mpirun(3, ["-m", "tests.mpi_worker", str(tmp_path / "x.npz")], timeout=120,
                SPARSECNN_FAULT_INJECT="2:2")
    assert time.monotonic() - t0 < 120
    assert p.returncode != 0
    assert ("sparsecnn: error (rank 2 of 3): RuntimeError: injected fault on rank 2 at step 2"
            in p.stderr), p.stderr
    assert not (tmp_path / "x.npz").exists()
