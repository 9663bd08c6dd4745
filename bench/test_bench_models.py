"""A small sparse ResNet and the U-Net on the handwriting workload, against PyTorch dense.

Workload: the shared strokes (64 samples, 96x96, 11,808 active sites; bench/workload.py). Every
sparse step builds a fresh SparseTensor, so rulebooks and unions are built again, as in
training on new batches. All on the CPU.

- ResNet: ``scn.models.ResNet((16, 32, 64), 1)``: submanifold 3x3 blocks with residual sums,
  two strided downsamplings, global average pooling, a linear head; cross-entropy per sample.
- U-Net: ``scn.models.UNet((16, 32, 64), 1, num_classes=6)`` (zero-ground mode, as it is
  built): 96 is a multiple of 2**2, so it takes the workload's grid as it is; per-site logits,
  ``scn.site_cross_entropy`` with random per-site labels.

The PyTorch networks (when torch is importable; skipped with the reason otherwise) are the same
layer sequences run densely over the whole 96x96 grid: submanifold convolution -> padded
``Conv2d`` of the same filter, strided convolution -> ``Conv2d``, deconvolution ->
``ConvTranspose2d``, batch norm -> ``BatchNorm2d``, global average pooling -> mean, 1x1 (NiN)
-> 1x1 ``Conv2d``, the U-Net's loss over the active pixels only; the weights are copied where
the layouts allow (design.md). This is a **cost comparison, not an equality test**: a
submanifold convolution keeps the active set and the zero-ground mode applies biases at
active sites only, so the dense networks compute different numbers on the strokes (only shapes
are checked there). The weight copy itself is checked on a fully active grid in the zero-ground
mode, where the two are the same function.

The share of a training step spent in the new ops (``scn.add`` behind ``Residual``,
``scn.concat`` behind ``Concat``, ``Deconvolution``, global average pooling) is measured
outside the benchmark timings: a few extra steps with those functions and their backward
closures wrapped by timers. The medians go into conftest's RESULTS table; the ratios and the
shares are printed in a section of their own after it.
"""
from __future__ import annotations

import contextlib
import time
from unittest import mock

import numpy as np
import pytest
from conftest import RESULTS, record

import sparsecnn as scn
from sparsecnn import _cpu, combine, deconv, heads
from tests import dense_reference as ref

SIZE, BATCH = 96, 64
RESNET_ARGS = dict(widths=(16, 32, 64), blocks=1, num_classes=10)
UNET_ARGS = dict(widths=(16, 32, 64), reps=1, num_classes=6)
SHARE_STEPS = 3
SHARES: dict[str, dict] = {}

# The new ops: (module, forward function, group) and the autograd node names of their backward.
_FORWARDS = [(combine, "add", "add / Residual"), (combine, "concat", "concat / Concat"),
             (deconv, "deconvolution", "Deconvolution"),
             (heads, "global_average_pool", "global average pooling")]
_NODES = {"add": "add / Residual", "concat": "concat / Concat",
          "deconvolution": "Deconvolution", "global_average_pool": "global average pooling"}


@contextlib.contextmanager
def op_timers():
    """Wrap the new ops' forward functions and backward closures with timers; yields the
    dict group -> seconds, filled while the context is open."""
    spent = {g: 0.0 for g in _NODES.values()}

    def timed(fn, group):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[group] += time.perf_counter() - t
        return wrapper

    def timed_record(real):
        def wrapper(out, parents, backward_fn, name=""):
            if name in _NODES:
                backward_fn = timed(backward_fn, _NODES[name])
            return real(out, parents, backward_fn, name)
        return wrapper

    with contextlib.ExitStack() as stack:
        for mod, fname, group in _FORWARDS:
            stack.enter_context(mock.patch.object(mod, fname, timed(getattr(mod, fname), group)))
        for mod in (combine, deconv, heads):
            stack.enter_context(mock.patch.object(mod, "record", timed_record(mod.record)))
        yield spent


def measure_shares(name: str, step) -> None:
    """Run ``step`` SHARE_STEPS times under op_timers; store each group's share of the time."""
    step()  # warm-up, untimed
    with op_timers() as spent:
        t = time.perf_counter()
        for _ in range(SHARE_STEPS):
            step()
        total = time.perf_counter() - t
    SHARES[name] = {"step_ms": 1e3 * total / SHARE_STEPS,
                    **{g: s / total for g, s in spent.items() if s > 0}}


class _Summary:
    """Printed after conftest's table: sparse vs PyTorch and the new ops' shares."""

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter):
        tr = terminalreporter
        tr.section("sparse ResNet / U-Net (bench/test_bench_models.py)")
        for net in ("resnet", "unet"):
            for what in ("forward", "fwd+bwd"):
                s = RESULTS.get(f"{net} {what} sparse", {}).get("median_ms")
                d = RESULTS.get(f"{net} {what} torch dense", {}).get("median_ms")
                line = f"  {net} {what}: sparse {s:.1f} ms" if s else f"  {net} {what}: sparse -"
                if s and d:
                    line += f", PyTorch dense {d:.1f} ms: sparse {d / s:.2f}x faster"
                else:
                    line += ", PyTorch dense not measured"
                tr.write_line(line)
        for name, r in SHARES.items():
            parts = [f"{g} {100 * v:.1f}%" for g, v in r.items() if g != "step_ms"]
            new = sum(v for g, v in r.items() if g != "step_ms")
            tr.write_line(f"  {name} ({r['step_ms']:.1f} ms/step with timers): new ops "
                          f"{100 * new:.1f}% = " + ", ".join(parts))


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    plugin = _Summary()
    request.config.pluginmanager.register(plugin, "bench_models_summary")
    yield
    # stays registered for the terminal summary; unregistered by pytest at exit


@pytest.fixture(scope="module")
def resnet():
    return scn.models.ResNet(RESNET_ARGS["widths"], RESNET_ARGS["blocks"],
                             num_classes=RESNET_ARGS["num_classes"], seed=0)


@pytest.fixture(scope="module")
def unet():
    return scn.models.UNet(UNET_ARGS["widths"], UNET_ARGS["reps"],
                           num_classes=UNET_ARGS["num_classes"], seed=0)


@pytest.fixture(scope="module")
def site_labels(workload_a):
    n = len(workload_a["coords"])
    return np.random.default_rng(1).integers(0, UNET_ARGS["num_classes"], n)


def resnet_step(model, make_input, labels):
    def step():
        scn.cross_entropy(model(make_input()), labels).backward()
        model.zero_grad()
    return step


def unet_step(model, make_input, site_labels):
    def step():
        scn.site_cross_entropy(model(make_input()), site_labels).backward()
        model.zero_grad()
    return step


def test_resnet_forward_sparse(benchmark, resnet, make_input):
    assert resnet(make_input()).numpy().shape == (BATCH, RESNET_ARGS["num_classes"])
    benchmark(lambda: resnet(make_input()))
    record(benchmark, "resnet forward sparse", active_in=int(make_input().n_active))


def test_resnet_fwd_bwd_sparse(benchmark, resnet, make_input, labels):
    step = resnet_step(resnet, make_input, labels)
    benchmark(step)
    record(benchmark, "resnet fwd+bwd sparse")


def test_unet_forward_sparse(benchmark, unet, make_input):
    x = make_input()
    assert unet(x).features.shape == (x.n_active, UNET_ARGS["num_classes"])
    benchmark(lambda: unet(make_input()))
    record(benchmark, "unet forward sparse", active_in=int(x.n_active))


def test_unet_fwd_bwd_sparse(benchmark, unet, make_input, site_labels):
    step = unet_step(unet, make_input, site_labels)
    benchmark(step)
    record(benchmark, "unet fwd+bwd sparse")


def test_resnet_new_op_share(resnet, make_input, labels):
    """add (Residual) and global average pooling as a share of a ResNet training step."""
    measure_shares("resnet fwd+bwd", resnet_step(resnet, make_input, labels))
    r = SHARES["resnet fwd+bwd"]
    assert "add / Residual" in r and "global average pooling" in r  # the timers saw the ops
    assert 0 < sum(v for g, v in r.items() if g != "step_ms") < 1


def test_unet_new_op_share(unet, make_input, site_labels):
    """concat (Concat) and Deconvolution as a share of a U-Net training step."""
    measure_shares("unet fwd+bwd", unet_step(unet, make_input, site_labels))
    r = SHARES["unet fwd+bwd"]
    assert "concat / Concat" in r and "Deconvolution" in r
    assert 0 < sum(v for g, v in r.items() if g != "step_ms") < 1


def test_op_timers_restore():
    """The timers are gone after the context: the library's own functions are back."""
    before = [getattr(m, f) for m, f, _ in _FORWARDS] + [m.record for m in (combine, deconv,
                                                                            heads)]
    with op_timers():
        assert combine.add is not before[0]
    after = [getattr(m, f) for m, f, _ in _FORWARDS] + [m.record for m in (combine, deconv,
                                                                           heads)]
    assert after == before


# -- PyTorch dense -----------------------------------------------------------------------------
def _to_torch(torch, m):
    """The dense PyTorch form of a sparse module tree, weights copied (cost comparison)."""
    nn = torch.nn

    def param(a):
        return nn.Parameter(torch.from_numpy(np.ascontiguousarray(a)))

    class Residual(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x):
            return x + self.block(x)

    class Concat(nn.Module):
        def __init__(self, branches):
            super().__init__()
            self.branches = nn.ModuleList(branches)

        def forward(self, x):
            return torch.cat([b(x) for b in self.branches], 1)

    class GlobalAverage(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    if isinstance(m, scn.Sequential):
        return nn.Sequential(*(_to_torch(torch, c) for c in m))
    if isinstance(m, scn.Residual):
        assert m.shortcut is None
        return Residual(_to_torch(torch, m.block))
    if isinstance(m, scn.Concat):
        return Concat([_to_torch(torch, b) for b in m.branches])
    if isinstance(m, (scn.SubmanifoldConvolution, scn.Convolution)):
        f = m.filter_size
        sub = isinstance(m, scn.SubmanifoldConvolution)
        t = nn.Conv2d(m.in_channels, m.out_channels, f, stride=1 if sub else m.stride,
                      padding=f // 2 if sub else 0)
        t.weight = param(ref.weight_to_torch_layout(m.weight.data, f, 2))
        t.bias = param(m.bias.data)
        return t
    if isinstance(m, scn.Deconvolution):
        f = m.filter_size
        t = nn.ConvTranspose2d(m.in_channels, m.out_channels, f, stride=m.stride)
        # weight[k, ci, co] == torch_weight[ci, co, i0, i1]
        w = m.weight.data
        t.weight = param(np.transpose(w, (1, 2, 0)).reshape(w.shape[1], w.shape[2], f, f))
        t.bias = param(m.bias.data)
        return t
    if isinstance(m, scn.NetworkInNetwork):
        t = nn.Conv2d(m.in_channels, m.out_channels, 1)
        t.weight = param(m.weight.data.T[:, :, None, None])
        t.bias = param(m.bias.data)
        return t
    if isinstance(m, scn.BatchNorm):
        t = nn.BatchNorm2d(m.channels, eps=m.eps, momentum=m.momentum)
        t.weight = param(m.weight.data)
        t.bias = param(m.bias.data)
        return t
    if isinstance(m, scn.ReLU):
        return nn.ReLU()
    if isinstance(m, scn.GlobalAveragePooling):
        return GlobalAverage()
    if isinstance(m, scn.Linear):
        t = nn.Linear(m.in_features, m.out_features)
        t.weight = param(m.weight.data.T)
        t.bias = param(m.bias.data)
        return t
    if isinstance(m, (scn.models.ResNet, scn.models.UNet)):
        children = [m.features] + ([m.pool] if isinstance(m, scn.models.ResNet) else [])
        return nn.Sequential(*(_to_torch(torch, c) for c in children + [m.classifier]))
    raise TypeError(f"no dense PyTorch form for {type(m).__name__}")


@pytest.fixture(scope="module")
def torch_mod():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: no dense baseline")
    torch.set_num_threads(_cpu.max_threads())
    return torch


@pytest.fixture(scope="module")
def torch_input(torch_mod, dense_input):
    return torch_mod.from_numpy(dense_input)


@pytest.fixture(scope="module")
def torch_resnet(torch_mod, resnet):
    return _to_torch(torch_mod, resnet)


@pytest.fixture(scope="module")
def torch_unet(torch_mod, unet):
    return _to_torch(torch_mod, unet)


def _unet_torch_step(torch, net, x, coords, labels):
    """Logits over the whole grid, the loss over the active pixels (per-site labels)."""
    b, y, xx = (torch.from_numpy(coords[:, i].astype(np.int64)) for i in range(3))
    target = torch.from_numpy(labels)

    def step():
        logits = net(x)[b, :, y, xx]
        torch.nn.functional.cross_entropy(logits, target).backward()
        net.zero_grad()
    return step


def test_resnet_forward_torch_dense(benchmark, torch_mod, torch_resnet, torch_input):
    assert torch_resnet(torch_input).shape == (BATCH, RESNET_ARGS["num_classes"])
    benchmark.pedantic(lambda: torch_resnet(torch_input), rounds=5, iterations=1,
                       warmup_rounds=1)
    record(benchmark, "resnet forward torch dense")


def test_resnet_fwd_bwd_torch_dense(benchmark, torch_mod, torch_resnet, torch_input, labels):
    target = torch_mod.from_numpy(labels)

    def step():
        torch_mod.nn.functional.cross_entropy(torch_resnet(torch_input), target).backward()
        torch_resnet.zero_grad()
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    record(benchmark, "resnet fwd+bwd torch dense")


def test_unet_forward_torch_dense(benchmark, torch_mod, torch_unet, torch_input):
    assert torch_unet(torch_input).shape == (BATCH, UNET_ARGS["num_classes"], SIZE, SIZE)
    benchmark.pedantic(lambda: torch_unet(torch_input), rounds=5, iterations=1,
                       warmup_rounds=1)
    record(benchmark, "unet forward torch dense")


def test_unet_fwd_bwd_torch_dense(benchmark, torch_mod, torch_unet, torch_input, workload_a,
                                  site_labels):
    step = _unet_torch_step(torch_mod, torch_unet, torch_input, workload_a["coords"],
                            site_labels)
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    record(benchmark, "unet fwd+bwd torch dense")


def test_torch_copy_exact_on_a_full_grid(torch_mod):
    """Where every site is active and the mode is zero-ground, the sparse and dense networks
    are the same function (a submanifold convolution of a full grid is then the zero-padded
    one; in the ground-state mode positions outside the grid count as the ground), so this
    checks the weight copy; on the strokes they differ, as said above."""
    resnet = scn.models.ResNet(RESNET_ARGS["widths"], RESNET_ARGS["blocks"],
                               num_classes=RESNET_ARGS["num_classes"], seed=0)
    resnet.set_ground_state(False)
    unet = scn.models.UNet(UNET_ARGS["widths"], UNET_ARGS["reps"],
                           num_classes=UNET_ARGS["num_classes"], seed=0)
    rng = np.random.default_rng(2)
    b, n = 2, 16
    feats = rng.standard_normal((b * n * n, 1)).astype(np.float32)
    grid = np.stack(np.meshgrid(np.arange(b), np.arange(n), np.arange(n), indexing="ij"), -1)
    coords = grid.reshape(-1, 3).astype(np.int32)
    dense = torch_mod.from_numpy(np.ascontiguousarray(feats.reshape(b, 1, n, n)))
    x = scn.SparseTensor(coords, feats, (n, n), batch_size=b)
    np.testing.assert_allclose(_to_torch(torch_mod, resnet)(dense).detach().numpy(),
                               resnet(x).numpy(), rtol=1e-3, atol=1e-4)
    per_site = _to_torch(torch_mod, unet)(dense).detach().numpy()
    per_site = per_site.transpose(0, 2, 3, 1).reshape(-1, UNET_ARGS["num_classes"])
    np.testing.assert_allclose(per_site, np.asarray(unet(x).features), rtol=1e-3, atol=1e-4)
