"""The prepared device check of issue 10 section 4: one command, one JSON summary.

On a bare GPU machine (CuPy, torch, pytest, pytest-benchmark, compute-sanitizer; no network)::

    bench/gpu_check.sh                  # = python3 bench/gpu_check.py

runs, each step under its own time limit and all of them within ``--budget`` seconds (335 by
default, so the whole check ends within 6 minutes):

  environment  GPU, driver, CuPy / torch / pytest-benchmark / compute-sanitizer versions
  build        python3 -m pip install --no-build-isolation --no-deps -e .  (falls back to
               python3 setup.py build_ext --inplace -j N when pip cannot build, e.g. no
               ``wheel``; the fallback is recorded)
  pytest_gpu   python3 -m pytest -m gpu tests  with CuPy (SPARSECNN_CUDA_SIM unset)
  memcheck     compute-sanitizer --tool memcheck  on ``gpu_check.py --tiny-step``
  racecheck    compute-sanitizer --tool racecheck on the same
  bench        python3 -m pytest bench/test_bench_gpu.py (CPU, CUDA, PyTorch dense)
  nccl         extra: a one-rank NCCL communicator (sparsecnn.distributed) allreduces a small
               CuPy array, and GradientReducer over MPI.COMM_SELF (if mpi4py is installed)
               reduces device gradients through it; results checked (real GPU only)
  synccheck, initcheck   extra sanitizer tools, only with the time that is left

A step that fails or runs out of time is recorded and the check goes on. The summary is
rewritten after every step (so a check cut short still leaves one): ``$OUT/gpu_check.json``
when ``$OUT`` is set, else ``./gpu_check.json``; full logs beside it in ``gpu_check_logs/``.

Without a GPU::

    python3 bench/gpu_check.py --sim    # every step in the CUDA simulation (SPARSECNN_CUDA_SIM=1)
                                        # at smoke sizes; sanitizer steps run the tiny step
                                        # without a sanitizer; the build is skipped
                                        # unless --build is given
    python3 bench/gpu_check.py          # no CuPy/device: the GPU steps are recorded as
                                        # "unavailable" with the reason

``python3 bench/gpu_check.py --tiny-step`` is the small forward+backward the sanitizers run:
DeepCNet(2, 8) and a net with submanifold convolution, batch norm, average pooling and
network-in-network, on device "cuda" in float32 and float64, one SGD step, every result
compared with the CPU; exit status 0 only when all agree. On a GPU it turns CuPy's memory pool
off (``--pool`` keeps it), so that memcheck sees every buffer's real bounds.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

#: issue 10 section 4: H100, fp32, median ms (forward, forward+backward)
ANCHORS = {
    "w96": {"cudnn_dense": (0.69, 2.79), "spconv_2.3.8": (8.0, 10.6), "target_fwd_bwd_ms": 2.8},
    "w192": {"cudnn_dense": (16.0, 51.9), "spconv_2.3.8": (11.7, 14.5),
             "target_fwd_bwd_ms": 10.0},
    "target_rulebook_share": 0.15,
}

# name -> (time limit s, seconds kept in reserve for it while earlier steps run, core step)
STEPS = {
    "environment": (40, 10, True),
    "build": (150, 40, True),
    "pytest_gpu": (110, 45, True),
    "memcheck": (60, 25, True),
    "racecheck": (75, 30, True),
    "bench": (150, 100, True),
    "nccl": (40, 0, False),
    "synccheck": (45, 0, False),
    "initcheck": (45, 0, False),
}
SANITIZER_TOOLS = {
    "memcheck": ["--tool", "memcheck"],
    "racecheck": ["--tool", "racecheck", "--racecheck-report", "all"],
    "synccheck": ["--tool", "synccheck"],
    "initcheck": ["--tool", "initcheck"],
}
# the "nccl" step: one rank, so NCCL moves no data between GPUs, but the communicator, the
# device buffer and the in-place allreduce of sparsecnn.distributed all run
NCCL_CHECK = r"""
import numpy as np, cupy
from sparsecnn import distributed as D
ncomm = D.nccl_communicator(None)
x = cupy.arange(10, dtype=cupy.float32) * 0.5
D.nccl_allreduce_sum(ncomm, x)
assert cupy.asnumpy(x).tolist() == (np.arange(10) * 0.5).tolist(), x
print("nccl one-rank allreduce: ok")
try:
    from mpi4py import MPI
except ImportError:
    print("GradientReducer on the device: skipped (no mpi4py)")
else:
    import sparsecnn as scn
    m = scn.models.DeepCNet(2, 4, num_classes=3).to("cuda")
    for p in m.parameters():
        p.grad = cupy.ones(p.data.shape, p.data.dtype)
    red = D.GradientReducer(MPI.COMM_SELF)
    red._nccl = ncomm
    red.reduce(m.parameters(), 0.25)
    for p in m.parameters():
        assert isinstance(p.grad, cupy.ndarray) and float(abs(p.grad - 0.25).max()) == 0.0
    print(f"GradientReducer on the device: ok ({red.bytes_per_step} bytes)")
"""
MIN_STEP_S = 8  # a step that would get less than this is skipped ("no time left")
TAIL = 4000


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0")


# --------------------------------------------------------------------------- running steps

def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None,
               cwd: Path = ROOT) -> tuple[int | None, float, bool]:
    """Run ``cmd`` with stdout+stderr to ``log``; (rc, seconds, timed_out). On timeout the
    process group this started is interrupted (INT, then TERM, then KILL) and rc is None."""
    t0 = time.monotonic()
    with open(log, "ab") as fh:
        fh.write(f"$ {' '.join(cmd)}\n".encode())
        fh.flush()
        try:
            p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                 start_new_session=True)
        except OSError as e:
            fh.write(f"cannot start: {e}\n".encode())
            return 127, time.monotonic() - t0, False
        try:
            rc = p.wait(timeout=max(timeout, 1))
            return rc, time.monotonic() - t0, False
        except subprocess.TimeoutExpired:
            # SIGINT first: pytest stops as on Ctrl-C and still writes its report (junit xml,
            # the benchmark summary of what ran)
            for sig, wait in ((signal.SIGINT, 6), (signal.SIGTERM, 3), (signal.SIGKILL, 2)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            fh.write(f"\n[gpu_check] time limit of {timeout:.0f} s reached: killed\n".encode())
            return None, time.monotonic() - t0, True


def tail(path: Path, n: int = TAIL) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode(errors="replace")


class Check:
    def __init__(self, args):
        self.args = args
        self.sim = args.sim
        self.t0 = time.monotonic()
        self.budget = float(args.budget)
        out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_check.json"
                                               if os.environ.get("OUT") else
                                               Path.cwd() / "gpu_check.json")
        self.out = out.resolve()
        self.logs = self.out.parent / "gpu_check_logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.python = sys.executable or "python3"
        self.summary = {
            "schema": 1,
            "what": "sparsecnn device check (issue 10 section 4)",
            "mode": "simulation (SPARSECNN_CUDA_SIM=1, smoke sizes)" if self.sim else "gpu",
            "started": _now(),
            "budget_s": self.budget,
            "git": self._git(),
            "anchors_h100_fp32_ms": ANCHORS,
            "environment": {},
            "steps": {},
            "figures": {},
        }
        self.env_info: dict = {}

    def _git(self) -> dict:
        try:
            rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=ROOT, capture_output=True, text=True,
                                   timeout=10).stdout.strip()
            return {"commit": rev or None, "dirty": bool(dirty)}
        except (OSError, subprocess.SubprocessError):
            return {"commit": None}

    # -- bookkeeping
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def write(self) -> None:
        s = self.summary
        s["elapsed_s"] = round(self.elapsed(), 1)
        s["updated"] = _now()
        core = [v for k, v in s["steps"].items() if STEPS.get(k, (0, 0, False))[2]]
        # "not-run": left out on purpose (--skip-build, --only, the simulation's build)
        s["ok"] = (any(v["status"] == "ok" for v in core)
                   and all(v["status"] in ("ok", "not-run") for v in core))
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(s, indent=2, default=str) + "\n")
        os.replace(tmp, self.out)

    def limit_for(self, name: str) -> float:
        """This step's time limit: its own, cut so that the later core steps keep their
        reserve within the budget."""
        names = list(STEPS)
        reserves = [STEPS[n][1] for n in names if STEPS[n][2]]
        scale = min(1.0, self.budget / sum(reserves))  # a small --budget: smaller reserves
        later = scale * sum(STEPS[n][1] for n in names[names.index(name) + 1:] if STEPS[n][2])
        left = self.budget - self.elapsed() - (later if STEPS[name][2] else 0)
        return min(STEPS[name][0], left)

    def record(self, name: str, **info) -> dict:
        info.setdefault("status", "ok")
        self.summary["steps"][name] = info
        self.write()
        print(f"[gpu_check] {name:<12} {info['status']:<12} "
              f"{info.get('seconds', 0):6.1f} s  {info.get('note', '')}", flush=True)
        return info

    def env(self, sim: bool | None = None, **extra) -> dict:
        env = dict(os.environ)
        env.pop("SPARSECNN_CUDA_SIM", None)
        env.pop("SPARSECNN_CUDA_SIM_REVERSE", None)
        if self.sim if sim is None else sim:
            env["SPARSECNN_CUDA_SIM"] = "1"
            env["SPARSECNN_BENCH_SMOKE"] = "1"
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(extra)
        return env

    def step(self, name: str, cmd: list[str], env: dict, log_name: str | None = None,
             **info) -> dict:
        """Run one command as step ``name``; the record (without status) is returned."""
        limit = self.limit_for(name)
        if limit < MIN_STEP_S:
            return {"status": "skipped", "note": f"no time left in the {self.budget:.0f} s "
                                                 f"budget", "seconds": 0.0}
        log = self.logs / f"{log_name or name}.log"
        log.write_bytes(b"")
        rc, secs, timed_out = run_logged(cmd, log, limit, env)
        return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(secs, 1),
                "timeout_s": round(limit, 1), "timed_out": timed_out, "log": str(log),
                "tail": tail(log), **info}

    # -- the steps
    def environment(self) -> None:
        name = "environment"
        log = self.logs / "environment.log"
        log.write_bytes(b"")
        probe_out = self.logs / "environment.json"
        cmd = [self.python, str(Path(__file__).resolve()), "--probe", str(probe_out)]
        rc, secs, timed_out = run_logged(cmd, log, self.limit_for(name), self.env())
        info = {}
        if probe_out.exists():
            try:
                info = json.loads(probe_out.read_text())
            except ValueError:
                info = {}
        san = find_sanitizer()
        info["compute_sanitizer"] = san
        if san:
            try:
                r = subprocess.run([san, "--version"], capture_output=True, text=True,
                                   timeout=20)
                info["compute_sanitizer_version"] = r.stdout.strip().splitlines()[-1:]
            except (OSError, subprocess.SubprocessError) as e:
                info["compute_sanitizer_version"] = f"error: {e}"
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                r = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version,"
                                    "compute_cap,clocks.max.sm", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=20)
                info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
            except (OSError, subprocess.SubprocessError) as e:
                info["nvidia_smi"] = f"error: {e}"
        info["cpu_count"] = os.cpu_count()
        self.env_info = info
        self.summary["environment"] = info
        status = "ok" if rc == 0 and not timed_out else ("timeout" if timed_out else "failed")
        self.record(name, status=status, rc=rc, seconds=round(secs, 1), log=str(log),
                    note=info.get("gpu_status", ""))

    def gpu_ready(self) -> tuple[bool, str]:
        if self.sim:
            return bool(self.env_info.get("sim_ok")), self.env_info.get("gpu_status", "")
        if self.env_info.get("cupy_device"):
            return True, self.env_info["cupy_device"]
        return False, (self.env_info.get("cupy_device_error") or self.env_info.get("gpu_status")
                       or "the environment probe found no CUDA device")

    def build(self) -> None:
        name = "build"
        if self.args.skip_build or (self.sim and not self.args.build):
            self.record(name, status="not-run", seconds=0.0,
                        note="--skip-build" if self.args.skip_build else
                        "simulation mode builds nothing unless --build is given")
            return
        cmd = [self.python, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
               "-e", "."]
        r = self.step(name, cmd, self.env(sim=False, PIP_NO_INDEX="1",
                                          PIP_DISABLE_PIP_VERSION_CHECK="1"))
        if r.get("status") == "skipped":
            self.record(name, **r)
            return
        r["method"] = "pip install -e"
        if r["rc"] != 0 and not r["timed_out"]:
            # pip could not build it (e.g. setuptools without bdist_wheel and no `wheel`):
            # the same extensions in place, in parallel
            first = {k: r[k] for k in ("rc", "seconds", "tail")}
            jobs = str(max(1, min(16, os.cpu_count() or 1)))
            r2 = self.step(name, [self.python, "setup.py", "build_ext", "--inplace", "-j",
                                  jobs], self.env(sim=False), log_name="build_ext")
            if r2.get("status") == "skipped":
                r["status"] = "failed"
                self.record(name, **r)
                return
            r2["pip_attempt"] = first
            r2["seconds"] = round(first["seconds"] + r2["seconds"], 1)
            r2["method"] = "setup.py build_ext --inplace (pip install -e failed)"
            r = r2
        ok = r["rc"] == 0
        if ok:
            chk = subprocess.run([self.python, "-c", "import sparsecnn._cpu as c; "
                                  "print(c.max_threads())"], cwd=ROOT, capture_output=True,
                                 text=True, timeout=60, env=self.env(sim=False))
            ok = chk.returncode == 0
            r["import_check"] = (chk.stdout + chk.stderr).strip()[-500:]
        r["status"] = "ok" if ok else ("timeout" if r["timed_out"] else "failed")
        r["note"] = r["method"]
        self.record(name, **r)

    def pytest_gpu(self) -> None:
        name = "pytest_gpu"
        ok, why = self.gpu_ready()
        if not ok:
            self.record(name, status="unavailable", seconds=0.0, note=why)
            return
        junit = self.logs / "pytest_gpu.xml"
        junit.unlink(missing_ok=True)
        cmd = [self.python, "-m", "pytest", "-m", "gpu", "tests", "-q", "-rfEs",
               "-p", "no:cacheprovider", f"--junitxml={junit}"]
        r = self.step(name, cmd, self.env())
        if r.get("status") == "skipped":
            self.record(name, **r)
            return
        counts = parse_junit(junit)
        r["tests"] = counts
        passed = counts.get("passed", 0)
        if r["timed_out"]:
            r["status"] = "timeout"
        elif r["rc"] == 0 and passed > 0:
            r["status"] = "ok"
        else:
            r["status"] = "failed"
        r["note"] = ", ".join(f"{k} {v}" for k, v in counts.items())
        self.record(name, **r)

    def sanitizer(self, name: str) -> None:
        ok, why = self.gpu_ready()
        tiny = [self.python, str(Path(__file__).resolve()), "--tiny-step"]
        if not ok:
            self.record(name, status="unavailable", seconds=0.0, note=why)
            return
        if self.sim:
            # compute-sanitizer does not apply to the simulation; its stand-ins: memcheck =
            # the kernels compiled with AddressSanitizer, racecheck = the reversed block and
            # thread schedule; synccheck/initcheck = the plain step (the simulation itself
            # refuses divergent barriers)
            extra, note = {}, "simulation: the tiny step without compute-sanitizer"
            asan = find_libasan() if name == "memcheck" else None
            if asan:
                extra = {"LD_PRELOAD": asan, "ASAN_OPTIONS": "detect_leaks=0",
                         "SPARSECNN_CUDA_SIM_CXXFLAGS":
                             "-O1 -g -fsanitize=address -fno-omit-frame-pointer"}
                note = "simulation: the tiny step, kernels under AddressSanitizer"
            elif name == "racecheck":
                extra = {"SPARSECNN_CUDA_SIM_REVERSE": "1"}
                note += " (reversed schedule)"
            r = self.step(name, tiny, self.env(**extra), note=note)
            if r.get("status") != "skipped":
                bad = "ERROR: AddressSanitizer" in tail(Path(r["log"]), 10**6)
                r["status"] = ("timeout" if r["timed_out"] else
                               "ok" if r["rc"] == 0 and not bad else "failed")
                r["tiny_step"] = parse_tiny(r["tail"])
            self.record(name, **r)
            return
        san = find_sanitizer()
        if san is None:
            self.record(name, status="unavailable", seconds=0.0,
                        note="compute-sanitizer not found (PATH, $CUDA_HOME/bin, "
                             "/usr/local/cuda/bin)")
            return
        cmd = [san, *SANITIZER_TOOLS[name], "--error-exitcode", "86", "--print-limit", "30",
               *tiny]
        r = self.step(name, cmd, self.env())
        if r.get("status") == "skipped":
            self.record(name, **r)
            return
        m = re.findall(r"ERROR SUMMARY: (\d+) error", r["tail"])
        r["sanitizer_errors"] = int(m[-1]) if m else None
        r["tiny_step"] = parse_tiny(r["tail"])
        if r["timed_out"]:
            r["status"] = "timeout"
        elif (r["rc"] == 0 and r["sanitizer_errors"] in (0, None)
              and r["tiny_step"].get("ok")):
            r["status"] = "ok"
        else:
            r["status"] = "failed"
        r["note"] = (f"{r['sanitizer_errors']} sanitizer errors, tiny step "
                     f"{'ok' if r['tiny_step'].get('ok') else 'NOT ok'}")
        self.record(name, **r)

    def bench(self) -> None:
        name = "bench"
        ok, why = self.gpu_ready()
        if not ok:
            self.record(name, status="unavailable", seconds=0.0, note=why)
            return
        summary = self.logs / "bench_summary.json"
        bjson = self.logs / "bench_pytest_benchmark.json"
        for p in (summary, bjson):
            p.unlink(missing_ok=True)
        cmd = [self.python, "-m", "pytest", "bench/test_bench_gpu.py", "-q", "-rfEs",
               "-p", "no:cacheprovider", f"--benchmark-json={bjson}",
               "--benchmark-columns=median,min,max,rounds", "--benchmark-sort=name"]
        r = self.step(name, cmd, self.env(SPARSECNN_BENCH_JSON=str(summary)))
        if r.get("status") == "skipped":
            self.record(name, **r)
            return
        figures = {}
        if summary.exists():
            try:
                figures = json.loads(summary.read_text())
            except ValueError:
                figures = {}
        self.summary["figures"] = figures
        r["summary_file"] = str(summary)
        r["status"] = ("timeout" if r["timed_out"] else
                       "ok" if r["rc"] == 0 and figures.get("results") else "failed")
        r["note"] = f"{len(figures.get('results', {}))} figures"
        self.record(name, **r)

    def nccl(self) -> None:
        name = "nccl"
        ok, why = self.gpu_ready()
        if self.sim or not ok:
            self.record(name, status="unavailable", seconds=0.0,
                        note="NCCL needs a real GPU" if self.sim else why)
            return
        r = self.step(name, [self.python, "-c", NCCL_CHECK], self.env())
        if r.get("status") != "skipped":
            r["status"] = ("timeout" if r["timed_out"] else
                           "ok" if r["rc"] == 0 and "allreduce: ok" in r["tail"] else "failed")
            r["note"] = "one-rank NCCL allreduce" + (" + GradientReducer" if
                                                     "GradientReducer on the device: ok"
                                                     in r["tail"] else "")
        self.record(name, **r)

    def run(self) -> int:
        print(f"[gpu_check] summary: {self.out} (budget {self.budget:.0f} s, "
              f"{self.summary['mode']})", flush=True)
        self.write()
        for name in STEPS:
            if self.args.only and name not in self.args.only and name != "environment":
                self.record(name, status="not-run", seconds=0.0, note="not in --only")
                continue
            try:
                if name == "environment":
                    self.environment()
                elif name == "build":
                    self.build()
                elif name == "pytest_gpu":
                    self.pytest_gpu()
                elif name in SANITIZER_TOOLS:
                    self.sanitizer(name)
                elif name == "bench":
                    self.bench()
                elif name == "nccl":
                    self.nccl()
            except Exception as e:  # a broken step is recorded; the check goes on
                self.record(name, status="error", seconds=0.0,
                            note=f"gpu_check itself failed here: {type(e).__name__}: {e}")
        self.summary["finished"] = _now()
        self.write()
        print(f"[gpu_check] done in {self.elapsed():.0f} s; ok={self.summary['ok']}; "
              f"{self.out}", flush=True)
        for line in self.summary.get("figures", {}).get("lines", []):
            print("  " + line)
        return 0 if self.summary["ok"] else 1


def find_sanitizer() -> str | None:
    p = shutil.which("compute-sanitizer")
    if p:
        return p
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base:
            c = Path(base) / "bin" / "compute-sanitizer"
            if c.is_file() and os.access(c, os.X_OK):
                return str(c)
    return None


def find_libasan() -> str | None:
    """The host compiler's AddressSanitizer runtime (for the simulated memcheck), if any."""
    from_env = os.environ.get("CXX", "g++").split()[0]
    for cxx in (from_env, "g++", "clang++"):
        if not shutil.which(cxx):
            continue
        try:
            r = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True,
                               text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        p = r.stdout.strip()
        if r.returncode == 0 and os.path.isabs(p) and os.path.exists(p):
            return p
    return None


def parse_junit(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in total:
            total[k] += int(s.get(k, 0))
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return total


def parse_tiny(text: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith("TINY_STEP "):
            try:
                return json.loads(line[len("TINY_STEP "):])
            except ValueError:
                break
    return {}


# --------------------------------------------------------------------------- launches

@contextlib.contextmanager
def count_launches():
    """Count sparsecnn kernel launches (calls through ``_launch``'s kernel objects, CuPy's
    and the simulation's) while the block runs: a Counter by kernel name. CuPy itself has no
    launch counter; its own elementwise and reduction kernels are not counted."""
    from sparsecnn._gpu import _launch

    counts: collections.Counter = collections.Counter()
    saved = {}
    for cls in (_launch.CupyKernel, _launch.SimKernel):
        orig = saved[cls] = cls.__call__

        def counted(self, *args, _orig=orig, **kwargs):
            counts[self.name] += 1
            return _orig(self, *args, **kwargs)
        cls.__call__ = counted
    try:
        yield counts
    finally:
        for cls, orig in saved.items():
            cls.__call__ = orig


# --------------------------------------------------------------------------- probe

def probe(path: str) -> int:
    """Versions and device facts, written as JSON to ``path`` (runs as its own process)."""
    info: dict = {"python": sys.version.split()[0]}
    sys.path.insert(0, str(ROOT))
    for mod in ("numpy", "scipy", "pytest", "pytest_benchmark", "cupy", "torch", "Cython"):
        try:
            m = __import__(mod)
            info[f"{mod}_version"] = getattr(m, "__version__", "?")
        except Exception as e:
            info[f"{mod}_version"] = None
            info[f"{mod}_error"] = f"{type(e).__name__}: {e}"[:300]
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
        props = cupy.cuda.runtime.getDeviceProperties(0) if n else {}
        nm = props.get("name", b"")
        info["cupy_device"] = nm.decode() if isinstance(nm, bytes) else str(nm)
        info["cupy_cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        info["cupy_driver"] = cupy.cuda.runtime.driverGetVersion()
        info["compute_capability"] = f"{props.get('major')}.{props.get('minor')}"
        info["device_memory_bytes"] = props.get("totalGlobalMem")
    except Exception as e:
        info["cupy_device"] = None
        info["cupy_device_error"] = f"{type(e).__name__}: {e}"[:300]
    try:
        import torch
        info["torch_cuda"] = bool(torch.cuda.is_available())
        info["torch_cudnn"] = (torch.backends.cudnn.version()
                               if torch.cuda.is_available() else None)
    except Exception:
        info["torch_cuda"] = False
    try:
        from sparsecnn import backend
        ok, why = backend.gpu_status()
        info["sim_ok"] = bool(ok) and backend.simulation()
        info["gpu_status"] = why
        info["sparsecnn_import"] = "ok"
    except Exception as e:
        info["sim_ok"] = False
        info["gpu_status"] = f"sparsecnn does not import here ({type(e).__name__}: {e})"[:400]
        info["sparsecnn_import"] = info["gpu_status"]
    Path(path).write_text(json.dumps(info, indent=2, default=str))
    print(json.dumps(info, default=str))
    return 0


# --------------------------------------------------------------------------- tiny step

def tiny_step(pool: bool) -> int:
    """A small forward+backward+SGD step on device "cuda", compared with the CPU."""
    import numpy as np
    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, str(ROOT))
    from workload import generate_workload

    import sparsecnn as scn
    from sparsecnn import backend

    ok, why = backend.gpu_status()
    if not ok:
        print(f"TINY_STEP {json.dumps({'ok': False, 'why': why})}")
        return 3
    if not backend.simulation() and not pool:
        import cupy
        cupy.cuda.set_allocator(None)  # every buffer its own allocation: exact bounds
    xp = backend.xp("cuda")
    w = generate_workload(seed=1, batch=3, size=12, region=8)
    labels = np.array([0, 3, 4])

    def deepcnet(dtype):
        return scn.models.DeepCNet(2, 8, num_classes=5, seed=0, dtype=dtype)

    def mixed(dtype):
        # submanifold conv, batch norm, strided conv, average pooling, NiN, linear
        return scn.Sequential(
            scn.SubmanifoldConvolution(1, 8, 3, dtype=dtype, seed=1), scn.BatchNorm(8,
                                                                               dtype=dtype),
            scn.ReLU(), scn.Convolution(8, 12, 2, 2, dtype=dtype, seed=2),
            scn.AveragePooling(2, 2), scn.NetworkInNetwork(12, 6, dtype=dtype, seed=3),
            scn.LeakyReLU(0.1), scn.SparseToDense(), scn.Flatten(),
            scn.Linear(6 * 3 * 3, 5, dtype=dtype, seed=4))

    report: dict = {"checks": {}}
    all_ok = True
    n_launches = 0
    for dtype, rtol in ((np.float32, 2e-4), (np.float64, 1e-9)):
        for net_name, make in (("DeepCNet(2,8)", deepcnet), ("mixed", mixed)):
            res = {}
            for dev in ("cpu", "cuda"):
                m = make(dtype)
                if dev == "cuda":
                    m.to("cuda")
                opt = scn.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
                x = scn.SparseTensor(w["coords"], w["features"].astype(dtype), (12, 12),
                                     batch_size=3)
                if dev == "cuda":
                    x = x.to("cuda")
                with count_launches() as launches:
                    logits = m(x)
                    loss = scn.cross_entropy(logits, labels)
                    loss.backward()
                    opt.step()
                if dev == "cuda":
                    n_launches += sum(launches.values())
                if dev == "cuda":
                    xp.cuda.Device().synchronize()
                res[dev] = {"logits": backend.to_host(logits.data),
                            "loss": backend.to_host(loss.data),
                            "params": [backend.to_host(p.data) for p in m.parameters()]}
            worst = 0.0
            for a, b in zip([res["cpu"]["logits"], res["cpu"]["loss"], *res["cpu"]["params"]],
                            [res["cuda"]["logits"], res["cuda"]["loss"],
                             *res["cuda"]["params"]]):
                a = np.asarray(a, np.float64)
                b = np.asarray(b, np.float64)
                # relative to the array's magnitude, floored (a bias before batch norm has a
                # gradient at rounding level, so its update is noise on both devices)
                scale = max(1e-3, float(np.abs(a).max(initial=0.0)))
                worst = max(worst, float(np.abs(a - b).max(initial=0.0)) / scale)
            good = bool(np.isfinite(worst) and worst <= rtol)
            all_ok &= good
            report["checks"][f"{net_name} {np.dtype(dtype).name}"] = {
                "max_rel_diff": worst, "tol": rtol, "ok": good}
    report["kernel_launches"] = n_launches
    all_ok &= n_launches > 0  # the device kernels did run
    report["ok"] = bool(all_ok)
    report["device"] = why
    report["pool"] = bool(pool) or backend.simulation()
    print(f"TINY_STEP {json.dumps(report)}")
    return 0 if all_ok else 1


# --------------------------------------------------------------------------- entry point

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim", action="store_true",
                    help="every step in the CUDA simulation at smoke sizes (no GPU needed)")
    ap.add_argument("--budget", type=float,
                    default=float(os.environ.get("GPU_CHECK_BUDGET_S", 335)),
                    help="seconds for the whole check (default 335)")
    ap.add_argument("--out", help="summary path (default $OUT/gpu_check.json or "
                                  "./gpu_check.json)")
    ap.add_argument("--skip-build", action="store_true", help="do not build the package")
    ap.add_argument("--build", action="store_true", help="build also in --sim mode")
    ap.add_argument("--only", nargs="+", choices=list(STEPS), help="run only these steps")
    ap.add_argument("--tiny-step", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pool", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny_step:
        return tiny_step(args.pool)
    if args.probe:
        return probe(args.probe)
    os.chdir(ROOT)
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
