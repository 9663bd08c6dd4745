"""Data-parallel scaling (bench/mpi_scaling.py): 1 rank x 2 threads against 2 ranks x 1 thread.

Not a pytest-benchmark timing (the two layouts run in their own processes); the figures go to
the terminal summary through RESULTS, and the test checks the run is sane: same global batch,
the allreduce moved the float32 gradients plus one flag per parameter.
"""
import mpi_scaling
import pytest
from conftest import RESULTS

pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install 'sparsecnn[mpi]')")
if mpi_scaling._mpiexec() is None:
    pytest.skip("mpiexec not found (pip install 'sparsecnn[mpi]')", allow_module_level=True)


def test_mpi_scaling_one_rank_two_threads_vs_two_ranks_one_thread():
    res = mpi_scaling.measure(steps=3, ranks=2, threads=2)
    one, many = res["one_process"], res["mpi"]
    assert one["ranks"] == 1 and many["ranks"] == 2
    assert one["global_batch"] == many["global_batch"] == 64
    n = many["parameters"]
    assert many["allreduce_bytes_per_step"] == 4 * (n + len(_params()))
    assert many["allreduce_ms_per_step"] > 0
    RESULTS["mpi 1 rank x 2 threads step"] = {
        "median_ms": one["step_ms"], "samples_per_second": round(one["samples_per_second"])}
    RESULTS["mpi 2 ranks x 1 thread step"] = {
        "median_ms": many["step_ms"], "samples_per_second": round(many["samples_per_second"]),
        "allreduce_bytes": many["allreduce_bytes_per_step"],
        "allreduce_ms": round(many["allreduce_ms_per_step"], 2)}


def _params():
    import sparsecnn as scn
    return scn.models.DeepCNet(5, 32, num_classes=10, seed=0).parameters()
