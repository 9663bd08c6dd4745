"""Benchmark fixtures: the handwriting workload, DeepCNet(5, 32), baselines, a summary.

Run:  python -m pytest bench                     (timings; about a minute or two)
      python -m pytest bench --benchmark-disable  (smoke: every benchmark body once)
Each benchmark stores its median in RESULTS; the terminal summary prints the ratios
(sparse vs dense NumPy / PyTorch, GFLOP/s vs sgemm measured in the same run, rulebook share).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from workload import generate_workload  # noqa: E402

import sparsecnn as scn  # noqa: E402

RESULTS: dict[str, dict] = {}


def record(benchmark, name: str, **info) -> None:
    """Remember the median (ms) of a finished benchmark under ``name`` for the summary."""
    benchmark.extra_info.update(info)
    stats = getattr(benchmark, "stats", None)
    median = None
    if stats is not None and getattr(stats, "stats", None) is not None:
        median = stats.stats.median * 1e3
    RESULTS[name] = {"median_ms": median, **info}


@pytest.fixture(scope="session")
def workload_a():
    """DeepCNet(5, 32) workload: 64 random-walk stroke samples on 96x96 (11,808 sites)."""
    return generate_workload(seed=0, batch=64, size=96, region=64)


@pytest.fixture(scope="session")
def make_input(workload_a):
    """A fresh SparseTensor (new geometry: rulebooks are built again, as in training)."""
    w = workload_a

    def make(dtype=np.float32):
        return scn.SparseTensor(w["coords"], w["features"].astype(dtype), (96, 96),
                                batch_size=64)
    return make


def torch_deepcnet(torch, model):
    """The dense PyTorch network of a 2-D DeepCNet with its weights (convolutions, a 2x2
    max-pooling between them, ReLU after each, the linear classifier); weight layouts as in
    design.md: torch_weight[co, ci, i0, i1] == weight[k, ci, co], k row-major."""
    from tests import dense_reference as ref

    def host(a):
        return np.array(scn.backend.to_host(a))

    layers = []
    convs = [m for m in model.features if isinstance(m, scn.Convolution)]
    for i, c in enumerate(convs):
        conv = torch.nn.Conv2d(c.in_channels, c.out_channels, c.filter_size)
        conv.weight.data = torch.from_numpy(ref.weight_to_torch_layout(host(c.weight.data),
                                                                       c.filter_size, 2))
        conv.bias.data = torch.from_numpy(host(c.bias.data))
        layers += [conv, torch.nn.ReLU()]
        if i < len(convs) - 1:
            layers.append(torch.nn.MaxPool2d(2))
    layers.append(torch.nn.Flatten())
    cls = model.classifier
    lin = torch.nn.Linear(cls.in_features, cls.out_features)
    lin.weight.data = torch.from_numpy(host(cls.weight.data).T.copy())
    lin.bias.data = torch.from_numpy(host(cls.bias.data))
    layers.append(lin)
    return torch.nn.Sequential(*layers)


@pytest.fixture(scope="session")
def model():
    return scn.models.DeepCNet(5, 32, num_classes=10, seed=0)


@pytest.fixture(scope="session")
def labels():
    return np.random.default_rng(0).integers(0, 10, 64)


@pytest.fixture(scope="session")
def dense_input(workload_a):
    w = workload_a
    x = np.zeros((64, 1, 96, 96), np.float32)
    c = w["coords"]
    x[c[:, 0], 0, c[:, 1], c[:, 2]] = 1.0
    return x


@pytest.fixture(scope="session")
def sgemm_gflops():
    """sgemm GFLOP/s of scipy's BLAS (the one the kernels call), 2048^3, this process."""
    from scipy.linalg.blas import sgemm
    a = np.asfortranarray(np.random.default_rng(0).standard_normal((2048, 2048), np.float32))
    sgemm(1.0, a, a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        sgemm(1.0, a, a)
        best = min(best, time.perf_counter() - t)
    g = 2 * 2048**3 / best / 1e9
    RESULTS["sgemm 2048^3"] = {"median_ms": best * 1e3, "gflops": g}
    return g


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("sparsecnn benchmark summary (median ms)")
    from sparsecnn import _cpu
    threads = os.environ.get("OMP_NUM_THREADS", str(_cpu.max_threads()))
    tr.write_line(f"OpenMP threads: {threads}")
    sg = RESULTS.get("sgemm 2048^3", {}).get("gflops")
    for name, r in RESULTS.items():
        m = r.get("median_ms")
        if m is None:
            continue
        extra = []
        if "flops" in r:
            g = r["flops"] / (m * 1e-3) / 1e9
            extra.append(f"{g:6.1f} GFLOP/s" + (f" ({100 * g / sg:4.1f}% of sgemm)" if sg else ""))
        for k in ("active_in", "pairs", "macs_sparse", "macs_dense", "samples_per_second",
                  "allreduce_bytes", "allreduce_ms"):
            if k in r:
                extra.append(f"{k}={r[k]:,}")
        tr.write_line(f"  {name:<44} {m:9.2f}  {'  '.join(extra)}")

    def ratio(a, b, label):
        ma, mb = RESULTS.get(a, {}).get("median_ms"), RESULTS.get(b, {}).get("median_ms")
        if ma and mb:
            tr.write_line(f"  {label:<60} {mb / ma:7.2f}x")
    tr.write_line("ratios (how many times faster sparse is):")
    ratio("net forward sparse", "net forward dense numpy", "forward: sparse vs dense NumPy")
    ratio("net forward sparse", "net forward torch dense", "forward: sparse vs PyTorch dense")
    ratio("net fwd+bwd sparse", "net fwd+bwd dense numpy", "fwd+bwd: sparse vs dense NumPy")
    ratio("net fwd+bwd sparse", "net fwd+bwd torch dense", "fwd+bwd: sparse vs PyTorch dense")
    rb = RESULTS.get("rulebooks all layers", {}).get("median_ms")
    step = RESULTS.get("net fwd+bwd sparse", {}).get("median_ms")
    if rb and step:
        tr.write_line(f"  {'rulebook building as a share of a training step':<60} "
                      f"{100 * rb / step:6.1f}%")


def pytest_collection_modifyitems(items):
    """Dense NumPy baselines last: their multi-hundred-MB temporaries leave the allocator in a
    state that slows whatever runs after them in the same process."""
    items.sort(key=lambda item: "dense_numpy" in item.nodeid)
