"""GPU benchmarks (issue 10 section 4): DeepCNet on the CPU and on device "cuda" in one run,
and PyTorch dense (cuDNN) on the same GPU with the same weights.

Workloads (the stroke generator of workload.py, seed 0):
  w96   DeepCNet(5, 32),  batch 64,  96x96,  region 64  (the shared workload, 11,808 sites)
  w192  DeepCNet(6, 100), batch 100, 192x192, region 128

Measured per workload: forward, forward+backward (a fresh SparseTensor per call, so the
rulebooks are built inside the step, as in training on new batches), the rulebooks of all
layers alone (their share of a step), sparsecnn kernel launches and host<->device copies per
step, peak device memory of a step (sparse: CuPy's pool; dense: torch's allocator). Every
timed call ends with a device synchronisation (``xp.cuda.Device().synchronize()``,
``torch.cuda.synchronize()``). The summary compares with the H100 anchors of issue 10.

Run:  python -m pytest bench/test_bench_gpu.py           a CUDA device with CuPy (skipped
                                                         otherwise, with the reason)
      SPARSECNN_CUDA_SIM=1 SPARSECNN_BENCH_SMOKE=1 python -m pytest bench/test_bench_gpu.py
                                                         the code paths in the CUDA simulation,
                                                         tiny sizes (torch dense on the CPU)
SPARSECNN_BENCH_SMOKE=1 on a GPU runs the tiny sizes there. SPARSECNN_BENCH_SECONDS (default 1)
is the time each GPU benchmark aims at (CPU ones 3x that; at least 3 rounds each).
SPARSECNN_BENCH_JSON=PATH writes the summary as JSON (bench/gpu_check.py reads it).
"""
from __future__ import annotations

import json
import os
import time
import warnings
from collections import Counter
from functools import cache

import numpy as np
import pytest
from conftest import RESULTS, record, torch_deepcnet
from gpu_check import ANCHORS, count_launches
from workload import generate_workload

import sparsecnn as scn
from sparsecnn import backend, stats

pytestmark = pytest.mark.gpu


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0")


SMOKE = _flag("SPARSECNN_BENCH_SMOKE")
SIM = backend.simulation()
_OK, _WHY = backend.gpu_status()
if not _OK:
    pytest.skip(f"no CUDA device for the GPU benchmarks: {_WHY}", allow_module_level=True)
if SIM and not SMOKE:
    pytest.skip("the CUDA simulation is far too slow for the benchmark sizes; set "
                "SPARSECNN_BENCH_SMOKE=1 for the tiny smoke run", allow_module_level=True)

# (l, k, batch, size, region)
WORKLOADS = {"w96": (5, 32, 64, 96, 64), "w192": (6, 100, 100, 192, 128)}
SMOKE_WORKLOADS = {"w96": (2, 4, 2, 12, 8), "w192": (3, 4, 3, 24, 16)}
WIDS = list(WORKLOADS)
DEVICES = ["cpu", "cuda"]
SECONDS = float(os.environ.get("SPARSECNN_BENCH_SECONDS", "1"))
MAX_ROUNDS = 200

#: non-timed figures per workload (launches, copies, memory), merged into the summary
PROFILE: dict[str, dict] = {}


# --------------------------------------------------------------------------- workloads

class Workload:
    """One workload: inputs, the same DeepCNet on the CPU and on "cuda", sync, steps."""

    def __init__(self, wid: str):
        self.wid = wid
        l, k, batch, size, region = (SMOKE_WORKLOADS if SMOKE else WORKLOADS)[wid]
        self.l, self.k, self.batch, self.size = l, k, batch, size
        self.label = f"{size}x{size}" + (" (smoke)" if SMOKE else "")
        w = generate_workload(seed=0, batch=batch, size=size, region=region)
        self.coords, self.features = w["coords"], w["features"]
        self.n_sites = len(self.coords)
        self.labels = np.random.default_rng(0).integers(0, 10, batch)
        self.models = {d: scn.models.DeepCNet(l, k, num_classes=10, seed=0) for d in DEVICES}
        self.models["cuda"].to("cuda")
        self.xp = backend.xp("cuda")
        # inputs already on the device, if a SparseTensor built from device arrays stays
        # there (then a step starts from device arrays, as after a prefetching loader);
        # otherwise host arrays and .to("cuda") in the step
        self.dcoords = backend.to_device(self.coords, "cuda")
        self.dfeatures = backend.to_device(self.features, "cuda")
        probe = scn.SparseTensor(self.dcoords, self.dfeatures, (size, size), batch_size=batch)
        self.device_built = probe.device == "cuda"
        self.macs = stats.total_macs(stats.layer_stats(self.models["cpu"], self.make("cpu")))[0]

    def make(self, device: str) -> scn.SparseTensor:
        """A fresh SparseTensor (new geometry: rulebooks are built again) on ``device``."""
        shape = (self.size, self.size)
        if device == "cuda" and self.device_built:
            return scn.SparseTensor(self.dcoords, self.dfeatures, shape, batch_size=self.batch)
        x = scn.SparseTensor(self.coords, self.features, shape, batch_size=self.batch)
        return x.to("cuda") if device == "cuda" else x

    def sync(self, device: str) -> None:
        if device == "cuda":
            self.xp.cuda.Device().synchronize()

    def forward(self, device: str):
        model = self.models[device]
        return lambda: model(self.make(device))

    def step(self, device: str):
        model, labels = self.models[device], self.labels

        def step():
            loss = scn.cross_entropy(model(self.make(device)), labels)
            loss.backward()
            model.zero_grad()
        return step

    def rulebooks(self, device: str):
        """Hash and all rulebooks of DeepCNet(l, k) for a fresh input (l + 1 convolutions,
        l pooling windows), as bench/test_bench_net.py's test_rulebooks_all_layers."""
        def build():
            g = self.make(device).geometry
            for i in range(self.l + 1):
                _, g = g.conv(3 if i == 0 else 2, 1)
                if i < self.l:
                    _, g = g.conv(2, 2)
        return build

    def info(self, **extra) -> dict:
        return dict(workload=self.wid, size=self.label, batch=self.batch, l=self.l, k=self.k,
                    active_in=self.n_sites, **extra)


@cache
def workload(wid: str) -> Workload:
    return Workload(wid)


@pytest.fixture(scope="module", autouse=True)
def _module_setup(request):
    """The GPU summary as a plugin of this run; device memory freed after the module."""
    pm = request.config.pluginmanager
    if not pm.has_plugin("sparsecnn_gpu_summary"):
        pm.register(_SummaryPlugin(), "sparsecnn_gpu_summary")
    yield
    workload.cache_clear()
    _torch_nets.clear()


def timed(benchmark, fn, sync, *, seconds: float):
    """Benchmark ``fn`` + ``sync`` (synchronised timing) for about ``seconds``: one warm-up
    call (compilation, caches), then rounds from the time of a second call."""
    fn()
    sync()
    t = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - t
    rounds = 2 if SMOKE else int(max(3, min(MAX_ROUNDS, seconds / max(once, 1e-6))))

    def target():
        fn()
        sync()
    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0)


def _seconds(device: str) -> float:
    return SECONDS * (3 if device == "cpu" else 1)


# --------------------------------------------------------------------------- sparse

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wid", WIDS)
def test_forward_sparse(benchmark, wid, device):
    w = workload(wid)
    timed(benchmark, w.forward(device), lambda: w.sync(device), seconds=_seconds(device))
    record(benchmark, f"{wid} forward sparse {device}", flops=2 * w.macs,
           **w.info(device_built_input=w.device_built if device == "cuda" else None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wid", WIDS)
def test_fwd_bwd_sparse(benchmark, wid, device):
    w = workload(wid)
    timed(benchmark, w.step(device), lambda: w.sync(device), seconds=_seconds(device))
    record(benchmark, f"{wid} fwd+bwd sparse {device}", flops=6 * w.macs, **w.info())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wid", WIDS)
def test_rulebooks_sparse(benchmark, wid, device):
    w = workload(wid)
    timed(benchmark, w.rulebooks(device), lambda: w.sync(device), seconds=_seconds(device) / 2)
    record(benchmark, f"{wid} rulebooks {device}", **w.info())


def _host(a) -> np.ndarray:
    return np.asarray(backend.to_host(a), np.float64)


def _close(a, b, rtol: float) -> None:
    a, b = _host(a), _host(b)
    scale = max(1e-3, float(np.abs(a).max(initial=0.0)))
    err = float(np.abs(a - b).max(initial=0.0)) / scale
    assert err <= rtol, f"max |a - b| / max |a| = {err:.3g} > {rtol}"


@pytest.mark.parametrize("wid", WIDS)
def test_cuda_matches_cpu(wid):
    """The benchmarks compare equal things: logits and gradients of the CUDA net equal the
    CPU net's (fp32, to 1e-3 of their magnitude)."""
    w = workload(wid)
    out = {}
    for d in DEVICES:
        m = w.models[d]
        logits = m(w.make(d))
        scn.cross_entropy(logits, w.labels).backward()
        convs = [c for c in m.features if isinstance(c, scn.Convolution)]
        out[d] = (logits.data, convs[0].weight.grad, convs[-1].weight.grad,
                  m.classifier.weight.grad)
        m.zero_grad()
    for a, b in zip(out["cpu"], out["cuda"]):
        _close(a, b, 1e-3)


@pytest.mark.parametrize("wid", WIDS)
def test_step_profile(wid):
    """Not timed: sparsecnn kernel launches and host<->device copies per forward and per
    step, and peak device memory of a step."""
    w = workload(wid)
    step, fwd = w.step("cuda"), w.forward("cuda")
    step()
    w.sync("cuda")
    prof: dict = {"size": w.label, "active_in": w.n_sites,
                  "device_built_input": w.device_built}
    for what, fn in (("forward", fwd), ("step", step)):
        before = Counter(backend.transfers)
        with count_launches() as launches:
            fn()
            w.sync("cuda")
        copies = Counter(backend.transfers)
        copies.subtract(before)
        prof[f"launches_per_{what}"] = sum(launches.values())
        prof[f"launches_per_{what}_by_kernel"] = dict(sorted(launches.items()))
        prof[f"copies_per_{what}"] = {k: v for k, v in copies.items() if v}
    prof["launches_note"] = ("sparsecnn's own .cu kernels (calls through _launch's kernel "
                             "objects); CuPy's elementwise/reduction kernels not counted")
    prof["memory"] = _sparse_peak_memory(step, w)
    PROFILE.setdefault(wid, {}).update(prof)
    assert prof["launches_per_step"] > 0, "no sparsecnn kernel ran on the device"


def _sparse_peak_memory(step, w: Workload) -> dict:
    """Peak bytes of CuPy's default memory pool during one step (a malloc hook samples
    used_bytes after every allocation); None under the simulation (no device pool)."""
    if SIM:
        return {"peak_used_bytes": None, "note": "simulation: host memory, no device pool"}
    import cupy

    pool = cupy.get_default_memory_pool()

    class PeakHook(cupy.cuda.MemoryHook):
        """Bytes in use: a running sum of the pool's malloc/free sizes, and used_bytes()
        sampled after each malloc; the peak is the larger of the two."""
        name = "sparsecnn_bench_peak"

        def __init__(self):
            self.cur = self.peak = pool.used_bytes()

        def malloc_postprocess(self, **kwargs):
            if kwargs.get("mem_ptr"):
                self.cur += int(kwargs.get("mem_size", 0))
            self.peak = max(self.peak, self.cur, pool.used_bytes())

        def free_postprocess(self, **kwargs):
            self.cur -= int(kwargs.get("mem_size", 0))

    w.sync("cuda")
    before = pool.used_bytes()
    hook = PeakHook()
    with hook:
        step()
        w.sync("cuda")
    return {"peak_used_bytes": int(hook.peak), "before_step_bytes": int(before),
            "step_peak_extra_bytes": int(hook.peak - before),
            "pool_total_bytes": int(pool.total_bytes()),
            "note": "CuPy default pool: peak used_bytes during one step; before = what was "
                    "live already (parameters, other workloads' inputs)"}


# --------------------------------------------------------------------------- torch dense

_torch_nets: dict = {}


@pytest.fixture(scope="module")
def torch_env():
    """(torch, device): torch on the same GPU; under the simulation torch on the CPU (a
    stand-in that exercises the code path)."""
    torch = pytest.importorskip("torch")
    if SIM:
        dev = "cpu"
        torch.set_num_threads(scn._cpu.max_threads())
    elif torch.cuda.is_available():
        dev = "cuda"
    else:
        pytest.skip("torch has no CUDA device here")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # fp32 throughout, as sparsecnn (TF32 is opt-in there): no TF32 in cuDNN or matmul
        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
            conv.fp32_precision = "ieee"
            torch.backends.cuda.matmul.fp32_precision = "ieee"
        else:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    return torch, dev


def _torch_setup(torch, dev, w: Workload):
    """The CPU model's weights in a torch Sequential (conv, ReLU, max-pool, ..., linear) on
    ``dev``; the dense input (B, 1, S, S) there. sparsecnn weight[k, ci, co] ==
    torch weight[co, ci, i0, i1], k row-major over the window."""
    key = (w.wid, dev)
    if key in _torch_nets:
        return _torch_nets[key]
    model = w.models["cpu"]
    net = torch_deepcnet(torch, model).to(dev)
    x = np.zeros((w.batch, 1, w.size, w.size), np.float32)
    c = w.coords
    x[c[:, 0], 0, c[:, 1], c[:, 2]] = w.features[:, 0]
    xt = torch.from_numpy(x).to(dev)
    yt = torch.from_numpy(w.labels).to(dev)
    _torch_nets[key] = (net, xt, yt)
    return net, xt, yt


def _torch_sync(torch, dev):
    if dev == "cuda":
        return torch.cuda.synchronize
    return lambda: None


@pytest.mark.parametrize("wid", WIDS)
def test_forward_torch_dense(benchmark, torch_env, wid):
    torch, dev = torch_env
    w = workload(wid)
    net, x, _ = _torch_setup(torch, dev, w)
    with torch.no_grad():
        dense = net(x).cpu().numpy()
    _close(w.models["cuda"](w.make("cuda")).data, dense, 1e-3)

    def fwd():
        with torch.no_grad():
            net(x)
    timed(benchmark, fwd, _torch_sync(torch, dev), seconds=_seconds(dev))
    record(benchmark, f"{wid} forward torch dense {dev}", **w.info())


@pytest.mark.parametrize("wid", WIDS)
def test_fwd_bwd_torch_dense(benchmark, torch_env, wid):
    torch, dev = torch_env
    w = workload(wid)
    net, x, y = _torch_setup(torch, dev, w)

    def step():
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        net.zero_grad()
    timed(benchmark, step, _torch_sync(torch, dev), seconds=_seconds(dev))
    record(benchmark, f"{wid} fwd+bwd torch dense {dev}", **w.info())
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        mem = {"peak_allocated_bytes": int(peak), "before_step_bytes": int(before),
               "step_peak_extra_bytes": int(peak - before),
               "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
               "note": "torch caching allocator: max_memory_allocated during one step"}
    else:
        mem = {"peak_allocated_bytes": None, "note": "torch on the CPU (simulation run)"}
    PROFILE.setdefault(wid, {})["torch_dense_memory"] = mem


# --------------------------------------------------------------------------- summary

def _median(name: str):
    return RESULTS.get(name, {}).get("median_ms")


def _mb(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MB"


def summarize() -> dict:
    """Every figure of this run, the ratios and the targets of issue 10 (JSON-ready)."""
    ok, dev_name = backend.gpu_status()
    results = {k: v for k, v in RESULTS.items() if k.split(" ", 1)[0] in WIDS}
    out: dict = {"device": dev_name, "simulation": SIM, "smoke": SMOKE,
                 "torch_fp32": "TF32 off in cuDNN and matmul; cudnn.benchmark on",
                 "anchors_h100_fp32_ms": ANCHORS, "results": results, "profile": PROFILE,
                 "per_workload": {}, "lines": []}
    lines = out["lines"]
    lines.append(f"device: {dev_name}" + ("  [SMOKE SIZES: timings mean nothing]"
                                           if SMOKE else ""))
    tdev = "cpu" if SIM else "cuda"
    for wid in WIDS:
        fwd, step = _median(f"{wid} forward sparse cuda"), _median(f"{wid} fwd+bwd sparse cuda")
        cfwd, cstep = _median(f"{wid} forward sparse cpu"), _median(f"{wid} fwd+bwd sparse cpu")
        tfwd = _median(f"{wid} forward torch dense {tdev}")
        tstep = _median(f"{wid} fwd+bwd torch dense {tdev}")
        rb, crb = _median(f"{wid} rulebooks cuda"), _median(f"{wid} rulebooks cpu")
        anchor = ANCHORS[wid]
        size = next((r.get("size") for k, r in results.items() if k.startswith(wid)), wid)
        pw: dict = {"size": size, "median_ms": {
            "forward_sparse_cuda": fwd, "fwd_bwd_sparse_cuda": step,
            "forward_sparse_cpu": cfwd, "fwd_bwd_sparse_cpu": cstep,
            f"forward_torch_dense_{tdev}": tfwd, f"fwd_bwd_torch_dense_{tdev}": tstep,
            "rulebooks_cuda": rb, "rulebooks_cpu": crb}}

        def ratio(a, b):
            return None if not a or not b else b / a
        pw["speedup"] = {  # how many times faster sparse CUDA is than ...
            "vs_cpu_forward": ratio(fwd, cfwd), "vs_cpu_fwd_bwd": ratio(step, cstep),
            f"vs_torch_dense_{tdev}_forward": ratio(fwd, tfwd),
            f"vs_torch_dense_{tdev}_fwd_bwd": ratio(step, tstep),
            "vs_h100_cudnn_anchor_forward": ratio(fwd, anchor["cudnn_dense"][0]),
            "vs_h100_cudnn_anchor_fwd_bwd": ratio(step, anchor["cudnn_dense"][1]),
            "vs_h100_spconv_anchor_forward": ratio(fwd, anchor["spconv_2.3.8"][0]),
            "vs_h100_spconv_anchor_fwd_bwd": ratio(step, anchor["spconv_2.3.8"][1]),
            "torch_dense_this_gpu_vs_h100_anchor_fwd_bwd":
                None if SIM else ratio(tstep, anchor["cudnn_dense"][1]),
        }
        share = None if not rb or not step else rb / step
        pw["rulebook_share_cuda"] = share
        pw["rulebook_share_cpu"] = None if not crb or not cstep else crb / cstep
        target = anchor["target_fwd_bwd_ms"]
        pw["targets"] = {
            "fwd_bwd_ms_max": target,
            "fwd_bwd_met": None if SMOKE or step is None else step <= target,
            "rulebook_share_max": ANCHORS["target_rulebook_share"],
            "rulebook_share_met": (None if SMOKE or share is None
                                   else share <= ANCHORS["target_rulebook_share"]),
        }
        prof = PROFILE.get(wid, {})
        pw["launches_per_step"] = prof.get("launches_per_step")
        pw["launches_per_forward"] = prof.get("launches_per_forward")
        pw["copies_per_step"] = prof.get("copies_per_step")
        sm = prof.get("memory", {})
        tm = prof.get("torch_dense_memory", {})
        pw["peak_memory_bytes"] = {"sparse_step_extra": sm.get("step_peak_extra_bytes"),
                                   "sparse_peak_used": sm.get("peak_used_bytes"),
                                   "dense_step_extra": tm.get("step_peak_extra_bytes"),
                                   "dense_peak_allocated": tm.get("peak_allocated_bytes")}
        out["per_workload"][wid] = pw

        def ms(v):
            return "     -" if v is None else f"{v:8.3f}"

        def x(v):
            return "-" if v is None else f"{v:.2f}x"
        lines.append(f"{wid} {size}: median ms   forward  fwd+bwd")
        lines.append(f"  sparse cuda            {ms(fwd)} {ms(step)}")
        lines.append(f"  sparse cpu             {ms(cfwd)} {ms(cstep)}   "
                     f"(cuda {x(pw['speedup']['vs_cpu_forward'])} / "
                     f"{x(pw['speedup']['vs_cpu_fwd_bwd'])} faster)")
        lines.append(f"  torch dense {tdev:<10} {ms(tfwd)} {ms(tstep)}   "
                     f"(sparse {x(pw['speedup'][f'vs_torch_dense_{tdev}_forward'])} / "
                     f"{x(pw['speedup'][f'vs_torch_dense_{tdev}_fwd_bwd'])} faster)")
        a = anchor["cudnn_dense"]
        lines.append(f"  H100 cuDNN anchor      {a[0]:8.3f} {a[1]:8.3f}   "
                     f"(sparse {x(pw['speedup']['vs_h100_cudnn_anchor_forward'])} / "
                     f"{x(pw['speedup']['vs_h100_cudnn_anchor_fwd_bwd'])} faster)")
        a = anchor["spconv_2.3.8"]
        lines.append(f"  H100 spconv anchor     {a[0]:8.3f} {a[1]:8.3f}   "
                     f"(sparse {x(pw['speedup']['vs_h100_spconv_anchor_forward'])} / "
                     f"{x(pw['speedup']['vs_h100_spconv_anchor_fwd_bwd'])} faster)")
        met = pw["targets"]["fwd_bwd_met"]
        lines.append(f"  target fwd+bwd <= {target} ms: "
                     f"{'n/a' if met is None else 'MET' if met else 'MISSED'}")
        smet = pw["targets"]["rulebook_share_met"]

        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}%"
        lines.append(f"  rulebooks {ms(rb).strip()} ms = {pct(share)} of a step (target <= "
                     f"15%: {'n/a' if smet is None else 'MET' if smet else 'MISSED'}); "
                     f"cpu {pct(pw['rulebook_share_cpu'])}")
        lines.append(f"  launches per step {pw['launches_per_step']} (forward "
                     f"{pw['launches_per_forward']}); host<->device copies per step "
                     f"{pw['copies_per_step']}")
        pm = pw["peak_memory_bytes"]
        lines.append(f"  peak memory of a step: sparse +{_mb(pm['sparse_step_extra'])} "
                     f"(pool peak {_mb(pm['sparse_peak_used'])}), dense "
                     f"+{_mb(pm['dense_step_extra'])} (peak {_mb(pm['dense_peak_allocated'])})")
    return out


class _SummaryPlugin:
    """Registered by this module for the run: prints the GPU summary, writes its JSON."""

    def pytest_terminal_summary(self, terminalreporter):
        if not any(k.split(" ", 1)[0] in WIDS for k in RESULTS) and not PROFILE:
            return
        s = summarize()
        tr = terminalreporter
        tr.section("sparsecnn GPU benchmark summary (issue 10 section 4)")
        for line in s["lines"]:
            tr.write_line(line)
        path = os.environ.get("SPARSECNN_BENCH_JSON")
        if path:
            with open(path, "w") as fh:
                json.dump(s, fh, indent=2, default=str)
            tr.write_line(f"summary JSON: {path}")
