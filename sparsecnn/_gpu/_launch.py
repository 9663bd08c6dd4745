"""Loading and launching the CUDA kernels of ``sparsecnn/_gpu/kernels``, on a GPU or simulated.

Two launchers with one interface::

    mod = load_module("column_sums.cu")          # CupyModule, or SimModule under simulation
    k = mod.get_function("scnn_column_sums_final_f32")
    k(grid, block, (partial, np.int32(n_chunks), np.int32(C), out))

- :class:`CupyModule` compiles the file with ``cupy.RawModule`` (NVRTC, :data:`NVRTC_OPTIONS`;
  CuPy adds ``-ftz=true``, ``--device-as-default-execution-space`` and the device's ``-arch``)
  and takes CuPy arrays.
- :class:`SimModule` (``SPARSECNN_CUDA_SIM=1``, or ``simulate=True``) compiles the *same* file
  with the host C++ compiler against ``cuda_sim.h`` into a shared library, cached on disk by a
  hash of the sources, the compiler and its flags (``$SPARSECNN_CACHE_DIR``, else
  ``~/.cache/sparsecnn/cuda_sim``), and calls the kernels through ctypes on NumPy arrays.
  ``reverse=True`` (or ``SPARSECNN_CUDA_SIM_REVERSE=1``) runs blocks and the threads of each
  block in reverse order, to expose races. It is slow: a tool for tests and kernel debugging.
  ``SPARSECNN_CUDA_SIM_CXXFLAGS`` adds compiler flags (e.g. ``-O1 -g -fsanitize=address``).

Arguments are converted as CuPy converts them (an array becomes its data pointer, a Python
``int`` an int64, a ``float`` a float64, a NumPy scalar keeps its dtype) and then checked
strictly against the kernel's parameter list, read from its ``extern "C" __global__``
declaration: number of arguments, pointer or value, dtype of the pointee or value (so a Python
int for an ``int`` parameter is refused: pass ``np.int32``), C-contiguity, and on the
simulation writability for non-const pointers. CuPy itself checks none of this.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
SIM_HEADER = Path(__file__).resolve().parent / "cuda_sim.h"

#: options passed to cupy.RawModule (the compile check uses them too)
NVRTC_OPTIONS = ("-std=c++17",)
#: options CuPy adds on its own at run time (cupy/cuda/compiler.py), before ``-arch=sm_XX``
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")

SIM_CXXFLAGS = ("-std=c++17", "-O2", "-fopenmp", "-fPIC", "-shared",
                "-Wall", "-Wextra", "-Werror", "-U_FORTIFY_SOURCE")

_MAX_PARAMS = 64


def simulation_requested() -> bool:
    """Whether ``SPARSECNN_CUDA_SIM`` asks for the CPU simulation of the CUDA kernels."""
    return os.environ.get("SPARSECNN_CUDA_SIM", "").strip() not in ("", "0")


def _reverse_default() -> bool:
    return os.environ.get("SPARSECNN_CUDA_SIM_REVERSE", "").strip() not in ("", "0")


# --------------------------------------------------------------------------- parameter lists

# C spellings of the scalar types allowed at a kernel entry point -> numpy dtype
_C_TYPES = {
    "float": "f4", "double": "f8", "bool": "?",
    "int": "i4", "signed": "i4", "signed int": "i4", "int32_t": "i4",
    "unsigned": "u4", "unsigned int": "u4", "uint32_t": "u4",
    "long long": "i8", "long long int": "i8", "signed long long": "i8", "int64_t": "i8",
    "unsigned long long": "u8", "unsigned long long int": "u8", "uint64_t": "u8",
    "size_t": "u8",
}
_QUALIFIERS = {"const", "volatile", "__restrict__", "__restrict", "restrict"}
_ENTRY = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)


@dataclass(frozen=True)
class Param:
    """One kernel parameter: ``dtype`` of the value, or of the pointee when ``pointer``."""
    name: str
    dtype: np.dtype
    pointer: bool
    const: bool  # the pointee is const (pointers only)

    def spelling(self) -> str:
        t = f"{'const ' if self.const else ''}{self.dtype.name}{' *' if self.pointer else ''}"
        return f"{t} {self.name}".replace("* ", "*")


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.S)
    return re.sub(r"//[^\n]*", " ", src)


def _parse_param(text: str, kernel: str) -> Param:
    stars = text.count("*")
    if stars > 1 or "&" in text or "[" in text:
        raise ValueError(f"{kernel}: parameter {text.strip()!r} is outside the portable subset")
    before, _, after = text.partition("*")
    words = before.split()
    const = "const" in words
    if stars:
        name_words = [w for w in after.split() if w not in _QUALIFIERS]
        type_words = [w for w in words if w not in _QUALIFIERS]
    else:
        words = [w for w in words if w not in _QUALIFIERS]
        name_words, type_words = words[-1:], words[:-1]
        const = False
    if len(name_words) != 1:
        raise ValueError(f"{kernel}: cannot read parameter {text.strip()!r}")
    ctype = " ".join(type_words)
    if ctype not in _C_TYPES:
        raise ValueError(f"{kernel}: parameter type {ctype!r} is outside the portable subset")
    return Param(name_words[0], np.dtype(_C_TYPES[ctype]), bool(stars), const and bool(stars))


def parse_kernels(source: str) -> dict[str, tuple[Param, ...]]:
    """The ``extern "C" __global__`` entry points of a .cu source and their parameters."""
    out = {}
    for m in _ENTRY.finditer(_strip_comments(source)):
        name, plist = m.group(1), m.group(2).strip()
        parts = [] if plist in ("", "void") else plist.split(",")
        out[name] = tuple(_parse_param(p, name) for p in parts)
    return out


# --------------------------------------------------------------------------- argument checks

def _normalize_dims(dims, what: str) -> tuple[int, int, int]:
    if isinstance(dims, (int, np.integer)):
        dims = (dims,)
    dims = tuple(int(v) for v in dims)
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{what} must have 1 to 3 dimensions, got {dims}")
    dims = dims + (1,) * (3 - len(dims))
    if min(dims) < 1:
        raise ValueError(f"{what} {dims}: every dimension must be >= 1 (skip empty launches)")
    return dims


def _check_config(grid, block) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    g = _normalize_dims(grid, "grid")
    b = _normalize_dims(block, "block")
    if b[0] * b[1] * b[2] > 1024 or b[2] > 64:
        raise ValueError(f"block {b}: at most 1024 threads per block and 64 in z")
    if g[0] > 2**31 - 1 or g[1] > 65535 or g[2] > 65535:
        raise ValueError(f"grid {g} exceeds CUDA's limits")
    return g, b


def _as_cupy_value(v):
    """The dtype CuPy passes a scalar argument as."""
    if isinstance(v, np.generic):
        return v
    if isinstance(v, bool):
        return np.bool_(v)
    if isinstance(v, int):
        return np.int64(v)
    if isinstance(v, float):
        return np.float64(v)
    if isinstance(v, complex):
        return np.complex128(v)
    return None


def _describe(v) -> str:
    if isinstance(v, np.generic):
        return f"numpy.{type(v).__name__}"
    if isinstance(v, (bool, int, float, complex)):
        conv = _as_cupy_value(v)
        return f"Python {type(v).__name__} (passed as {conv.dtype.name} like CuPy)"
    if hasattr(v, "dtype") and hasattr(v, "shape"):
        return f"{type(v).__module__.split('.')[0]} array of {v.dtype}"
    return type(v).__name__


def _check_args(kernel: str, params: tuple[Param, ...], args, array_type, *, sim: bool):
    """Validated arguments: arrays unchanged, scalars as numpy scalars of the parameter's dtype."""
    label = "numpy" if sim else "cupy"
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"{kernel}: args must be a tuple or list, got {type(args).__name__}")
    if len(args) != len(params):
        raise TypeError(f"{kernel} takes {len(params)} arguments "
                        f"({', '.join(p.spelling() for p in params)}), got {len(args)}")
    out = []
    for i, (p, a) in enumerate(zip(params, args)):
        where = f"{kernel}: argument {i} ({p.spelling()})"
        if p.pointer:
            if not isinstance(a, array_type):
                raise TypeError(f"{where} needs a {label} array, "
                                f"got {_describe(a)}")
            if a.dtype != p.dtype:
                raise TypeError(f"{where} needs dtype {p.dtype}, got {a.dtype}")
            if not a.flags.c_contiguous:
                raise ValueError(f"{where} needs a C-contiguous array")
            if sim and not p.const and not a.flags.writeable:
                raise ValueError(f"{where} is written by the kernel; the array is read-only")
            out.append(a)
        else:
            v = _as_cupy_value(a)
            if v is None:
                raise TypeError(f"{where} needs a scalar, got {_describe(a)}")
            if v.dtype != p.dtype:
                raise TypeError(f"{where} needs numpy.{p.dtype.name} ({p.dtype.itemsize} bytes), "
                                f"got {_describe(a)}: pass numpy.{p.dtype.name}(...)")
            out.append(v)
    return out


# --------------------------------------------------------------------------- kernel files

def _resolve(filename: str | os.PathLike) -> Path:
    path = Path(filename)
    if not path.is_absolute() and not path.exists():
        path = KERNEL_DIR / path
    if not path.is_file():
        raise FileNotFoundError(f"no CUDA kernel file {filename!s} (looked in {KERNEL_DIR})")
    return path.resolve()


class _Module:
    kind = "?"

    def __init__(self, path: Path):
        self.path = path
        self.source = path.read_text()
        self.signatures = parse_kernels(self.source)
        if not self.signatures:
            raise ValueError(f"{path.name} has no extern \"C\" __global__ kernel")
        self._functions = {}

    def get_function(self, name: str):
        if name not in self.signatures:
            raise AttributeError(f"{self.path.name} has no kernel {name!r} "
                                 f"(it has {', '.join(sorted(self.signatures))})")
        if name not in self._functions:
            self._functions[name] = self._make(name)
        return self._functions[name]

    def __repr__(self):
        return f"<{type(self).__name__} {self.path.name}: {', '.join(self.signatures)}>"


# --------------------------------------------------------------------------- CuPy

class CupyKernel:
    def __init__(self, module: CupyModule, name: str):
        self.name = name
        self.params = module.signatures[name]
        self._fn = module.raw.get_function(name)
        import cupy
        self._array_type = cupy.ndarray

    def __call__(self, grid, block, args, *, shared_mem: int = 0, reverse: bool | None = None):
        """Launch on the current stream (asynchronous). ``reverse`` only matters simulated."""
        g, b = _check_config(grid, block)
        vals = _check_args(self.name, self.params, args, self._array_type, sim=False)
        self._fn(g, b, tuple(vals), shared_mem=int(shared_mem))


class CupyModule(_Module):
    kind = "cupy"

    def __init__(self, path: Path):
        super().__init__(path)
        import cupy
        self.raw = cupy.RawModule(code=self.source,
                                  options=(*NVRTC_OPTIONS, f"-I{path.parent}"))

    def _make(self, name):
        return CupyKernel(self, name)


# --------------------------------------------------------------------------- simulation

def find_host_compiler() -> str | None:
    """The host C++ compiler for the simulation: ``$CXX``, else g++, c++ or clang++ on PATH."""
    cands = [os.environ["CXX"]] if os.environ.get("CXX") else []
    cands += ["g++", "c++", "clang++"]
    for c in cands:
        p = shutil.which(c.split()[0]) if c else None
        if p:
            return p
    return None


def sim_cache_dir() -> Path:
    """Where compiled simulation libraries are kept (created on first use)."""
    env = os.environ.get("SPARSECNN_CACHE_DIR")
    if env:
        base = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "sparsecnn"
    d = base / "cuda_sim"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    d = Path(tempfile.gettempdir()) / f"sparsecnn-cuda-sim-{os.getuid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


@functools.cache
def _compiler_id(cxx: str) -> str:
    try:
        r = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return r.stdout
    except (OSError, subprocess.SubprocessError):
        return cxx


class SimError(RuntimeError):
    """A simulated launch failed (bad configuration, divergent barriers, ...)."""


class SimKernel:
    def __init__(self, module: SimModule, name: str):
        self.name = name
        self.params = module.signatures[name]
        lib = module.lib
        self._launch = getattr(lib, f"scnn_sim_launch_{name}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._check_compiled(getattr(lib, f"scnn_sim_arginfo_{name}"))

    def _check_compiled(self, arginfo):
        """The compiled parameter list must be the parsed one (else the parser is wrong)."""
        info = np.zeros(5 * _MAX_PARAMS, dtype=np.int32)
        arginfo.restype = ctypes.c_int
        n = arginfo(info.ctypes.data_as(ctypes.c_void_p), _MAX_PARAMS)
        if n != len(self.params):
            raise RuntimeError(f"{self.name}: compiled with {n} parameters, "
                               f"parsed {len(self.params)}")
        kinds = {1: "i", 2: "u", 3: "f", 4: "b"}
        for i, p in enumerate(self.params):
            size, ptr, kind, item, const = info[5 * i:5 * i + 5]
            ok = (bool(ptr) == p.pointer and kinds.get(int(kind)) == p.dtype.kind
                  and item == p.dtype.itemsize and (not ptr or bool(const) == p.const)
                  and size == (8 if ptr else p.dtype.itemsize))
            if not ok:
                raise RuntimeError(f"{self.name}: parameter {i} ({p.spelling()}) was read "
                                   f"wrongly from the source (compiled: size {size}, "
                                   f"pointer {ptr}, kind {kind}, item {item}, const {const})")

    def __call__(self, grid, block, args, *, shared_mem: int = 0, reverse: bool | None = None):
        """Run the kernel to completion on the CPU (synchronous)."""
        g, b = _check_config(grid, block)
        if shared_mem:
            raise NotImplementedError("the CUDA simulation has no dynamic shared memory yet")
        vals = _check_args(self.name, self.params, args, np.ndarray, sim=True)
        # one 8-byte-aligned cell per argument holding its value (a pointer, or the scalar)
        cells = []
        for p, v in zip(self.params, vals):
            if p.pointer:
                cells.append(np.array([v.ctypes.data], dtype=np.uintp))
            else:
                cells.append(np.array([v], dtype=p.dtype))
        ptrs = np.array([c.ctypes.data for c in cells] or [0], dtype=np.uintp)
        dims = np.array(g + b, dtype=np.uint32)
        err = ctypes.create_string_buffer(512)
        if reverse is None:
            reverse = _reverse_default()
        rc = self._launch(dims.ctypes.data, dims.ctypes.data + 12, ptrs.ctypes.data,
                          int(bool(reverse)), err, len(err))
        del cells, vals  # the arrays stay alive until here
        if rc != 0:
            raise SimError(f"{self.name}: {err.value.decode(errors='replace')}")


class SimModule(_Module):
    kind = "sim"

    def __init__(self, path: Path):
        super().__init__(path)
        self.lib_path = build_sim_library(path, self.source, tuple(self.signatures))
        self.lib = ctypes.CDLL(str(self.lib_path))

    def _make(self, name):
        return SimKernel(self, name)


def build_sim_library(path: Path, source: str, kernels: tuple[str, ...]) -> Path:
    """Compile (or find in the cache) the simulation library of one kernel file."""
    cxx = find_host_compiler()
    if cxx is None:
        raise RuntimeError("the CUDA simulation needs a host C++ compiler (g++ or clang++ with "
                           "OpenMP); none found on PATH (set CXX)")
    extra = tuple(os.environ.get("SPARSECNN_CUDA_SIM_CXXFLAGS", "").split())
    flags = SIM_CXXFLAGS + extra
    header = SIM_HEADER.read_text()
    # the source goes in inline under its file name, so that the library (and its cache key)
    # depends on what is compiled, not on where the file lies
    exports = "".join(f"SCNN_SIM_EXPORT({k})\n" for k in kernels)
    wrapper = (f'#include "{SIM_HEADER}"\n#line 1 "{path.name}"\n{source}\n'
               f'#line 1 "{path.stem}_exports"\n{exports}')
    # the headers a kernel file may include ("common.cuh") are part of what is compiled
    included = "".join(h.read_text() for h in sorted(path.parent.glob("*.cuh")))
    h = hashlib.sha256()
    for part in (header, path.name, source, included, exports, _compiler_id(cxx),
                 " ".join(flags)):
        h.update(part.encode())
        h.update(b"\0")
    out = sim_cache_dir() / f"{path.stem}-{h.hexdigest()[:20]}.so"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(prefix="scnn-sim-") as tmp:
        cpp = Path(tmp) / f"{path.stem}_sim.cpp"
        cpp.write_text(wrapper)
        lib = Path(tmp) / out.name
        cmd = [cxx, *flags, f"-I{path.parent}", "-x", "c++", str(cpp), "-o", str(lib)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {path.name} for the CUDA simulation failed:\n"
                               f"{' '.join(cmd)}\n{r.stderr}{r.stdout}")
        os.replace(lib, out)  # atomic: concurrent builders each install a complete file
    return out


# --------------------------------------------------------------------------- entry point

@functools.cache
def _load(path: Path, mtime_ns: int, simulate: bool):
    return SimModule(path) if simulate else CupyModule(path)


def load_module(filename: str | os.PathLike, *, simulate: bool | None = None):
    """The kernel module of a .cu file (a name under ``kernels/`` or a path), compiled once per
    process (and cached on disk). ``simulate`` defaults to ``SPARSECNN_CUDA_SIM``."""
    path = _resolve(filename)
    if simulate is None:
        simulate = simulation_requested()
    return _load(path, path.stat().st_mtime_ns, bool(simulate))
