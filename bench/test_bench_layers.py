"""Per-layer timings of DeepCNet(5, 32) on the handwriting workload (cached rulebooks):
each convolution forward and forward+backward with its GFLOP/s, each max-pooling, and the
dense NumPy convolution of the same layer for comparison."""
import numpy as np
import pytest
from conftest import record

import sparsecnn as scn
from tests import dense_reference as ref


@pytest.fixture(scope="module")
def layer_inputs(model, make_input):
    """(layer index, layer, its input SparseTensor) for every layer, rulebooks built."""
    out = []
    h = make_input()
    with scn.no_grad():
        for i, layer in enumerate(model.features):
            out.append((i, layer, h))
            h = layer(h)
    return out


def _convs(n):
    return [pytest.param(i, id=f"conv{i + 1}") for i in range(n)]


def _pick(layer_inputs, kind, j):
    return [t for t in layer_inputs if isinstance(t[1], kind)][j]


@pytest.mark.parametrize("j", _convs(6))
def test_conv_forward(benchmark, layer_inputs, j):
    _, conv, x = _pick(layer_inputs, scn.Convolution, j)
    rb, _ = x.geometry.conv(conv.filter_size, conv.stride)
    flops = 2 * rb.n_pairs * conv.in_channels * conv.out_channels
    with scn.no_grad():
        benchmark(conv, x)
    record(benchmark, f"conv{j + 1} forward", flops=flops, active_in=x.n_active,
           pairs=rb.n_pairs)


@pytest.mark.parametrize("j", _convs(6))
def test_conv_forward_backward(benchmark, layer_inputs, j):
    _, conv, x = _pick(layer_inputs, scn.Convolution, j)
    rb, _ = x.geometry.conv(conv.filter_size, conv.stride)
    flops = 6 * rb.n_pairs * conv.in_channels * conv.out_channels
    y = conv(x)
    G = np.random.default_rng(0).standard_normal(y.features.shape).astype(np.float32)

    def step():
        out = conv(x)
        out.backward((G, np.zeros(conv.out_channels, np.float32)))
        conv.zero_grad()
    benchmark(step)
    record(benchmark, f"conv{j + 1} fwd+bwd", flops=flops)


@pytest.mark.parametrize("j", _convs(6))
def test_conv_forward_dense_numpy(benchmark, layer_inputs, j):
    _, conv, x = _pick(layer_inputs, scn.Convolution, j)
    xd = x.numpy()
    W, b = conv.weight.data, conv.bias.data
    benchmark.pedantic(ref.conv_forward, args=(xd, W, b, conv.filter_size, conv.stride),
                       rounds=3, iterations=1)
    n_out = int(np.prod(ref.pooled_shape(x.spatial_shape, conv.filter_size, conv.stride)))
    record(benchmark, f"conv{j + 1} forward dense numpy",
           flops=2 * 64 * n_out * conv.filter_size**2 * conv.in_channels * conv.out_channels)


@pytest.mark.parametrize("j", [pytest.param(i, id=f"pool{i + 1}") for i in range(5)])
def test_maxpool_forward_backward(benchmark, layer_inputs, j):
    _, pool, x = _pick(layer_inputs, scn.MaxPooling, j)
    x = x.detach()
    x.requires_grad = True
    y = pool(x)
    G = np.random.default_rng(0).standard_normal(y.features.shape).astype(np.float32)

    def step():
        out = pool(x)
        out.backward((G, np.zeros(x.channels, np.float32)))
    benchmark(step)
    record(benchmark, f"pool{j + 1} fwd+bwd", active_in=x.n_active)
