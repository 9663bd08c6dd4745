"""Compile check: every .cu of sparsecnn/_gpu/kernels (and the simulation probes) compiles for
sm_80 and sm_90 with the options CuPy uses at run time, without a GPU, and without a single
warning.

Two compilers, each tried where it is available (a missing one skips with its reason):
- NVRTC, the compiler CuPy uses at run time, through its C API with ctypes (the
  ``nvidia-cuda-nvrtc`` wheel, or a CUDA toolkit's libnvrtc); it needs no GPU or driver.
  Options: _launch.NVRTC_OPTIONS + what CuPy adds (_launch.CUPY_ADDED_OPTIONS) + -arch=sm_XX.
- nvcc ``-cubin`` with the same options where nvcc has them (it has no
  ``--device-as-default-execution-space``; every function in the kernels is annotated).
"""
from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sparsecnn._gpu import _launch

ARCHS = ("80", "90")
HERE = Path(__file__).resolve().parent
SOURCES = sorted(_launch.KERNEL_DIR.glob("*.cu")) + sorted((HERE / "cuda").glob("*.cu"))
DIAGNOSTIC = re.compile(r"\b(error|warning)\b", re.I)


def _find_nvrtc() -> str | None:
    cands = []
    try:  # the nvidia-cuda-nvrtc wheel (cu12: nvidia/cuda_nvrtc/lib, cu13: nvidia/cu13/lib)
        import nvidia
        for base in nvidia.__path__:
            cands += sorted(glob.glob(os.path.join(base, "**", "libnvrtc.so*"), recursive=True))
    except ImportError:
        pass
    for root in (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            cands += sorted(glob.glob(os.path.join(root, "lib*", "libnvrtc.so*")))
            cands += sorted(glob.glob(os.path.join(root, "targets", "*", "lib", "libnvrtc.so*")))
    for c in cands:
        if "builtins" in os.path.basename(c):
            continue
        try:
            ctypes.CDLL(c)
            return c
        except OSError:
            continue
    return None


NVRTC = _find_nvrtc()
NVCC = shutil.which("nvcc")
_REASONS = {
    "nvrtc": "NVRTC not found (pip install nvidia-cuda-nvrtc, or a CUDA toolkit's libnvrtc)",
    "nvcc": "nvcc not on PATH",
}


def compile_nvrtc(path: Path, arch: str) -> tuple[bool, str]:
    """(ok, log) of compiling path to a cubin with NVRTC."""
    lib = ctypes.CDLL(NVRTC)
    prog = ctypes.c_void_p()
    src = path.read_bytes()
    r = lib.nvrtcCreateProgram(ctypes.byref(prog), src, path.name.encode(), 0, None, None)
    if r != 0:
        return False, f"nvrtcCreateProgram failed ({r})"
    try:
        opts = [*_launch.NVRTC_OPTIONS, *_launch.CUPY_ADDED_OPTIONS, f"-arch=sm_{arch}",
                f"-I{path.parent}"]
        arr = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(max(size.value, 1))
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace")
        if rc == 0:
            cubin = ctypes.c_size_t()
            if lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin)) != 0 or cubin.value == 0:
                return False, log + "\nno cubin produced"
        return rc == 0, log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def compile_nvcc(path: Path, arch: str, tmp: Path) -> tuple[bool, str]:
    opts = [o for o in (*_launch.NVRTC_OPTIONS, *_launch.CUPY_ADDED_OPTIONS)
            if o != "--device-as-default-execution-space"]
    cmd = [NVCC, *opts, f"-arch=sm_{arch}", "-cubin", f"-I{path.parent}",
           "-o", str(tmp / f"{path.stem}.sm_{arch}.cubin"), str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    return r.returncode == 0, r.stdout + r.stderr


def diagnostics(compiler: str, path: Path, arch: str, tmp: Path) -> list[str]:
    """Error or warning lines (an empty list: the file compiles cleanly)."""
    if compiler == "nvrtc":
        ok, log = compile_nvrtc(path, arch)
    else:
        ok, log = compile_nvcc(path, arch, tmp)
    lines = [ln for ln in log.splitlines() if DIAGNOSTIC.search(ln)]
    if not ok and not lines:
        lines = [f"compilation failed: {log.strip() or '(no log)'}"]
    return lines


def _available(compiler):
    return NVRTC is not None if compiler == "nvrtc" else NVCC is not None


def _params():
    out = []
    for compiler in ("nvrtc", "nvcc"):
        marks = () if _available(compiler) else (pytest.mark.skip(reason=_REASONS[compiler]),)
        for arch in ARCHS:
            for src in SOURCES:
                out.append(pytest.param(compiler, arch, src, marks=marks,
                                        id=f"{compiler}-sm_{arch}-{src.name}"))
    return out


def test_kernel_sources_exist():
    names = {p.name for p in SOURCES}
    assert {"column_sums.cu", "hash.cu"} <= names


@pytest.mark.parametrize("compiler,arch,src", _params())
def test_compiles_cleanly(compiler, arch, src, tmp_path):
    diag = diagnostics(compiler, src, arch, tmp_path)
    assert not diag, f"{src.name} for sm_{arch} with {compiler}:\n" + "\n".join(diag)


BROKEN = """
extern "C" __global__ void broken(float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = undefined_name;
}
"""
WARNS = """
extern "C" __global__ void warns(float* x, int n) {
    int unused = 3;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = 1.0f;
}
"""


@pytest.mark.parametrize("compiler", [
    pytest.param(c, marks=() if _available(c) else (pytest.mark.skip(reason=_REASONS[c]),))
    for c in ("nvrtc", "nvcc")])
def test_check_fails_on_error_and_on_warning(compiler, tmp_path):
    bad = tmp_path / "broken.cu"
    bad.write_text(BROKEN)
    diag = diagnostics(compiler, bad, "80", tmp_path)
    assert diag and any("undefined_name" in ln for ln in diag), diag
    assert any("broken.cu" in ln for ln in diag), "the diagnostic names the file"
    noisy = tmp_path / "warns.cu"
    noisy.write_text(WARNS)
    diag = diagnostics(compiler, noisy, "90", tmp_path)
    assert diag and any("warning" in ln.lower() for ln in diag), diag
