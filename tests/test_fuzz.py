"""Differential fuzzing: whole random networks against the dense oracle.

Hypothesis draws a stack of the layer vocabulary (Convolution f/s, SubmanifoldConvolution,
MaxPooling, AveragePooling, NetworkInNetwork, ReLU, LeakyReLU, BatchNorm in training and
eval mode, eval-mode Dropout; blocks that reach Sequential's fused convolution + max-pooling
(+ activation) and max-pooling + activation paths), a head (the sparse output, SparseToDense,
or a DeepCNet-like SparseToDense + Flatten + Linear; now and then a DeepCNet / DeepCNiN model),
d = 1..3, a grid that fits every layer's (N - f) % s rule (built from the output size
backwards, as Sequential.input_size does), a density (no site, one site, ..., all), channel
counts, float32/float64, the ground state on, off or mixed layer by layer, and a zero or
nonzero input ground. It checks the output at every site (its active set and ground) or the
logits, and every gradient (parameters, input features, input ground) against
ref.net_forward / ref.net_backward in float64, at 1 and at 2 OpenMP threads.

CI runs FUZZ_EXAMPLES (default 200) derandomized examples per thread count. Longer runs:

    SPARSECNN_FUZZ_EXAMPLES=10000 python3 -m pytest tests/test_fuzz.py
    SPARSECNN_FUZZ_SEED=7 ...      # other examples than the fixed CI ones
    SPARSECNN_FUZZ_THREADS=2 ...   # one thread count only
"""
from __future__ import annotations

import os
import time
from collections import Counter

import numpy as np
import pytest
import threadpoolctl
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import event as _hypothesis_event
from hypothesis import strategies as st

import sparsecnn as scn
from sparsecnn import _cpu
from tests import dense_reference as ref
from tests.sparse_helpers import check_net, np_, oracle_input, oracle_net, random_sites

FUZZ_EXAMPLES = int(os.environ.get("SPARSECNN_FUZZ_EXAMPLES", "200"))
FUZZ_SEED = os.environ.get("SPARSECNN_FUZZ_SEED")
THREADS = [int(t) for t in os.environ.get("SPARSECNN_FUZZ_THREADS", "1,2").split(",")]

MAX_SITES = 1200          # batch * grid volume of the input: keeps the dense oracle fast
# comparison: |actual - expected| <= TOL * (1 + scale) + TOL * |expected|, scale: the largest
# magnitude among the outputs, or among all the gradients (see check_net)
TOL = {np.dtype(np.float32): 5e-4, np.dtype(np.float64): 1e-9}
# an activation input or a max-pooling runner-up this close (relative) to its branch point
# can take the other side in float32/float64 rounding: then only the forward is compared
BRANCH = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-11}

FILTERS = st.sampled_from([2, 3, 1])     # hypothesis favours the first: a real window
STRIDES = st.sampled_from([1, 2, 3])
STATS: Counter = Counter()   # what the examples covered, printed after each run (-s)


def event(what: str) -> None:
    _hypothesis_event(what)
    STATS[what] += 1


SIZE_CHANGING = ["conv", "maxpool", "avgpool", "conv_pool", "pool_act"]
SIZE_KEEPING = ["subm", "nin", "relu", "leaky", "bn_eval", "bn_train", "dropout", "subm1"]


def _close(dtype):
    t = TOL[np.dtype(dtype)]

    def close(actual, expected, what, scale):
        a = np.asarray(np_(actual), dtype=np.float64)
        e = np.asarray(expected, dtype=np.float64)
        assert a.shape == e.shape, f"{what}: shape {a.shape}, expected {e.shape}"
        np.testing.assert_allclose(a, e, rtol=t, atol=t * (1.0 + scale), err_msg=what)

    return close


@st.composite
def blocks(draw, d, batch, out_size, c_out, cap):
    """Blocks from the last to the first with their channels and sizes: a list of
    (block, c_in, c_out), and the input size per dim."""
    n_blocks = draw(st.integers(1, 6))
    size = list(out_size)
    c = c_out
    out = []
    for _ in range(n_blocks):
        kind = draw(st.sampled_from(SIZE_CHANGING + SIZE_KEEPING))
        if kind in SIZE_CHANGING:
            if kind == "conv_pool":     # conv, max pooling with pool size == stride, act?
                f, s, p = draw(FILTERS), draw(st.integers(1, 2)), draw(st.sampled_from([2, 3, 1]))
                spec = (kind, f, s, p, draw(st.sampled_from([None, 0.0, 0.01, 1 / 3])))
                new = [(n * p - 1) * s + f for n in size]
            elif kind == "pool_act":    # max pooling (any stride) and an activation
                f, s = draw(FILTERS), draw(STRIDES)
                spec = (kind, f, s, None, draw(st.sampled_from([0.0, 0.01, 1 / 3])))
                new = [(n - 1) * s + f for n in size]
            else:
                f, s = draw(FILTERS), draw(STRIDES)
                spec = (kind, f, s)
                new = [(n - 1) * s + f for n in size]
            if batch * int(np.prod(new)) > cap:
                kind = draw(st.sampled_from(SIZE_KEEPING))
            else:
                size = new
        if kind in SIZE_KEEPING:
            if kind == "subm":
                spec = (kind, draw(st.sampled_from([1, 3])))
            elif kind == "leaky":
                spec = (kind, draw(st.sampled_from([0.01, 0.2, 1 / 3])))
            else:
                spec = (kind,)
        changes_channels = spec[0] in ("conv", "conv_pool", "subm", "subm1", "nin")
        c_in = draw(st.integers(1, 4)) if changes_channels else c
        out.append((spec, c_in, c))
        c = c_in
    return out[::-1], size


def _build(block_list, d, dtype, rng, modes):
    """Library layers of the blocks, modes set ('ground', 'zero', 'mixed': random per layer)."""
    layers = []
    for spec, c_in, c_out in block_list:
        kind = spec[0]
        if kind == "conv":
            layers.append(scn.Convolution(c_in, c_out, spec[1], spec[2], dim=d,
                                          dtype=dtype, bias=bool(rng.integers(0, 4))))
        elif kind == "conv_pool":
            _, f, s, p, slope = spec
            layers += [scn.Convolution(c_in, c_out, f, s, dim=d, dtype=dtype),
                       scn.MaxPooling(p, dim=d)]
            if slope is not None:
                layers.append(scn.ReLU() if slope == 0 else scn.LeakyReLU(slope))
        elif kind == "pool_act":
            _, f, s, _, slope = spec
            layers += [scn.MaxPooling(f, s, dim=d),
                       scn.ReLU() if slope == 0 else scn.LeakyReLU(slope)]
        elif kind in ("maxpool", "avgpool"):
            cls = scn.MaxPooling if kind == "maxpool" else scn.AveragePooling
            layers.append(cls(spec[1], spec[2], dim=d))
        elif kind in ("subm", "subm1"):
            f = spec[1] if kind == "subm" else 1
            layers.append(scn.SubmanifoldConvolution(c_in, c_out, f, dim=d, dtype=dtype,
                                                     bias=bool(rng.integers(0, 4))))
        elif kind == "nin":
            layers.append(scn.NetworkInNetwork(c_in, c_out, dtype=dtype))
        elif kind == "relu":
            layers.append(scn.ReLU())
        elif kind == "leaky":
            layers.append(scn.LeakyReLU(spec[1]))
        elif kind in ("bn_eval", "bn_train"):
            bn = scn.BatchNorm(c_out, dtype=dtype)
            bn.running_mean[:] = rng.standard_normal(c_out)
            bn.running_var[:] = rng.random(c_out) + 0.3
            bn.train(kind == "bn_train")
            layers.append(bn)
        else:
            layers.append(scn.Dropout(float(rng.uniform(0.1, 0.6))).eval())
    for m in layers:
        m.set_ground_state(modes == "ground" or (modes == "mixed" and bool(rng.integers(0, 2))))
    return layers


def _set_params(net, rng, dtype):
    for p in net.parameters():
        if p.data.ndim == 1:
            p.data = (rng.standard_normal(p.shape) * 0.5).astype(dtype)
        else:
            fan_in = int(np.prod(p.shape[:-1]))
            p.data = (rng.standard_normal(p.shape) * 1.3 / np.sqrt(fan_in)).astype(dtype)


@st.composite
def cases(draw):
    """(net, x, numpy rng, description)."""
    d = draw(st.integers(1, 3))
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    batch = draw(st.integers(1, 3))
    modes = draw(st.sampled_from(["ground", "zero", "mixed"]))
    head = draw(st.sampled_from(["sparse", "to_dense", "linear", "linear", "model"]))
    density = draw(st.sampled_from([0.3, 0.1, 0.6, 1.0, 0.02, "one", 0.0]))
    c_out = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if head == "model":
        arch = draw(st.sampled_from(["DeepCNet", "DeepCNiN"]))
        l = draw(st.integers(1, 2 if d < 3 else 1))
        slope = draw(st.sampled_from(["relu", "leaky", "vleaky", 0.2]))
        net = getattr(scn.models, arch)(l, draw(st.integers(1, 3)), in_channels=c_out,
                                        num_classes=3, activation=slope, dim=d, dtype=dtype,
                                        seed=int(rng.integers(0, 1000)))
        net.set_ground_state(modes == "ground")
        if modes == "mixed":
            for m in net.modules():
                m.set_ground_state(bool(rng.integers(0, 2)))
        spatial = (net.input_size,) * d
        c_in = c_out
        desc = f"{arch}(l={l}) {slope}"
    else:
        out_size = [draw(st.integers(1, 3)) for _ in range(d)]
        block_list, spatial = draw(blocks(d, batch, out_size, c_out, MAX_SITES))
        layers = _build(block_list, d, dtype, rng, modes)
        c_in = block_list[0][1]
        if head in ("to_dense", "linear"):
            layers.append(scn.SparseToDense())
        if head == "linear":
            layers += [scn.Flatten(), scn.Linear(c_out * int(np.prod(out_size)), 3, dtype=dtype)]
        net = scn.Sequential(*layers)
        desc = " ".join(type(m).__name__ + ("" if m.ground_state else "(0)") for m in net)
        for a, b in zip(layers, layers[1:]):
            if type(a) is scn.Convolution and type(b) is scn.MaxPooling and \
                    b.pool_size == b.stride:
                event("fused convolution + max pooling")
            if type(a) is scn.MaxPooling and type(b) in (scn.ReLU, scn.LeakyReLU):
                event("fused max pooling + activation")
    _set_params(net, rng, dtype)
    coords = random_sites(rng, batch, tuple(spatial), density)
    feats = rng.standard_normal((len(coords), c_in)).astype(dtype)
    ground = draw(st.sampled_from(["random", None]))
    g = None if ground is None else rng.standard_normal(c_in).astype(dtype)
    x = scn.SparseTensor(coords, feats, tuple(spatial), batch_size=batch, ground=g,
                         requires_grad=True)
    note(f"d={d} {dtype} batch={batch} grid={tuple(spatial)} sites={len(coords)} "
         f"ground={ground} modes={modes}: {desc}")
    event("examples")
    event(f"d={d}")
    event(f"{dtype}")
    event(f"modes={modes}")
    event(f"head={head}")
    return net, x, rng


def _bn_amplification(stats, eps=1e-5):
    """Bound on how much the training-mode batch norms of a network amplify rounding error:
    a layer whose batch holds (n >= 2 copies of) one value in a channel (variance << eps)
    normalises pure rounding noise, by up to |gamma| / sqrt(eps); product over such layers."""
    amp = 1.0
    for n, var, gamma in stats:
        flat = (var < 100 * eps) & (n >= 2)
        if flat.any():
            amp *= max(1.0, float(np.abs(gamma[flat]).max()) / np.sqrt(eps))
    return amp


def _as_float64(net, x):
    net.astype(np.float64)
    x64 = scn.SparseTensor(np_(x.coords), np_(x.features).astype(np.float64), x.spatial_shape,
                           batch_size=x.batch_size, ground=np_(x.ground).astype(np.float64),
                           requires_grad=True)
    return net, x64


def _run_case(net, x, rng):
    layers = list(net.features) + [net.classifier] if hasattr(net, "classifier") else list(net)
    specs, params = oracle_net(layers)
    try:
        margin = ref.net_branch_margin(*oracle_input(x), specs, params)
    except ValueError as e:   # the oracle refuses: a training-mode batch norm with no site
        assert "at least one active site" in str(e)
        event("batch norm in training mode without sites: ValueError")
        with pytest.raises(ValueError, match="at least one active site"):
            net(x)
        return
    amp = _bn_amplification(ref.net_batchnorm_stats(*oracle_input(x), specs, params))
    if amp > 1:
        # a batch norm of a constant batch: float32 rounding noise normalised to O(1);
        # check the same network in float64, to a tolerance that allows for the gain
        event("batch norm of a constant batch: checked in float64")
        net, x = _as_float64(net, x)
        t = TOL[np.dtype(np.float64)] * amp

        def close(actual, expected, what, scale):
            np.testing.assert_allclose(np_(actual), expected, rtol=t, atol=t * (1 + scale),
                                       err_msg=what)

        if margin >= BRANCH[np.dtype(np.float64)] * amp:
            check_net(net, x, rng, close)
        return
    close = _close(x.dtype)
    if margin < BRANCH[np.dtype(x.dtype)]:
        # rounding may take the other branch of a kink: compare the values only
        event("near a branch point: forward only")
        with scn.no_grad():
            y = net(x)
        y_ref = ref.net_forward(*oracle_input(x), specs, params)[0]
        close((y.to_dense() if isinstance(y, scn.SparseTensor) else y).numpy(), y_ref,
              "forward", float(np.abs(y_ref).max()) if y_ref.size else 0.0)
        return
    check_net(net, x, rng, close)


def _fuzz_settings(fn):
    fn = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                  derandomize=FUZZ_SEED is None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(fn)
    return fn if FUZZ_SEED is None else seed(int(FUZZ_SEED))(fn)


@_fuzz_settings
@given(case=cases())
def _fuzz(case):
    _run_case(*case)


_OMP = threadpoolctl.ThreadpoolController()


@pytest.mark.parametrize("threads", THREADS)
def test_random_networks_match_the_dense_oracle(threads):
    if threads > 1 and not _cpu.USE_OPENMP:
        pytest.skip("built without OpenMP")
    STATS.clear()
    t0 = time.perf_counter()
    try:
        with _OMP.limit(limits=threads, user_api="openmp"):
            assert _cpu.max_threads() == threads
            _fuzz()
    finally:
        print(f"\n{threads} thread(s), {time.perf_counter() - t0:.1f} s: "
              + ", ".join(f"{k} {v}" for k, v in sorted(STATS.items())))
