"""Whole DeepCNet(5, 32) on the handwriting workload: sparse vs dense NumPy vs PyTorch dense.

Every sparse step builds a fresh SparseTensor, so rulebook building is included, as in
training on new batches.
"""
import numpy as np
import pytest
from conftest import record, torch_deepcnet

import sparsecnn as scn
from sparsecnn import _cpu, stats
from tests import dense_reference as ref


def test_workload_matches_shared_file(workload_a):
    from pathlib import Path
    shared = Path(__file__).parents[2] / "shared" / "workloads" / "handwriting_b64_s96.npz"
    assert len(workload_a["coords"]) == 11808
    if shared.exists():
        np.testing.assert_array_equal(np.load(shared)["coords"], workload_a["coords"])


def test_net_forward_sparse(benchmark, model, make_input):
    rows = stats.layer_stats(model, make_input())
    sp, de = stats.total_macs(rows)
    benchmark(lambda: model(make_input()))
    record(benchmark, "net forward sparse", flops=2 * sp, macs_sparse=sp, macs_dense=de)


def test_net_fwd_bwd_sparse(benchmark, model, make_input, labels):
    sp, _ = stats.total_macs(stats.layer_stats(model, make_input()))

    def step():
        loss = scn.cross_entropy(model(make_input()), labels)
        loss.backward()
        model.zero_grad()
    benchmark(step)
    record(benchmark, "net fwd+bwd sparse", flops=6 * sp)


def test_rulebooks_all_layers(benchmark, make_input):
    """All rulebooks of DeepCNet(5, 32) for a fresh input (hash + 6 conv + 5 pool windows)."""
    def build():
        g = make_input().geometry
        for i in range(6):
            _, g = g.conv(3 if i == 0 else 2, 1)
            if i < 5:
                _, g = g.conv(2, 2)
    benchmark(build)
    record(benchmark, "rulebooks all layers")


def _dense_params(model):
    return [p.data for p in model.parameters()]


def test_net_forward_dense_numpy(benchmark, model, dense_input):
    params = _dense_params(model)
    benchmark.pedantic(ref.deepcnet_forward, args=(dense_input, params, 5, 0.0), rounds=3,
                       iterations=1)
    record(benchmark, "net forward dense numpy")


def test_net_fwd_bwd_dense_numpy(benchmark, model, dense_input, labels):
    params = _dense_params(model)

    def step():
        logits = ref.deepcnet_forward(dense_input, params, 5, 0.0)
        g = ref.cross_entropy_backward(logits, labels)
        ref.deepcnet_backward(dense_input, params, 5, 0.0, g)
    benchmark.pedantic(step, rounds=3, iterations=1)
    record(benchmark, "net fwd+bwd dense numpy")


def test_sparse_equals_dense_on_workload(model, make_input, dense_input):
    """The benchmark compares equal things: same logits from both."""
    a = model(make_input()).numpy()
    b = ref.deepcnet_forward(dense_input, _dense_params(model), 5, 0.0)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def torch_net(model):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(_cpu.max_threads())
    return torch, torch_deepcnet(torch, model)


def test_net_forward_torch_dense(benchmark, torch_net, dense_input, model, make_input):
    torch, net = torch_net
    x = torch.from_numpy(dense_input)
    np.testing.assert_allclose(net(x).detach().numpy(), model(make_input()).numpy(),
                               rtol=1e-3, atol=1e-3)
    benchmark(lambda: net(x))
    record(benchmark, "net forward torch dense")


def test_net_fwd_bwd_torch_dense(benchmark, torch_net, dense_input, labels):
    torch, net = torch_net
    x = torch.from_numpy(dense_input)
    y = torch.from_numpy(labels)

    def step():
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        net.zero_grad()
    benchmark(step)
    record(benchmark, "net fwd+bwd torch dense")


def test_sgemm(benchmark, sgemm_gflops):
    """Reference point: scipy's sgemm on 2048^3 in this process."""
    from scipy.linalg.blas import sgemm
    a = np.asfortranarray(np.random.default_rng(0).standard_normal((2048, 2048), np.float32))
    benchmark.pedantic(sgemm, args=(1.0, a, a), rounds=5, iterations=1)
    record(benchmark, "sgemm 2048^3 (benchmark)", flops=2 * 2048**3)
